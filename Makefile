# spectral_jax: the two commands a fresh machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint format bench device-check clean

# (Re)create the virtualenv whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/spectral-jax demo

# Two pytest-xdist workers (CI has 2 cores), tests handed out one by one (--dist load).
test: $(STAMP) lint
	$(BIN)/python -m pytest -m "not slow" -q -n 2 --dist load

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)
	$(BIN)/python experiments/bench_filters.py --quick
	$(BIN)/python experiments/bench_stu.py --quick
	$(BIN)/python experiments/bench_distill.py --quick
	$(BIN)/python experiments/bench_decode.py --quick
	$(BIN)/python experiments/bench_train.py --quick

# The accelerator check (docs/accelerators.md): on a GPU or TPU host whose jax sees only the CPU
# it installs .[cuda12] or .[tpu] and re-runs itself; then the tests that matter there and quick
# benchmarks within 480 s, into results/device/<device-kind>.json.
device-check: $(STAMP)
	$(BIN)/python experiments/device_check.py

clean:
	rm -rf $(VENV) .pytest_cache

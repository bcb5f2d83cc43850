# spectral_jax: the two commands a fresh machine needs are `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint format bench bench-peers device-check clean

# (Re)create the virtualenv whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/spectral-jax demo

# Two pytest-xdist workers (CI has 2 cores); an idle worker steals queued tests from the busy
# one (--dist worksteal), so a long test near the end does not leave a core idle.
test: $(STAMP) lint
	$(BIN)/python -m pytest -m "not slow" -q -n 2 --dist worksteal

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
	$(BIN)/python experiments/bench_decode.py batch --quick
	$(BIN)/python experiments/bench_step_bytes.py --quick
	$(BIN)/python experiments/bench_train.py --quick

# The batch decode benchmark with its peer, recurrentgemma's Griffin (experiments/griffin_peer.py,
# the only module that imports it). recurrentgemma 1.0.1 pins absl-py<2 and numpy<2.4, which
# orbax's absl-py 2 and our numpy conflict with, so it is installed without its pins (--no-deps),
# with the modules its JAX code imports that we lack, pinned. The freezes before and after must
# differ only by added lines: nothing already installed may change.
PEERS := recurrentgemma==1.0.1 einops==0.8.2 jaxtyping==0.3.11 wadler-lindig==0.1.8 \
	typeguard==2.13.3 sentencepiece==0.2.3
bench-peers: $(STAMP)
	$(BIN)/python -m pip freeze | sort > $(VENV)/.freeze-before
	$(BIN)/python -m pip install --quiet --no-deps $(PEERS)
	$(BIN)/python -m pip freeze | sort > $(VENV)/.freeze-after
	@if comm -23 $(VENV)/.freeze-before $(VENV)/.freeze-after | grep .; then \
		echo "bench-peers changed the packages above; reinstall them with make"; exit 1; fi
	$(BIN)/python -c "import recurrentgemma.jax"
	$(BIN)/python experiments/bench_decode.py batch --json results/bench/decode_batch.json \
		--repeats 2

# The accelerator check (docs/accelerators.md): on a GPU or TPU host whose jax sees only the CPU
# it installs .[cuda12] or .[tpu] and re-runs itself; then the tests that matter there and quick
# benchmarks within 480 s, into results/device/<device-kind>.json.
device-check: $(STAMP)
	$(BIN)/python experiments/device_check.py

clean:
	rm -rf $(VENV) .pytest_cache

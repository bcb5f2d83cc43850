"""experiments/bench_memory.py's machinery: a case killed at the memory cap is a row, not
dropped (fast: the child is killed as it starts), and one tiny case measured in a child process
(slow: ~10 s, most of it the child's JAX import and compilation)."""

import pytest

TINY = {"kind": "stu", "model": "headline", "strategy": "naive", "prompt": 64, "batch": 2,
        "config": {"d_model": 16, "num_layers": 1, "max_len": 128, "num_filters": 4}}  # fmt: skip


@pytest.fixture
def bench(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "experiments"))
    import bench_memory

    return bench_memory


def test_a_case_over_the_memory_cap_is_a_row(bench):
    row = bench.run_case(TINY, case_timeout=120, max_rss=1 << 20, repeats=1)  # 1 MiB
    assert row["status"] == "over_memory_cap" and row["error"] == "RSS over 0.0 GiB"
    assert row["kind"] == "stu" and row["prompt"] == 64 and "config" not in row
    summary = bench.summarize([row], quick=True)
    assert set(summary.values()) == {None}  # cases that did not run are None, not 0


@pytest.mark.slow
def test_one_case_in_a_child(bench):
    row = bench.run_case(TINY, case_timeout=120, max_rss=8 * bench.GIB, repeats=1)
    assert row["status"] == "ok", row
    # the peak covers the prefill: at least the RSS before it
    assert row["peak_rss"] >= row["rss_before"] > 0 and row["rss_source"] == "VmHWM"
    assert row["prefill_seconds"] > 0 and row["prefill_includes_compile"] is False

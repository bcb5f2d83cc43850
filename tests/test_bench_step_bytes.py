"""The step-bytes benchmark (experiments/bench_step_bytes.py): its HLO count of state-sized arrays
on programs whose arrays are known, and its ``--quick`` run, in this process: the JSON has the
documented keys and its rows are consistent with their own definitions."""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ROW_KEYS = {
    "target", "batch", "state_bytes", "io_bytes", "temp_bytes", "bytes_accessed", "flops",
    "counted_flops", "step_seconds", "tokens_per_second", "bytes_per_second",
    "of_copy_bandwidth", "bytes_over_state", "bytes_over_io", "state_sized",
}  # fmt: skip


@pytest.fixture
def bench(monkeypatch):
    """The script's module, imported with its folder on the path (as when it runs)."""
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    import bench_step_bytes

    return bench_step_bytes


def test_state_sized_counts_what_the_program_materialises(bench):
    state, drive = jnp.ones((2, 3, 4)), jnp.ones((2, 3))

    def fused(s, u):  # the broadcast of u is fused into the update: one array, the new state
        return s * 2 + u[..., None]

    def written(s, u):  # the broadcast is also returned, so it is written out: one more
        wide = jnp.broadcast_to(u[..., None], s.shape)
        return s * 2 + wide, wide

    def plane(s, u):  # half the state (one of its 2 planes) is returned too: it counts
        return s * 2 + u[..., None], s[0] + 1

    def smaller(s, u):  # a third of it does not
        return s * 2 + u[..., None], s[:, 0] + 1

    def other(s, u):  # nor does as many elements in other dimensions
        return s * 2 + u[..., None], jnp.ones((24,)) * u[0, 0]

    expected = {fused: ["f32[2,3,4]"], written: ["f32[2,3,4]"] * 2,
                plane: ["f32[2,3,4]", "f32[3,4]"], smaller: ["f32[2,3,4]"],
                other: ["f32[2,3,4]"]}  # fmt: skip
    for fn, shapes in expected.items():
        hlo = jax.jit(fn).lower(state, drive).compile().as_text()
        arrays = bench.state_sized(hlo, [state.shape])
        assert sorted(a.split()[-1] for a in arrays) == sorted(shapes), (fn.__name__, arrays)


def test_quick_run_writes_the_documented_json(bench, tmp_path, capsys):
    path = tmp_path / "step_bytes.json"
    argv = ["--quick", "--batches", "2", "--repeats", "1", "--copy-mib", "1"]
    doc = bench.main([*argv, "--json", str(path)])
    assert json.loads(path.read_text()) == json.loads(json.dumps(doc))
    assert doc["meta"]["partial"] is False and doc["meta"]["steps"] == 8
    copy = doc["copy"]
    assert copy["bytes"] == 2 * 2**20 and copy["bytes_per_second"] > 0
    text = path.with_suffix(".txt").read_text()
    assert text in capsys.readouterr().out  # the table printed is the one written

    rows = {r["target"]: r for r in doc["rows"]}
    assert sorted(rows) == ["layer", "model"]
    for row in rows.values():
        assert set(row) == ROW_KEYS and row["batch"] == 2
        # derived fields from their definitions (float products and quotients: a few ulps)
        assert row["tokens_per_second"] == pytest.approx(2 / row["step_seconds"], rel=1e-12)
        assert row["bytes_per_second"] == pytest.approx(
            2 * row["bytes_accessed"] / row["step_seconds"], rel=1e-12
        )
        assert row["of_copy_bandwidth"] == pytest.approx(
            row["bytes_per_second"] / copy["bytes_per_second"], rel=1e-12
        )
        # a step reads its state and writes the next one: at least twice the state's bytes
        assert row["bytes_accessed"] >= 2 * row["state_bytes"] > 0 and row["flops"] > 0
        sized = row["state_sized"]
        assert sized["count"] == len(sized["arrays"]) >= 1
        assert 0 <= sized["beyond_state"] < sized["count"]
        # each listed array has as many elements as one state array, i.e. at most the cache's
        # float32 words of the batch
        for array in sized["arrays"]:
            shape = [int(d) for d in array.split("[")[1].rstrip("]").split(",")]
            assert math.prod(shape) <= 2 * row["state_bytes"] // 4
    model, layer = rows["model"], rows["layer"]
    # the model's 4 blocks each hold a cache like the layer's (as many state arrays: the count
    # less those beyond the state), and do more per token
    assert model["state_bytes"] >= 4 * layer["state_bytes"]
    states = {name: r["state_sized"]["count"] - r["state_sized"]["beyond_state"]
              for name, r in rows.items()}  # fmt: skip
    assert states["model"] == 4 * states["layer"]
    assert model["bytes_accessed"] > layer["bytes_accessed"] and model["flops"] > layer["flops"]
    assert model["counted_flops"] > 0 and layer["counted_flops"] is None

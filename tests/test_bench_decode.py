"""The batch decode benchmark (experiments/bench_decode_batch.py, ``bench_decode.py batch``) at
its quick sizes, in this process: it runs with its peer (recurrentgemma's Griffin) absent, as in
CI, skipping the peer's rows with one line, and its rows are consistent with its own counts. With
recurrentgemma installed (``make bench-peers``), the peer's cached decode is checked against
its own full forward pass."""

import importlib
import json
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def experiments(monkeypatch):
    """Import experiment modules by name (their folder on the path, as when they run)."""
    monkeypatch.syspath_prepend(str(REPO / "experiments"))
    return importlib.import_module


def test_batch_quick_without_the_peer(experiments, monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "recurrentgemma", None)  # importing it raises ImportError
    bench = experiments("bench_decode_batch")
    path = tmp_path / "batch.json"
    argv = ["--quick", "--batches", "1", "--repeats", "1", "--json", str(path)]
    doc = bench.main([*argv, "--models", "distilled_stu", "griffin_recurrent"])
    out = capsys.readouterr().out
    peer_lines = [line for line in out.splitlines() if "griffin_recurrent" in line]
    assert len(peer_lines) == 1 and "skipped" in peer_lines[0] and "bench-peers" in peer_lines[0]
    assert "bench-peers" in doc["meta"]["absent"]["griffin_recurrent"]
    assert json.loads(path.read_text()) == json.loads(json.dumps(doc))
    assert doc["meta"]["partial"] is False and path.with_suffix(".png").stat().st_size > 0

    (row,) = doc["rows"]
    (matmul,) = doc["matmul"]
    assert (row["model"], row["batch"]) == ("distilled_stu", 1) and row["tokens_per_second"] > 0
    # the limit is the measured rate over the counted FLOPs, and the row's share of it (float
    # division only: a few ulps)
    assert row["limit_tokens_per_second"] == pytest.approx(
        matmul["flops_per_second"] / row["flops_per_token"], rel=1e-12
    )
    assert row["of_limit"] == pytest.approx(
        row["tokens_per_second"] / row["limit_tokens_per_second"], rel=1e-12
    )
    # the FLOPs beyond the matmuls (head, MLPs, M_in) are 4 per state (update and readout), and
    # every state counted is a float32 in the cache (its bytes per sequence, counted apart)
    size = doc["meta"]["size"]
    D, F, V, layers = size["d_model"], doc["meta"]["mlp_width"], size["vocab"], size["num_layers"]
    state_flops = row["flops_per_token"] - 2 * D * V - layers * (6 * D * F + 2 * D * D)
    assert state_flops > 0 and state_flops % 4 == 0
    assert 4 * (state_flops // 4) <= row["cache_bytes"]
    assert doc["ratios"] == {"over_griffin_recurrent": {}}  # no peer row to compare with


def test_griffin_decode_matches_its_forward_pass(experiments):
    pytest.importorskip("recurrentgemma.jax")
    import jax
    import jax.numpy as jnp

    peer = experiments("griffin_peer")
    # window 8 < prompt 12: the attention block's ring buffer wraps during the decode
    griffin = peer.GriffinPeer(peer.GriffinShape("RRAR", 16, 32, 4, 64, 8))
    prompt = jax.random.randint(jax.random.key(1), (2, 12), 0, 64, jnp.int32)
    logits, cache = griffin.prefill(prompt)
    tokens = griffin.decode(cache, logits, 6)
    full = jnp.concatenate([prompt, tokens], axis=1)
    ref, _ = griffin.model.apply(
        {"params": griffin.params}, full, peer.positions(full), None, return_cache=False
    )
    # greedy tokens are argmaxes: the same program up to the cache, so the same tokens
    assert (jnp.argmax(ref[:, 11:-1], axis=-1) == tokens).all()

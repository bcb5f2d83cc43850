"""The training loop, optimizer and metrics, on tiny models.

The multi-process test starts two OS processes joined by ``jax.distributed`` (CPU
gloo collectives on localhost); this file doubles as their script.
"""

import dataclasses
import io
import json
import math
import os
import pathlib
import socket
import subprocess
import sys
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectral_jax.data.lm_tasks import ByteCorpusLM
from spectral_jax.data.tasks import Task
from spectral_jax.nn.model import ModelConfig
from spectral_jax.train import (
    CheckpointConfig,
    Checkpointer,
    CheckpointError,
    DistributedConfig,
    MeshConfig,
    NonFiniteLossError,
    OptimConfig,
    TrainConfig,
    load_model,
    train,
)
from spectral_jax.train.config import model_config_from_record, run_record
from spectral_jax.train.flops import train_flops_per_token
from spectral_jax.train.metrics import MetricsLogger, progress_line
from spectral_jax.train.optim import learning_rate_schedule, make_optimizer, weight_decay_mask

REPO = pathlib.Path(__file__).resolve().parents[1]
VOCAB = 256


class TinyLM(nnx.Module):
    """Embedding -> causal running mean -> RMSNorm -> linear head (logits [B, L, V]).

    The matrices name their logical axes (train.sharding) so that FSDP shards them; the
    unnamed norm scale and biases are replicated."""

    def __init__(self, rngs: nnx.Rngs, vocab: int = VOCAB, width: int = 16, nan_after=None):
        axes = lambda *names: {"logical_axes": names}  # noqa: E731
        self.embed = nnx.Embed(vocab, width, rngs=rngs, embedding_metadata=axes("vocab", "embed"))
        self.mix = nnx.Linear(width, width, rngs=rngs, kernel_metadata=axes("embed", "embed"))
        self.norm = nnx.RMSNorm(width, rngs=rngs)
        self.head = nnx.Linear(width, vocab, rngs=rngs, kernel_metadata=axes("embed", "vocab"))
        self.calls = nnx.Variable(jnp.zeros((), jnp.int32))
        self.nan_after = nan_after

    def __call__(self, tokens):
        h = self.embed(tokens)
        h = h + jnp.cumsum(self.mix(h), axis=1) / jnp.arange(1, h.shape[1] + 1)[:, None]
        logits = self.head(self.norm(h))
        self.calls[...] += 1
        if self.nan_after is not None:  # NaN from the (nan_after + 1)-th call on
            logits = logits * jnp.where(self.calls[...] > self.nan_after, jnp.nan, 1.0)
        return logits


def _config(tmp_path, **overrides) -> TrainConfig:
    base = dict(
        task=ByteCorpusLM(seq_len=16),
        optim=OptimConfig(learning_rate=1e-2, warmup_steps=1, decay_steps=40),
        steps=6,
        global_batch=4,
        log_every=2,
        eval_batches=1,
        metrics_path=str(tmp_path / "metrics.jsonl"),
    )
    return TrainConfig(**{**base, **overrides})


def _records(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


# ---------------------------------------------------------------------------- optimizer


def test_schedule_warms_up_then_decays_to_the_floor():
    config = OptimConfig(learning_rate=1e-3, warmup_steps=10, decay_steps=110, min_lr_ratio=0.1)
    lr = learning_rate_schedule(config)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(lr(60)), 0.55e-3, rtol=1e-5)  # cosine midpoint
    np.testing.assert_allclose(float(lr(110)), 1e-4, rtol=1e-5)
    np.testing.assert_allclose(float(lr(500)), 1e-4, rtol=1e-5)


def test_weight_decay_skips_norms_and_biases():
    model = TinyLM(nnx.Rngs(0))
    mask = weight_decay_mask(nnx.state(model, nnx.Param))
    flat = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["['embed']['embedding'].value"] and flat["['head']['kernel'].value"]
    assert not flat["['head']['bias'].value"] and not flat["['norm']['scale'].value"]
    # A parameter called like a norm is exempt even when 2-D.
    named = weight_decay_mask({"layer_norm": {"w": jnp.ones((2, 2))}, "w": jnp.ones((2, 2))})
    assert named == {"layer_norm": {"w": False}, "w": True}
    # The optimizer applies it: with zero gradients only decayed parameters move.
    params = {"w": jnp.ones((2, 2)), "bias": jnp.ones(2)}
    tx = make_optimizer(OptimConfig(learning_rate=0.1, warmup_steps=0, decay_steps=10))
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.1 * 0.1 * np.ones((2, 2)), rtol=1e-6)
    np.testing.assert_array_equal(updates["bias"], 0.0)


def test_gradients_are_clipped_to_the_global_norm_before_adam():
    params = {"w": jnp.ones(4)}
    grads = {"w": jnp.array([30.0, 40.0, 0.0, 0.0])}  # norm 50
    config = OptimConfig(warmup_steps=0, decay_steps=10, b2=0.5, weight_decay=0.0, grad_clip=2.0)
    tx = make_optimizer(config)
    _, state = tx.update(grads, tx.init(params), params)
    nu = state[1][0].nu["w"]  # second moment after one step: (1 - b2) * clipped^2
    np.testing.assert_allclose(nu, 0.5 * np.array([1.2, 1.6, 0, 0]) ** 2, rtol=1e-6)


def test_bad_optim_and_train_configs_name_the_field():
    with pytest.raises(ValueError, match="decay_steps"):
        OptimConfig(warmup_steps=10, decay_steps=5)
    with pytest.raises(ValueError, match="learning_rate"):
        OptimConfig(learning_rate=0.0)
    with pytest.raises(ValueError, match="global_batch"):
        TrainConfig(task=ByteCorpusLM(), global_batch=0)
    with pytest.raises(ValueError, match="task"):
        TrainConfig(task="bytes")
    with pytest.raises(ValueError, match="model must be a ModelConfig"):
        TrainConfig(task=ByteCorpusLM(), model={"d_model": 8})


def test_run_record_rebuilds_the_model_config():
    model = ModelConfig(
        d_model=8, num_layers=2, max_len=16, vocab_size=VOCAB, layer_pattern="SA", num_filters=4
    )
    record = run_record(TrainConfig(task=ByteCorpusLM(seq_len=16), model=model))
    assert json.loads(json.dumps(record)) == record
    assert record["task"] == {"type": "ByteCorpusLM", "seq_len": 16, "val_percent": 5}
    assert model_config_from_record(record) == model
    with pytest.raises(CheckpointError, match="custom model_fn"):
        model_config_from_record(run_record(TrainConfig(task=ByteCorpusLM())))


# ---------------------------------------------------------------------------- metrics


def test_progress_line_and_tensorboard(monkeypatch, tmp_path):
    record = {"split": "train", "step": 5, "loss": 1.5, "grad_norm": 0.25, "learning_rate": 1e-3}
    line = progress_line({**record, "tokens_per_s": 1234.0, "eta_s": 65}, total_steps=10)
    assert line.startswith("[##########..........] 5/10 | loss 1.5000")
    assert "1,234 tok/s" in line and "eta 1m05s" in line
    scalars = []
    fake = types.SimpleNamespace(
        SummaryWriter=lambda logdir: types.SimpleNamespace(
            add_scalar=lambda *args: scalars.append(args), close=lambda: None
        )
    )
    monkeypatch.setitem(sys.modules, "tensorboardX", fake)
    stream = io.StringIO()
    logger = MetricsLogger(str(tmp_path / "m.jsonl"), 10, tensorboard_dir="tb", stream=stream)
    logger.log(record)
    logger.close()
    assert ("train/loss", 1.5, 5) in scalars and ("train/grad_norm", 0.25, 5) in scalars
    assert _records(tmp_path / "m.jsonl") == [record]
    assert stream.getvalue().startswith("[##########")


# ---------------------------------------------------------------------------- loop


def test_training_lowers_the_validation_loss_and_logs_every_step(tmp_path, capsys):
    config = _config(tmp_path, steps=30, log_every=10, eval_every=30, eval_batches=2)
    result = train(config, model_fn=TinyLM)
    records = _records(config.metrics_path)
    train_records = [r for r in records if r.get("split") == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 31))
    assert {"loss", "grad_norm", "learning_rate"} <= train_records[0].keys()
    assert "tokens_per_s" in train_records[9] and "tokens_per_s" not in train_records[8]
    evals = [r for r in records if r.get("split") == "eval"]
    assert len(evals) == 1 and result.history[-1] == evals[0]
    # From uniform bytes (8 bits/byte at init, loss ln 256) a 30-step model learns at
    # least the byte frequencies of Python source (about 5 bits/byte).
    assert train_records[0]["loss"] > 0.95 * math.log(VOCAB)
    assert evals[0]["bits_per_byte"] < 6.0
    assert math.isclose(evals[0]["bits_per_byte"], evals[0]["loss"] / math.log(2))
    out = capsys.readouterr().out
    assert "] 30/30 | loss" in out and "eval  step 30" in out


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    config = _config(
        tmp_path, steps=10, log_every=10, checkpoint=CheckpointConfig(str(ckpt_dir), save_every=2)
    )
    # Every step from 5 on is NaN: 5 and 6 are skipped (6 saves the unchanged state of 4), the
    # third in a row (stop_after_nonfinite_steps=3, the default) stops the run.
    with pytest.raises(NonFiniteLossError, match=r"step 7: non-finite .*loss=nan") as info:
        train(config, model_fn=lambda rngs: TinyLM(rngs, nan_after=4))
    assert f"last good checkpoint is step 6 in {ckpt_dir}" in str(info.value)
    records = _records(config.metrics_path)
    events = [r for r in records if r.get("event") == "non_finite"]
    assert len(events) == 1 and events[0]["step"] == 7
    assert [r["step"] for r in records if r.get("event") == "skipped_step"] == [5, 6, 7]
    with Checkpointer(CheckpointConfig(str(ckpt_dir)), read_only=True) as ckpt:
        assert ckpt.all_steps() == [2, 4, 6]
        meta = ckpt.restore_meta()
    assert meta["data"] == {"seed": 0, "next_step": 6}
    assert meta["nonfinite"] == {"in_a_row": 2, "skipped_total": 2}


def test_load_model_restores_the_trained_parameters(tmp_path):
    ckpt = CheckpointConfig(str(tmp_path / "ckpt"), save_every=3)
    result = train(_config(tmp_path, steps=3, checkpoint=ckpt), model_fn=TinyLM)
    loaded, meta = load_model(ckpt.directory, model_fn=TinyLM)
    assert meta["step"] == 3 and meta["data"] == {"seed": 0, "next_step": 3}
    chex.assert_trees_all_equal(nnx.state(loaded), nnx.state(result.model))
    with pytest.raises(CheckpointError, match="custom model_fn"):
        load_model(ckpt.directory)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(str(tmp_path / "missing"))


def test_model_output_that_does_not_fit_the_task_is_rejected(tmp_path):
    config = _config(tmp_path)
    with pytest.raises(
        ValueError, match=r"maps inputs \(4, 16\) to \(4, 16, 100\).*\(4, 16, 256\)"
    ):
        train(config, model_fn=lambda rngs: TinyLM(rngs, vocab=100))


def test_four_microbatches_train_and_evaluate_like_one_batch(tmp_path):
    # One AdamW step from the same start: the accumulated gradient is the full-batch gradient
    # up to float32 round-off of sums over 8 x 16 positions (e <~ 1e-8 relative); eps = 1e-4
    # bounds the step's sensitivity to it by lr / eps, as in the sharded-step test.
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=0, decay_steps=10, eps=1e-4)
    runs = [
        train(_config(tmp_path, steps=1, global_batch=8, optim=optim, microbatches=m,
                      eval_batches=1, metrics_path=None), model_fn=TinyLM)
        for m in (1, 4)
    ]  # fmt: skip
    (train_1, eval_1), (train_4, eval_4) = (r.history for r in runs)
    np.testing.assert_allclose(train_4["loss"], train_1["loss"], rtol=1e-6)
    np.testing.assert_allclose(train_4["grad_norm"], train_1["grad_norm"], rtol=1e-5)
    params = (nnx.state(r.model, nnx.Param) for r in runs)
    chex.assert_trees_all_close(*params, rtol=4 * 2**-23, atol=1e-2 * 1e-8 / 1e-4)
    # the eval step runs in slices too; its sums reorder float32 additions only
    assert eval_1["split"] == eval_4["split"] == "eval"
    np.testing.assert_allclose(eval_4["loss"], eval_1["loss"], rtol=1e-6)
    np.testing.assert_allclose(eval_4["accuracy"], eval_1["accuracy"], rtol=1e-6)


@dataclasses.dataclass(frozen=True)
class NibbleTask:
    """A task of another class: bytes, with its own eval figure (bits per nibble)."""

    seq_len: int = 16
    kind, vocab_size = "tokens", VOCAB

    def batch(self, seed, step, rows, split="train"):
        return ByteCorpusLM(seq_len=self.seq_len).batch(seed, step, rows, split)

    def eval_metrics(self, mean_loss):
        return {"bits_per_nibble": mean_loss / math.log(2) / 2}

    def text_tokenizer(self):
        return None  # not a text task: nothing to save with the checkpoint


def test_any_task_following_the_protocol_trains_with_its_own_eval_metrics(tmp_path):
    assert isinstance(ByteCorpusLM(), Task) and isinstance(NibbleTask(), Task)
    config = dataclasses.replace(_config(tmp_path, steps=2), task=NibbleTask())
    evals = [r for r in train(config, model_fn=TinyLM).history if r["split"] == "eval"]
    assert evals[0]["bits_per_nibble"] == pytest.approx(evals[0]["loss"] / math.log(4))
    assert "bits_per_byte" not in evals[0]


def test_throughput_per_device_and_mfu_are_logged(tmp_path):
    model = ModelConfig(
        d_model=8, num_layers=2, max_len=16, vocab_size=VOCAB, layer_pattern="SA", num_filters=2,
        window=4, num_heads=2, d_hidden=16,
    )  # fmt: skip
    config = _config(
        tmp_path, model=model, steps=3, log_every=3, eval_batches=0, peak_flops_per_device=1e12
    )
    last = train(config).history[-1]
    per_device = last["tokens_per_s"] / jax.device_count()
    assert last["tokens_per_s_per_device"] == pytest.approx(per_device)
    flops = train_flops_per_token(model, 16, 4)
    assert last["mfu"] == pytest.approx(per_device * flops / 1e12)
    assert f"MFU {100 * last['mfu']:.1f}%" in progress_line(last, 3)
    # on this CPU no peak is known: no MFU unless a peak is given
    assert "mfu" not in train(_config(tmp_path, model=model, steps=2, log_every=2,
                                      eval_batches=0)).history[-1]  # fmt: skip


def test_resume_with_another_task_is_rejected(tmp_path):
    ckpt = CheckpointConfig(str(tmp_path / "ckpt"), save_every=2)
    train(_config(tmp_path, steps=2, checkpoint=ckpt), model_fn=TinyLM)
    other = _config(tmp_path, steps=4, checkpoint=ckpt, seed=1)
    with pytest.raises(Exception, match=r"written with seed=0, but this run has seed=1"):
        train(other, model_fn=TinyLM)


# ---------------------------------------------------------------------------- multi-process


def _multiprocess_worker(out_dir: str, process_id: int, num_processes: int, port: int) -> None:
    from jax.experimental import multihost_utils

    distributed = (
        DistributedConfig(f"localhost:{port}", num_processes, process_id)
        if num_processes > 1
        else DistributedConfig()
    )
    config = TrainConfig(
        task=ByteCorpusLM(seq_len=16),
        optim=OptimConfig(learning_rate=1e-2, warmup_steps=0, decay_steps=40, eps=1e-4),
        steps=3,
        global_batch=4,
        mesh=MeshConfig(data=1, fsdp=num_processes),  # parameters split across processes
        distributed=distributed,
        log_every=1,
        eval_batches=1,
        metrics_path=str(pathlib.Path(out_dir) / "metrics.jsonl"),
        checkpoint=CheckpointConfig(str(pathlib.Path(out_dir) / "ckpt"), save_every=3),
    )
    result = train(config, model_fn=TinyLM)
    params = multihost_utils.process_allgather(nnx.state(result.model, nnx.Param), tiled=True)
    if process_id == 0:
        flat = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(pathlib.Path(out_dir) / "params.npz", **flat)
        specs = {
            jax.tree_util.keystr(p): str(x.sharding.spec)
            for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(result.model, nnx.Param))
        }
        info = {"process_count": jax.process_count(), "devices": jax.device_count(), "specs": specs}
        (pathlib.Path(out_dir) / "info.json").write_text(json.dumps(info))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_agree_with_one_process(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    multi, single = tmp_path / "multi", tmp_path / "single"
    runs = [(multi, pid, 2) for pid in range(2)] + [(single, 0, 1)]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(out), str(pid), str(n), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for out, pid, n in runs
    ]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out.decode()
    info = json.loads((multi / "info.json").read_text())
    assert info["process_count"] == 2 and info["devices"] == 2
    head_spec = info["specs"]["['head']['kernel'].value"]
    assert head_spec == str(jax.sharding.PartitionSpec(None, "fsdp"))
    multi_records, single_records = (
        _records(multi / "metrics.jsonl"),
        _records(single / "metrics.jsonl"),
    )
    # Only process 0 writes metrics: 3 train records and one eval.
    assert [r["step"] for r in multi_records if r["split"] == "train"] == [1, 2, 3]
    for a, b in zip(multi_records, single_records, strict=True):
        assert a["split"] == b["split"] and a["step"] == b["step"]
        # Float32 means over 4 x 16 positions summed in another order: a few ulps.
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-6)
    with Checkpointer(CheckpointConfig(str(multi / "ckpt")), read_only=True) as ckpt:
        assert ckpt.all_steps() == [3]
    a, b = (dict(np.load(out / "params.npz")) for out in (multi, single))
    assert sorted(a) == sorted(b)
    # Three AdamW steps with eps = 1e-4: each moves a parameter by lr * m / (sqrt(v) + eps),
    # whose derivative in the gradient is at most lr / eps; float32 gradient sums differ
    # between layouts by <~ 1e-8, so atol = 3 * lr * 1e-8 / eps = 3e-6, plus 4 ulps.
    chex.assert_trees_all_close(a, b, rtol=4 * 2**-23, atol=3e-6)


if __name__ == "__main__":
    _multiprocess_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))

"""Non-finite steps: skipped with the state bitwise unchanged, counted, and N in a row stop.

The fault is injected through the data: ``PoisonedLDS`` sets the inputs of chosen train
batches to NaN, so the loss and the gradients of exactly those steps are NaN.
"""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from spectral_jax.data.tasks import Batch, LDSRegression
from spectral_jax.train import (
    CheckpointConfig,
    Checkpointer,
    CheckpointError,
    NonFiniteLossError,
    OptimConfig,
    TrainConfig,
    train,
)
from spectral_jax.train.checkpoint import abstract_like
from spectral_jax.train.optim import make_optimizer

LDS = LDSRegression(seq_len=8, d_input=2, d_output=2, state_dim=4)
OPTIM = OptimConfig(learning_rate=1e-2, warmup_steps=4, decay_steps=20)


@dataclasses.dataclass(frozen=True)
class PoisonedLDS:
    """``LDS`` whose train batches at the 0-based ``poisoned`` indices have NaN inputs (the
    loop's record of batch ``i`` is step ``i + 1``)."""

    poisoned: tuple[int, ...]
    kind = "regression"

    @property
    def seq_len(self) -> int:
        return LDS.seq_len

    @property
    def d_output(self) -> int:
        return LDS.d_output

    def batch(self, seed: int, step: int, rows, split="train") -> Batch:
        batch = LDS.batch(seed, step, rows, split)
        if split == "train" and step in self.poisoned:
            return batch._replace(inputs=np.full_like(batch.inputs, np.nan))
        return batch

    def eval_metrics(self, mean_loss: float) -> dict[str, float]:
        return LDS.eval_metrics(mean_loss)

    def text_tokenizer(self) -> None:
        return None


def _model(rngs: nnx.Rngs) -> nnx.Module:
    return nnx.Linear(LDS.d_input, LDS.d_output, rngs=rngs)  # [B, L, d_in] -> [B, L, d_out]


def _config(tmp_path, poisoned, **overrides) -> TrainConfig:
    base = dict(
        task=PoisonedLDS(poisoned),
        optim=OPTIM,
        steps=6,
        global_batch=2,
        log_every=1,
        eval_batches=0,
        metrics_path=str(tmp_path / "metrics.jsonl"),
        checkpoint=CheckpointConfig(str(tmp_path / "ckpt"), save_every=1, keep=10),
    )
    return TrainConfig(**{**base, **overrides})


def _records(path) -> list[dict]:
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def _saved(directory) -> dict[int, tuple[dict, dict, dict]]:
    """Every checkpoint in ``directory``: ``{step: (params, optimizer state, meta)}``."""
    model = _model(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, make_optimizer(OPTIM), wrt=nnx.Param)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    pure = [nnx.to_pure_dict(nnx.state(node)) for node in (model, optimizer)]
    abstract = [abstract_like(tree, jax.tree.map(lambda _: sharding, tree)) for tree in pure]
    with Checkpointer(CheckpointConfig(directory), read_only=True) as ckpt:
        return {step: ckpt.restore(*abstract, step=step) for step in ckpt.all_steps()}


def _assert_bitwise_equal(a, b) -> None:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), strict=True)


def _all_finite(tree) -> bool:
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def test_a_nan_batch_is_skipped_with_the_state_bitwise_unchanged_and_training_continues(
    tmp_path,
):
    config = _config(tmp_path, poisoned=(2,))  # step 3
    result = train(config, model_fn=_model)
    saved = _saved(config.checkpoint.directory)
    assert sorted(saved) == [1, 2, 3, 4, 5, 6]
    (params_2, opt_2, _), (params_3, opt_3, meta_3) = saved[2], saved[3]
    _assert_bitwise_equal(params_3, params_2)  # the optimizer's step counter included
    _assert_bitwise_equal(opt_3, opt_2)
    assert meta_3["nonfinite"] == {"in_a_row": 1, "skipped_total": 1}
    assert saved[4][2]["nonfinite"] == {"in_a_row": 0, "skipped_total": 1}
    assert not np.array_equal(saved[4][0]["kernel"], params_3["kernel"])  # it trains on
    assert all(_all_finite(params) and _all_finite(opt) for params, opt, _ in saved.values())

    train_records = {r["step"]: r for r in result.history if r["split"] == "train"}
    assert [train_records[s]["skipped"] for s in range(1, 7)] == [0, 0, 1, 0, 0, 0]
    assert [train_records[s]["skipped_total"] for s in range(1, 7)] == [0, 0, 1, 1, 1, 1]
    assert np.isnan(train_records[3]["loss"]) and np.isnan(train_records[3]["grad_norm"])
    assert all(np.isfinite(train_records[s]["loss"]) for s in (1, 2, 4, 5, 6))
    # A skipped step does not advance the schedule: step 4 gets the rate step 3 would have had.
    rates = [train_records[s]["learning_rate"] for s in range(1, 7)]
    assert rates[3] == rates[2] != rates[1]
    events = [r for r in _records(config.metrics_path) if r.get("event") == "skipped_step"]
    assert len(events) == 1 and events[0]["step"] == 3 and events[0]["in_a_row"] == 1
    assert np.isnan(events[0]["loss"])
    assert _all_finite(nnx.state(result.model))


def test_n_skipped_steps_in_a_row_stop_the_run_even_across_a_resume(tmp_path):
    # Steps 3 and 4 are poisoned; 2 in a row stop the run. The first invocation ends at step 3
    # (skipped, saved with its count); the resumed one stops at step 4, as one run would.
    config = _config(tmp_path, poisoned=(2, 3), stop_after_nonfinite_steps=2, steps=3)
    first = train(config, model_fn=_model)
    assert [r["skipped"] for r in first.history] == [0, 0, 1]
    with pytest.raises(NonFiniteLossError, match=r"step 4: non-finite .*loss=nan") as info:
        train(dataclasses.replace(config, steps=6), model_fn=_model)
    message = str(info.value)
    assert "2 skipped step(s) in a row, stop_after_nonfinite_steps=2" in message
    assert f"last good checkpoint is step 3 in {config.checkpoint.directory}" in message
    saved = _saved(config.checkpoint.directory)
    assert sorted(saved) == [1, 2, 3]  # step 4 is never saved
    _assert_bitwise_equal(saved[3][:2], saved[2][:2])
    assert all(_all_finite(params) and _all_finite(opt) for params, opt, _ in saved.values())
    records = _records(config.metrics_path)
    assert [r["step"] for r in records if r.get("event") == "skipped_step"] == [3, 4]
    assert [r["step"] for r in records if r.get("event") == "non_finite"] == [4]
    assert [r["step"] for r in records if r.get("split") == "train"] == [1, 2, 3, 4]


def test_parameters_made_non_finite_by_an_applied_update_stop_at_once(tmp_path):
    # An infinite learning rate: the loss and gradients of step 1 are finite, so the update is
    # applied, and it leaves the parameters non-finite.
    optim = OptimConfig(learning_rate=float("inf"), warmup_steps=0, decay_steps=20)
    config = _config(tmp_path, poisoned=(), optim=optim)
    with pytest.raises(NonFiniteLossError, match=r"step 1: .*parameters finite=False") as info:
        train(config, model_fn=_model)
    assert "an applied update made the parameters non-finite" in str(info.value)
    assert "no checkpoint was saved" in str(info.value)
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        Checkpointer(CheckpointConfig(config.checkpoint.directory), read_only=True)

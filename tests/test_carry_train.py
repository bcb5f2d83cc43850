"""Carried-state training in the loop (``TrainConfig.carry_windows``, ``init_from``).

* ``stream_window``: window ``k + 1`` of a row continues where window ``k`` ended, and one window
  is the task's ``batch``.
* A post-training phase of a distilled checkpoint: ``train`` with ``init_from`` and
  ``carry_windows=2``. Its first update has learning rate 0 (warmup), so both steps' losses are
  those of the checkpoint's model; they equal the two halves of one forward pass over the
  group's whole stream: the loop serves consecutive windows and carries the caches. Its
  checkpoints load as distilled, with updated weights. Bad settings name what to change.
"""

import dataclasses
import itertools

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from spectral_jax.apps.inference import distill_checkpoint
from spectral_jax.data.lm_tasks import ByteCorpusLM
from spectral_jax.nn.model import ModelConfig
from spectral_jax.train import (
    CheckpointConfig,
    CheckpointError,
    OptimConfig,
    TrainConfig,
    load_for_inference,
    train,
)

L = 16
TASK = ByteCorpusLM(seq_len=L)
MODEL = ModelConfig(
    d_model=16, num_layers=2, max_len=L, vocab_size=256, num_filters=4, layer_pattern="SA",
    num_heads=2, window=5, stu_projection="tensordot",
)  # fmt: skip


def test_stream_windows_continue_each_other():
    rows = [0, 3]
    np.testing.assert_array_equal(
        TASK.stream_window(7, 5, 0, 1, rows).inputs, TASK.batch(7, 5, rows).inputs
    )
    windows = [TASK.stream_window(7, 5, k, 3, rows) for k in range(3)]
    for before, after in itertools.pairwise(windows):
        np.testing.assert_array_equal(before.targets[:, :-1], before.inputs[:, 1:])
        np.testing.assert_array_equal(after.inputs[:, 0], before.targets[:, -1])
    with pytest.raises(ValueError, match="window"):
        TASK.stream_window(7, 5, 3, 3, rows)


def run(tmp_path, name, **changes) -> TrainConfig:
    optim = OptimConfig(learning_rate=1e-2, warmup_steps=4, decay_steps=10)
    checkpoint = CheckpointConfig(str(tmp_path / name), save_every=2)
    fields = dict(task=TASK, model=MODEL, optim=optim, steps=1, global_batch=2, eval_batches=0,
                  log_every=1, checkpoint=checkpoint)  # fmt: skip
    return TrainConfig(**{**fields, **changes})


def test_carried_post_training_of_a_distilled_checkpoint(tmp_path):
    train(run(tmp_path, "trained"))
    distill_checkpoint(str(tmp_path / "trained"), str(tmp_path / "distilled"), num_states=L)
    config = run(tmp_path, "post", steps=2, carry_windows=2, init_from=str(tmp_path / "distilled"))
    losses = [r["loss"] for r in train(config).history if r["split"] == "train"]

    start, _ = load_for_inference(str(tmp_path / "distilled"))
    halves = [TASK.stream_window(config.seed, 0, k, 2, [0, 1]) for k in range(2)]
    inputs = np.concatenate([h.inputs for h in halves], axis=1)  # [2, 2L]: the group's streams
    targets = np.concatenate([h.targets for h in halves], axis=1)
    logits = jax.jit(lambda m, x: m(x))(start, inputs)
    per_position = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
    want = [per_position[:, :L].mean(), per_position[:, L:].mean()]
    # Budget: float32; the carried window's outputs differ from the one pass by ~1e-6 of the
    # logit scale (tests/test_carry_state.py), the mean of 32 cross-entropies of ~log(256) by
    # a few eps32 more: 1e-5 relative
    np.testing.assert_allclose(losses, want, rtol=1e-5)

    after, meta = load_for_inference(str(tmp_path / "post"))
    assert meta["step"] == 2 and meta["distill"]["num_states"] == L
    assert meta["data"]["carry_windows"] == 2
    moved = jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
        nnx.state(after, nnx.Param), nnx.state(start, nnx.Param),
    )  # fmt: skip
    assert max(jax.tree.leaves(moved)) > 0  # the second update (learning rate > 0) trained it

    # resuming with another data stream is refused, naming the setting
    with pytest.raises(CheckpointError, match="carry_windows=2"):
        train(dataclasses.replace(config, steps=4, carry_windows=1))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"steps": 3}, "steps=3 must be a multiple"),
        ({"microbatches": 2}, "microbatches=1"),
        ({"model": dataclasses.replace(MODEL, layer_pattern="S")}, "max_len=16"),
    ],
    ids=["steps", "microbatches", "stu_length_limit"],
)
def test_bad_carry_settings_name_the_fix(tmp_path, changes, match):
    with pytest.raises(ValueError, match=match):
        train(
            run(tmp_path, "bad", **{"steps": 2, "carry_windows": 2, "checkpoint": None, **changes})
        )

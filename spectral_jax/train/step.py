"""Pure train and eval steps over split nnx state, jitted with shardings and donation.

The model and the optimizer are split once into (graphdef, state); the jitted steps
take and return the states, so XLA owns the buffers (``donate_argnums``) and the
output shardings are pinned to the FSDP layout of the inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from spectral_jax.data.tasks import Batch
from spectral_jax.train.carry import stop_cache


def per_position_loss(outputs, targets, kind: str):
    """Loss at each position.

    outputs: [B, L, V] logits (``kind="tokens"``) or [B, L, D] predictions
    (``kind="regression"``); targets: [B, L] int or [B, L, D]. Returns [B, L] float32.
    """
    outputs = outputs.astype(jnp.float32)
    if kind == "tokens":
        return optax.softmax_cross_entropy_with_integer_labels(outputs, targets)
    if kind == "regression":
        return jnp.mean(jnp.square(outputs - targets), axis=-1)
    raise ValueError(f"kind must be 'tokens' or 'regression', got {kind!r}")


def masked_mean(values, mask):
    """sum(values * mask) / sum(mask); values, mask: [B, L]."""
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def split_microbatches(batch: Batch, microbatches: int) -> Batch:
    """``[B, ...] -> [m, B / m, ...]``: microbatch ``j`` holds rows ``j, m + j, 2m + j, ...``.

    Interleaved rows keep every microbatch spread over all batch shards: each device holds a
    contiguous block of rows, and takes its share of every microbatch from it.
    """
    rows = batch.inputs.shape[0]
    if rows % microbatches:
        raise ValueError(f"a batch of {rows} rows does not split into {microbatches} microbatches")
    return jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape(rows // microbatches, microbatches, *x.shape[1:]), 0, 1),
        batch,
    )


def loss_and_grads(model: nnx.Module, batch: Batch, kind: str, microbatches: int = 1):
    """The masked-mean loss of ``batch`` and its gradient in the model's ``nnx.Param``s.

    Gradients are accumulated over ``microbatches`` slices (``split_microbatches``) by a
    ``lax.scan``, so only one microbatch's activations are alive at a time. Every slice's
    summed loss is divided by the weight ``sum(mask)`` of the *whole* batch, so the sum over
    slices is the full-batch masked mean and its gradient, up to round-off, whatever the
    number of counted positions per slice. Non-parameter state that the model's call updates
    (counters, RNG streams) is threaded through the slices and written back to ``model``.
    Returns ``(loss, grads)`` with ``grads`` an ``nnx.State`` like ``nnx.state(model,
    nnx.Param)``.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    weight = jnp.maximum(jnp.sum(batch.mask), 1.0)

    def slice_loss(params, rest, micro: Batch):
        module = nnx.merge(graphdef, params, rest, copy=True)
        outputs = module(micro.inputs)
        loss = jnp.sum(per_position_loss(outputs, micro.targets, kind) * micro.mask) / weight
        return loss, nnx.state(module, nnx.Not(nnx.Param))  # state the call updated

    def accumulate(carry, micro: Batch):
        loss, grads, rest = carry
        (micro_loss, rest), micro_grads = jax.value_and_grad(slice_loss, has_aux=True)(
            params, rest, micro
        )
        return (loss + micro_loss, jax.tree.map(jnp.add, grads, micro_grads), rest), None

    zeros = (jnp.zeros((), weight.dtype), jax.tree.map(jnp.zeros_like, params), rest)
    (loss, grads, rest), _ = jax.lax.scan(
        accumulate, zeros, split_microbatches(batch, microbatches)
    )
    nnx.update(model, rest)
    return loss, grads


def carried_loss_and_grads(model: nnx.Module, batch: Batch, cache, kind: str):
    """Loss and gradients of one window that continues from ``cache``.

    batch: inputs ``[B, T]`` (or ``[B, T, d_input]``), targets, mask ``[B, T]``; cache: the
    ``ModelCache`` of the ``B`` streams before this window (``model.init_cache(B)`` at a
    stream's start). The loss is the masked mean of ``per_position_loss`` over ``model.prefill``'s
    outputs, whose gradient in the model's ``nnx.Param``s does not reach ``cache`` or what made
    it. Non-parameter state the prefill updates is written back to ``model``. Returns ``(loss,
    grads, new_cache)``: ``grads`` like ``nnx.state(model, nnx.Param)``, ``new_cache`` the
    caches after this window (gradient stopped) for the next one.
    """
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    start = stop_cache(cache)

    def window_loss(params):
        module = nnx.merge(graphdef, params, rest, copy=True)
        outputs, new_cache = module.prefill(batch.inputs, cache=start)
        loss = masked_mean(per_position_loss(outputs, batch.targets, kind), batch.mask)
        return loss, (new_cache, nnx.state(module, nnx.Not(nnx.Param)))

    (loss, (new_cache, rest)), grads = jax.value_and_grad(window_loss, has_aux=True)(params)
    nnx.update(model, rest)
    return loss, grads, stop_cache(new_cache)


def make_train_step(
    model_graphdef,
    optimizer_graphdef,
    kind: str,
    schedule: optax.Schedule,
    shardings: tuple,
    microbatches: int = 1,
    carry: bool = False,
):
    """``step(model_state, opt_state, batch) -> (model_state, opt_state, metrics)``, or with
    ``carry``: ``step(model_state, opt_state, batch, cache) -> (model_state, opt_state, metrics,
    cache)``, the window continuing from the ``ModelCache`` that the stream's previous window
    left (``carried_loss_and_grads``; one microbatch only). The cache is not sharded: every
    device holds all of it.

    ``shardings = (model, optimizer, batch, replicated)``. The gradient of the whole batch is
    accumulated over ``microbatches`` slices (``loss_and_grads``), then applied in one
    optimizer update. Metrics (replicated scalars): ``loss`` (before the update),
    ``grad_norm`` (before clipping), ``learning_rate`` (used by this update), ``skipped``
    (the loss or the gradients were not finite, so the update was not applied) and
    ``params_finite`` (the returned parameters are all finite).

    A skipped step returns the parameters and the whole optimizer state bitwise unchanged: the
    new and old states are selected between on device (``jnp.where``), so the step stays one
    program and the donated inputs are only read. The optimizer's step counter is part of that
    state, so a skipped step does not advance the learning-rate schedule, which counts applied
    updates (warmup is not spent on steps that changed nothing); the loop's step, and with it
    the batch, advances either way. The model's other state (RNG streams, counters) advances
    with the consumed batch, so the next step draws fresh randomness. ``optax.apply_if_finite``
    is not used: it looks at the gradients only (not the loss), it applies the non-finite
    update once its ``max_consecutive_errors`` are spent (the loop stops instead, see
    ``TrainConfig.stop_after_nonfinite_steps``), and ``nnx.Optimizer``'s own step counter
    would still advance past the skipped steps.
    """
    model_sharding, opt_sharding, batch_sharding, replicated = shardings
    if carry and microbatches != 1:
        raise ValueError(
            f"carried-state training runs each window in one piece, got microbatches="
            f"{microbatches}; set microbatches=1 (or a smaller global_batch)"
        )

    def train_step(model_state, opt_state, batch: Batch, cache=None):
        model = nnx.merge(model_graphdef, model_state, copy=True)
        optimizer = nnx.merge(optimizer_graphdef, opt_state, copy=True)
        model.train()
        if carry:
            loss, grads, new_cache = carried_loss_and_grads(model, batch, cache, kind)
        else:
            loss, grads = loss_and_grads(model, batch, kind, microbatches)
        learning_rate = schedule(optimizer.step[...])
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        optimizer.update(model, grads)
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        old_params = nnx.filter_state(model_state, nnx.Param)  # merged copies left it intact
        nnx.update(model, jax.tree.map(keep, nnx.state(model, nnx.Param), old_params))
        new_opt_state = jax.tree.map(keep, nnx.state(optimizer), opt_state)
        params = jax.tree.leaves(nnx.state(model, nnx.Param))
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in params]))
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": jnp.asarray(learning_rate, jnp.float32),
            "skipped": ~ok,
            "params_finite": finite,
        }
        if carry:  # a skipped window is not carried: the next continues from the one before
            cache = jax.tree.map(keep, new_cache, cache)
            return nnx.state(model), new_opt_state, metrics, cache
        return nnx.state(model), new_opt_state, metrics

    batch_shardings = Batch(*[batch_sharding] * 3)
    if carry:
        return jax.jit(
            train_step,
            in_shardings=(model_sharding, opt_sharding, batch_shardings, replicated),
            out_shardings=(model_sharding, opt_sharding, replicated, replicated),
            donate_argnums=(0, 1, 3),
        )
    return jax.jit(
        train_step,
        in_shardings=(model_sharding, opt_sharding, batch_shardings),
        out_shardings=(model_sharding, opt_sharding, replicated),
        donate_argnums=(0, 1),
    )


def make_eval_step(model_graphdef, kind: str, shardings: tuple, microbatches: int = 1):
    """``step(model_state, batch) -> sums``: loss, weight (and correct tokens) summed.

    The batch runs in ``microbatches`` slices (``split_microbatches``), like the train step,
    so evaluation needs no more activation memory than training.
    """
    model_sharding, batch_sharding, replicated = shardings

    def eval_step(model_state, batch: Batch):
        model = nnx.merge(model_graphdef, model_state)
        model.eval()
        graphdef, state = nnx.split(model)

        def add_slice(sums, micro: Batch):
            outputs = nnx.merge(graphdef, state, copy=True)(micro.inputs)
            losses = per_position_loss(outputs, micro.targets, kind)
            new = {"loss": jnp.sum(losses * micro.mask), "weight": jnp.sum(micro.mask)}
            if kind == "tokens":
                correct = jnp.argmax(outputs, axis=-1) == micro.targets
                new["correct"] = jnp.sum(correct * micro.mask)
            return jax.tree.map(jnp.add, sums, new), None

        names = ("loss", "weight", "correct") if kind == "tokens" else ("loss", "weight")
        zeros = {name: jnp.zeros((), batch.mask.dtype) for name in names}
        sums, _ = jax.lax.scan(add_slice, zeros, split_microbatches(batch, microbatches))
        return sums

    return jax.jit(
        eval_step,
        in_shardings=(model_sharding, Batch(*[batch_sharding] * 3)),
        out_shardings=replicated,
    )

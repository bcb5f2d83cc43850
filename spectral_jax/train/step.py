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

from spectral_jax.train.data import Batch


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


def make_train_step(
    model_graphdef,
    optimizer_graphdef,
    kind: str,
    schedule: optax.Schedule,
    shardings: tuple,
):
    """``step(model_state, opt_state, batch) -> (model_state, opt_state, metrics)``.

    ``shardings = (model, optimizer, batch, replicated)``. Metrics (replicated scalars):
    ``loss`` (before the update), ``grad_norm`` (before clipping), ``learning_rate``
    (used by this update), ``params_finite`` (the updated parameters are all finite).
    """
    model_sharding, opt_sharding, batch_sharding, replicated = shardings

    def train_step(model_state, opt_state, batch: Batch):
        model = nnx.merge(model_graphdef, model_state)
        optimizer = nnx.merge(optimizer_graphdef, opt_state)
        model.train()

        def loss_fn(model):
            outputs = model(batch.inputs)
            return masked_mean(per_position_loss(outputs, batch.targets, kind), batch.mask)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        learning_rate = schedule(optimizer.step[...])
        grad_norm = optax.tree.norm(grads)
        optimizer.update(model, grads)
        params = jax.tree.leaves(nnx.state(model, nnx.Param))
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in params]))
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": jnp.asarray(learning_rate, jnp.float32),
            "params_finite": finite,
        }
        return nnx.state(model), nnx.state(optimizer), metrics

    return jax.jit(
        train_step,
        in_shardings=(model_sharding, opt_sharding, Batch(*[batch_sharding] * 3)),
        out_shardings=(model_sharding, opt_sharding, replicated),
        donate_argnums=(0, 1),
    )


def make_eval_step(model_graphdef, kind: str, shardings: tuple):
    """``step(model_state, batch) -> sums``: loss, weight (and correct tokens) summed."""
    model_sharding, batch_sharding, replicated = shardings

    def eval_step(model_state, batch: Batch):
        model = nnx.merge(model_graphdef, model_state)
        model.eval()
        outputs = model(batch.inputs)
        losses = per_position_loss(outputs, batch.targets, kind)
        sums = {"loss": jnp.sum(losses * batch.mask), "weight": jnp.sum(batch.mask)}
        if kind == "tokens":
            correct = jnp.argmax(outputs, axis=-1) == batch.targets
            sums["correct"] = jnp.sum(correct * batch.mask)
        return sums

    return jax.jit(
        eval_step,
        in_shardings=(model_sharding, Batch(*[batch_sharding] * 3)),
        out_shardings=replicated,
    )

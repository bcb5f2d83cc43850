"""The training loop: ``train(TrainConfig) -> TrainResult``.

One code path for every device layout: the model and optimizer are initialised
directly in their FSDP shardings (``jax.jit`` with ``out_shardings``), each process
generates only its rows of every batch, and the jitted step donates the old state.

Resume is exact: batches are a pure function of ``(seed, step, row)``, so restoring
the model state (including any RNG streams), the optimizer state and the step from
the latest complete checkpoint replays the uninterrupted run. A non-finite loss,
gradient norm or parameter stops the run with ``NonFiniteLossError``; nothing is
saved from that point on, so the last checkpoint stays good.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from spectral_jax.train import sharding as shd
from spectral_jax.train.checkpoint import (
    CheckpointConfig,
    Checkpointer,
    CheckpointError,
    abstract_like,
)
from spectral_jax.train.data import ByteCorpusLM, Task
from spectral_jax.train.metrics import MetricsLogger
from spectral_jax.train.optim import OptimConfig, learning_rate_schedule, make_optimizer
from spectral_jax.train.step import make_eval_step, make_train_step

ModelFn = Callable[[nnx.Rngs], nnx.Module]


class NonFiniteLossError(FloatingPointError):
    """The loss, gradient norm or parameters became NaN/inf during training."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run. ``model`` is a ``spectral_jax.nn.model.ModelConfig``."""

    task: Task
    model: Any = None
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    steps: int = 1000
    global_batch: int = 8
    seed: int = 0  # model initialisation and data stream
    mesh: shd.MeshConfig = dataclasses.field(default_factory=shd.MeshConfig)
    distributed: shd.DistributedConfig = dataclasses.field(default_factory=shd.DistributedConfig)
    checkpoint: CheckpointConfig | None = None
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only after the last step
    eval_batches: int = 4
    metrics_path: str | None = None  # JSONL file, appended to
    tensorboard_dir: str | None = None

    def __post_init__(self):
        for name in ("steps", "global_batch", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("seed", "eval_every", "eval_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if getattr(self.task, "kind", None) not in ("tokens", "regression"):
            raise ValueError(
                f"task must be one of the tasks in spectral_jax.train.data, got {self.task!r}"
            )


@dataclasses.dataclass
class TrainResult:
    model: nnx.Module
    step: int
    history: list[dict[str, Any]]  # every train and eval record of this invocation


def _describe(obj) -> Any:
    if dataclasses.is_dataclass(obj):
        return {"type": type(obj).__name__, **dataclasses.asdict(obj)}
    return None if obj is None else repr(obj)


def run_record(config: TrainConfig) -> dict[str, Any]:
    """The JSON-able description of a run stored in every checkpoint."""
    record = {
        "task": _describe(config.task),
        "model": _describe(config.model),
        "optim": _describe(config.optim),
        "seed": config.seed,
        "global_batch": config.global_batch,
        "steps": config.steps,
    }
    return json.loads(json.dumps(record))


_MUST_MATCH_ON_RESUME = ("task", "model", "seed", "global_batch")


def _check_resumable(saved: dict[str, Any], current: dict[str, Any], directory: str) -> None:
    for key in _MUST_MATCH_ON_RESUME:
        if saved.get(key) != current[key]:
            raise CheckpointError(
                f"the checkpoints in {directory} were written with {key}={saved.get(key)!r}, "
                f"but this run has {key}={current[key]!r}; use another checkpoint directory "
                f"or restore the original {key}"
            )


def _default_model_fn(config: TrainConfig) -> ModelFn:
    if config.model is None:
        raise ValueError("config.model is None: give a ModelConfig or pass model_fn")
    from spectral_jax.nn.model import SpectralModel

    return lambda rngs: SpectralModel(config.model, rngs=rngs)


def _check_output_shape(model_graphdef, model_abstract, task: Task, global_batch: int) -> None:
    inputs = task.batch(0, 0, [0]).inputs
    spec = jax.ShapeDtypeStruct((global_batch, *inputs.shape[1:]), inputs.dtype)
    out = jax.eval_shape(lambda s, x: nnx.merge(model_graphdef, s)(x), model_abstract, spec)
    width = task.vocab_size if task.kind == "tokens" else task.d_output
    expected = (global_batch, task.seq_len, width)
    if tuple(out.shape) != expected:
        raise ValueError(
            f"the model maps inputs {spec.shape} to {tuple(out.shape)}, but the task "
            f"{type(task).__name__} needs {expected}; match the model's output size to the task"
        )


def train(config: TrainConfig, *, model_fn: ModelFn | None = None) -> TrainResult:
    """Train (or resume) per ``config``; returns the final model and the records.

    ``model_fn(rngs) -> nnx.Module`` overrides building ``SpectralModel(config.model)``.
    """
    shd.initialize_distributed(config.distributed)
    mesh = shd.make_mesh(config.mesh)
    shd.check_global_batch(config.global_batch, mesh)
    model_fn = model_fn or _default_model_fn(config)
    task, seed = config.task, config.seed
    tx = make_optimizer(config.optim)

    def init():
        model = model_fn(nnx.Rngs(seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    abstract_model, abstract_opt = nnx.eval_shape(init)
    model_def, model_abstract = nnx.split(abstract_model)
    opt_def, opt_abstract = nnx.split(abstract_opt)
    _check_output_shape(model_def, model_abstract, task, config.global_batch)
    model_sh = shd.state_shardings(model_abstract, mesh)
    opt_sh = shd.state_shardings(opt_abstract, mesh)
    replicated, batch_sh = shd.replicated(mesh), shd.batch_sharding(mesh)

    def init_states():
        model, optimizer = init()
        return nnx.state(model), nnx.state(optimizer)

    model_state, opt_state = jax.jit(init_states, out_shardings=(model_sh, opt_sh))()

    record = run_record(config)
    primary = jax.process_index() == 0
    logger = MetricsLogger(
        config.metrics_path, config.steps, primary=primary, tensorboard_dir=config.tensorboard_dir
    )
    ckpt = Checkpointer(config.checkpoint) if config.checkpoint is not None else None
    start = 0
    if ckpt is not None and ckpt.latest_step() is not None:
        start = ckpt.latest_step()
        _check_resumable(ckpt.restore_meta(start)["run"], record, ckpt.directory)
        model_pure, opt_pure, _ = ckpt.restore(
            abstract_like(nnx.to_pure_dict(model_abstract), nnx.to_pure_dict(model_sh)),
            abstract_like(nnx.to_pure_dict(opt_abstract), nnx.to_pure_dict(opt_sh)),
            step=start,
        )
        nnx.replace_by_pure_dict(model_state, model_pure)
        nnx.replace_by_pure_dict(opt_state, opt_pure)
        logger.log({"event": "resume", "step": start, "directory": ckpt.directory}, echo=False)
        if primary:
            print(f"resumed from step {start} in {ckpt.directory}", flush=True)

    schedule = learning_rate_schedule(config.optim)
    train_step = make_train_step(
        model_def, opt_def, task.kind, schedule, (model_sh, opt_sh, batch_sh, replicated)
    )
    eval_step = make_eval_step(model_def, task.kind, (model_sh, batch_sh, replicated))
    rows = shd.process_rows(config.global_batch, mesh)
    tokens_per_step = config.global_batch * task.seq_len
    history: list[dict[str, Any]] = []

    def evaluate(step: int) -> dict[str, Any]:
        sums: dict[str, float] = {}
        for index in range(config.eval_batches):
            batch = shd.place_batch(
                task.batch(seed, index, rows, "eval"), mesh, config.global_batch
            )
            for key, value in jax.device_get(eval_step(model_state, batch)).items():
                sums[key] = sums.get(key, 0.0) + float(value)
        out = {"split": "eval", "step": step, "loss": sums["loss"] / max(sums["weight"], 1.0)}
        if "correct" in sums:
            out["accuracy"] = sums["correct"] / max(sums["weight"], 1.0)
        if isinstance(task, ByteCorpusLM):
            out["bits_per_byte"] = out["loss"] / math.log(2)
        return out

    pending: list[tuple[int, dict]] = []
    clock = (time.perf_counter(), start)

    def flush(done: int) -> None:
        nonlocal clock
        host = jax.device_get([m for _, m in pending])
        now = time.perf_counter()
        elapsed, steps_run = now - clock[0], done - clock[1]
        clock = (now, done)
        for (step, _), metrics in zip(pending, host, strict=True):
            values = {k: float(v) for k, v in metrics.items() if k != "params_finite"}
            bad = not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"]))
            if bad or not bool(metrics["params_finite"]):
                _stop_non_finite(step, values, bool(metrics["params_finite"]), ckpt, logger)
            history.append({"split": "train", "step": step, **values})
        pending.clear()
        last = history[-1]
        last["tokens_per_s"] = tokens_per_step * steps_run / max(elapsed, 1e-9)
        last["eta_s"] = (config.steps - done) * elapsed / max(steps_run, 1)
        for entry in history[len(history) - len(host) :]:
            logger.log(entry, echo=entry is last)

    try:
        for step in range(start, config.steps):
            local = task.batch(seed, step, rows, "train")
            batch = shd.place_batch(local, mesh, config.global_batch)
            model_state, opt_state, metrics = train_step(model_state, opt_state, batch)
            done = step + 1
            pending.append((done, metrics))
            last = done == config.steps
            save = ckpt is not None and (done % config.checkpoint.save_every == 0 or last)
            if save or last or done % config.log_every == 0:
                flush(done)
            if save:
                meta = {"run": record, "data": {"seed": seed, "next_step": done}}
                ckpt.save(done, nnx.to_pure_dict(model_state), nnx.to_pure_dict(opt_state), meta)
            if config.eval_batches and (
                last or (config.eval_every and done % config.eval_every == 0)
            ):
                history.append(evaluate(done))
                logger.log(history[-1])
        if ckpt is not None:
            ckpt.wait()
    finally:
        if ckpt is not None:
            ckpt.close()
        logger.close()
    final_step = max(start, config.steps)
    return TrainResult(nnx.merge(model_def, model_state), final_step, history)


def _stop_non_finite(step, values, params_finite, ckpt, logger) -> None:
    what = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
    if ckpt is not None:
        ckpt.wait()
        steps = ckpt.all_steps()
        kept = (
            f"the last good checkpoint is step {steps[-1]} in {ckpt.directory}"
            if steps
            else f"no checkpoint was saved in {ckpt.directory}"
        )
    else:
        kept = "no checkpoint directory was configured"
    message = (
        f"training stopped at step {step}: non-finite values ({what}, "
        f"parameters finite={params_finite}); {kept}. Lower the learning rate, "
        "tighten grad_clip, or check the data for NaN/inf"
    )
    logger.log({"event": "non_finite", "step": step, "message": message}, echo=False)
    raise NonFiniteLossError(message)

"""The training loop: ``train(TrainConfig) -> TrainResult`` (restoring models for inference is
:mod:`spectral_jax.train.restore`).

One code path for every device layout: the model and optimizer are initialised
directly in their FSDP shardings (``jax.jit`` with ``out_shardings``), each process
generates only its rows of every batch, and the jitted step donates the old state.

Resume is exact: batches are a pure function of ``(seed, step, row)``, so restoring
the model state (including any RNG streams), the optimizer state and the step from
the latest complete checkpoint replays the uninterrupted run. The checkpoint may be
restored onto another mesh. A step whose loss or gradient norm is not finite is skipped
(``make_train_step``: parameters and optimizer state unchanged), logged and counted;
``TrainConfig.stop_after_nonfinite_steps`` of them in a row, or non-finite parameters after
an applied update, stop the run with ``NonFiniteLossError``. Metrics are checked before every
save, so nothing non-finite is ever saved and the last checkpoint stays good; the count of
skipped steps in a row is saved with each checkpoint, so a resumed run stops where the
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

import jax
from flax import nnx

from spectral_jax.data.lm_tasks import save_task_tokenizer
from spectral_jax.data.prefetch import prefetch
from spectral_jax.data.tasks import Task
from spectral_jax.train import sharding as shd
from spectral_jax.train.carry import check_carry_config
from spectral_jax.train.checkpoint import (
    Checkpointer,
    CheckpointError,
)
from spectral_jax.train.config import (
    ModelFn,
    TrainConfig,
    check_resumable,
    model_config_from_record,
    run_record,
    spectral_model_fn,
)
from spectral_jax.train.flops import peak_flops, train_flops_per_token
from spectral_jax.train.metrics import MetricsLogger
from spectral_jax.train.optim import learning_rate_schedule, make_optimizer
from spectral_jax.train.restore import abstract_pure, load_for_inference
from spectral_jax.train.step import make_eval_step, make_train_step


class NonFiniteLossError(FloatingPointError):
    """Too many non-finite steps in a row, or the parameters became NaN/inf, in training."""


@dataclasses.dataclass
class TrainResult:
    model: nnx.Module
    step: int
    history: list[dict[str, Any]]  # every train and eval record of this invocation


class _Layout(NamedTuple):
    """Graph definitions, abstract states and FSDP shardings of model and optimizer."""

    model_def: Any
    opt_def: Any
    model_abstract: Any
    opt_abstract: Any
    model_sh: Any
    opt_sh: Any


def _layout(init, mesh) -> _Layout:
    abstract_model, abstract_opt = nnx.eval_shape(init)
    model_def, model_abstract = nnx.split(abstract_model)
    opt_def, opt_abstract = nnx.split(abstract_opt)
    return _Layout(
        model_def,
        opt_def,
        model_abstract,
        opt_abstract,
        shd.state_shardings(model_abstract, mesh),
        shd.state_shardings(opt_abstract, mesh),
    )


def _check_output_shape(layout: _Layout, task: Task, global_batch: int) -> None:
    inputs = task.batch(0, 0, [0]).inputs
    spec = jax.ShapeDtypeStruct((global_batch, *inputs.shape[1:]), inputs.dtype)
    apply = lambda s, x: nnx.merge(layout.model_def, s)(x)  # noqa: E731
    out = jax.eval_shape(apply, layout.model_abstract, spec)
    # A token model's vocabulary may be padded past the tokenizer's (e.g. to a multiple of 64
    # so the embedding rows shard evenly): the padded ids are never targets.
    width = task.vocab_size if task.kind == "tokens" else task.d_output
    expected = (global_batch, task.seq_len, width)
    tokens = task.kind == "tokens"
    width_fits = out.shape[-1] >= width if tokens else out.shape[-1] == width
    if tuple(out.shape[:2]) != expected[:2] or not width_fits:
        padding = f" (or a vocabulary padded past {width})" if tokens else ""
        raise ValueError(
            f"the model maps inputs {spec.shape} to {tuple(out.shape)}, but the task "
            f"{type(task).__name__} needs {expected}{padding}; match the model's output size "
            "to the task"
        )


def _flops_per_token_over_peak(config: TrainConfig) -> float | None:
    """Model FLOPs per trained token divided by peak FLOP/s per device; None if unknown."""
    peak = config.peak_flops_per_device or peak_flops(jax.devices()[0].device_kind)
    if config.model is None or peak is None:
        return None
    rows = config.global_batch // config.microbatches  # rows of one forward call
    return train_flops_per_token(config.model, config.task.seq_len, rows) / peak


class _TrainLog:
    """Collects per-step device metrics, checks them, and logs them in batches.

    Metrics stay on device until ``flush`` (every ``log_every`` steps and before each
    save), so the host does not wait for every step. Throughput records carry
    ``tokens_per_s`` (global), ``tokens_per_s_per_device`` and, where the model's FLOPs and
    the device's peak are known, ``mfu`` (model FLOPs utilisation, see ``train.flops``).
    Every train record carries ``skipped`` (0 or 1) and ``skipped_total`` (over the whole run,
    resumes included); each skipped step also gets a ``{"event": "skipped_step"}`` record.
    ``nonfinite`` (``{"in_a_row", "skipped_total"}``) is what each checkpoint saves of them.
    """

    def __init__(
        self,
        logger: MetricsLogger,
        config: TrainConfig,
        ckpt: Checkpointer | None,
        nonfinite: dict[str, int],
    ):
        self.logger, self.config, self.ckpt = logger, config, ckpt
        self.nonfinite = dict(nonfinite)
        self.tokens_per_step = config.global_batch * config.task.seq_len
        self.flops_over_peak = _flops_per_token_over_peak(config)
        self.pending: list[tuple[int, dict]] = []
        self.history: list[dict[str, Any]] = []
        self.clock: tuple[float, int] | None = None

    def start_clock(self, done: int) -> None:
        """Throughput counts from here (after the first step, i.e. after compiling)."""
        jax.block_until_ready(self.pending[-1][1])
        self.clock = (time.perf_counter(), done)

    def flush(self, done: int) -> None:
        host = jax.device_get([metrics for _, metrics in self.pending])
        records = []
        for (step, _), metrics in zip(self.pending, host, strict=True):
            finite, skipped = bool(metrics.pop("params_finite")), bool(metrics.pop("skipped"))
            values = {k: float(v) for k, v in metrics.items()}
            count = self.nonfinite
            count["in_a_row"] = count["in_a_row"] + 1 if skipped else 0
            count["skipped_total"] += skipped
            if skipped:
                event = {"event": "skipped_step", "step": step, **values, **count}
                self.logger.log(event, echo=False)
            skip_counts = {"skipped": int(skipped), "skipped_total": count["skipped_total"]}
            records.append({"split": "train", "step": step, **values, **skip_counts})
            if count["in_a_row"] >= self.config.stop_after_nonfinite_steps or not finite:
                self._log(records)  # the records up to the stopping step's
                self._stop(step, values, finite)
        self.pending.clear()
        now = time.perf_counter()
        if self.clock is not None and done > self.clock[1]:
            elapsed, steps_run = now - self.clock[0], done - self.clock[1]
            tokens_per_s = self.tokens_per_step * steps_run / elapsed
            per_device = tokens_per_s / jax.device_count()
            records[-1]["tokens_per_s"] = tokens_per_s
            records[-1]["tokens_per_s_per_device"] = per_device
            if self.flops_over_peak is not None:
                records[-1]["mfu"] = per_device * self.flops_over_peak
            records[-1]["eta_s"] = (self.config.steps - done) * elapsed / steps_run
            self.clock = (now, done)
        self._log(records)

    def _log(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self.logger.log(record, echo=record is records[-1])
        self.history.extend(records)

    def _stop(self, step: int, values: dict[str, float], params_finite: bool) -> None:
        what = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
        if self.ckpt is None:
            kept = "no checkpoint directory was configured"
        else:
            self.ckpt.wait()
            steps = self.ckpt.all_steps()
            kept = (
                f"the last good checkpoint is step {steps[-1]} in {self.ckpt.directory}"
                if steps
                else f"no checkpoint was saved in {self.ckpt.directory}"
            )
        in_a_row = self.nonfinite["in_a_row"]
        why = (
            f"{in_a_row} skipped step(s) in a row, stop_after_nonfinite_steps="
            f"{self.config.stop_after_nonfinite_steps}"
            if params_finite
            else "an applied update made the parameters non-finite"
        )
        message = (
            f"training stopped at step {step}: non-finite values ({what}, "
            f"parameters finite={params_finite}; {why}); {kept}. Lower the learning rate, "
            "tighten grad_clip, or check the data for NaN/inf"
        )
        self.logger.log({"event": "non_finite", "step": step, "message": message}, echo=False)
        raise NonFiniteLossError(message)


def _initial_weights(
    config: TrainConfig, model_fn: ModelFn | None
) -> tuple[TrainConfig, ModelFn | None, dict[str, Any]]:
    """``(config, model_fn, extra checkpoint metadata)`` for ``config.init_from``: the config
    with the checkpoint's ``ModelConfig``, a ``model_fn`` returning a copy of its loaded model
    (its weights enter the initialisation program as constants: fine for the models fine-tuned
    this way, wasteful for very large ones), and its ``distill`` record; unchanged without."""
    if config.init_from is None:
        return config, model_fn, {}
    if model_fn is not None:
        raise ValueError("give either config.init_from or model_fn, not both")
    if config.checkpoint is not None and config.checkpoint.directory == config.init_from:
        raise ValueError(
            f"init_from={config.init_from!r} is also the checkpoint directory: write this run's "
            "checkpoints to a new directory"
        )
    loaded, meta = load_for_inference(config.init_from)
    config = dataclasses.replace(config, model=model_config_from_record(meta["run"]))
    extra = {"init_from": config.init_from}
    if "distill" in meta:
        extra["distill"] = meta["distill"]
    return config, lambda rngs: nnx.clone(loaded), extra


def train(config: TrainConfig, *, model_fn: ModelFn | None = None) -> TrainResult:
    """Train (or resume from ``config.checkpoint``); returns the model and the records.

    ``model_fn(rngs) -> nnx.Module`` overrides building ``SpectralModel(config.model)``;
    ``config.init_from`` starts from a checkpoint's weights instead (no ``model_fn`` then).
    """
    shd.initialize_distributed(config.distributed)
    mesh = shd.make_mesh(config.mesh)
    shd.check_global_batch(config.global_batch, mesh, config.microbatches)
    config, model_fn, extra_meta = _initial_weights(config, model_fn)
    model_fn = model_fn or spectral_model_fn(config.model)
    task, seed = config.task, config.seed
    tx = make_optimizer(config.optim)

    def init():
        model = model_fn(nnx.Rngs(seed))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    layout = _layout(init, mesh)
    _check_output_shape(layout, task, config.global_batch)
    windows = config.carry_windows
    if windows > 1:
        check_carry_config(config, nnx.merge(layout.model_def, layout.model_abstract))
    states = jax.jit(
        lambda: tuple(nnx.state(node) for node in init()),
        out_shardings=(layout.model_sh, layout.opt_sh),
    )()
    model_state, opt_state = states

    record = run_record(config)
    primary = jax.process_index() == 0
    logger = MetricsLogger(
        config.metrics_path, config.steps, primary=primary, tensorboard_dir=config.tensorboard_dir
    )
    ckpt = Checkpointer(config.checkpoint) if config.checkpoint is not None else None
    if ckpt is not None and primary:
        save_task_tokenizer(task, ckpt.directory)  # generate and distill read it back
    start = 0
    nonfinite = {"in_a_row": 0, "skipped_total": 0}
    if ckpt is not None and ckpt.latest_step() is not None:

        def abstracts(saved_meta):
            check_resumable(saved_meta["run"], record, ckpt.directory)
            model_abstract = abstract_pure(layout.model_abstract, layout.model_sh)
            return model_abstract, abstract_pure(layout.opt_abstract, layout.opt_sh)

        try:  # falls back past damaged steps, moving them aside
            model_pure, opt_pure, saved_meta = ckpt.restore_latest(abstracts)
        except BaseException:
            ckpt.close()  # releases the directory's lock
            raise
        finally:
            for skipped in ckpt.fallbacks:
                logger.log({"event": "checkpoint_fallback", **skipped}, echo=False)
        start = saved_meta["step"]
        saved_windows = saved_meta["data"].get("carry_windows", 1)
        if saved_windows != windows:
            ckpt.close()
            raise CheckpointError(
                f"the checkpoints in {ckpt.directory} were trained with carry_windows="
                f"{saved_windows}, but this run has carry_windows={windows} (another data "
                "stream); use another checkpoint directory or the original carry_windows"
            )
        nonfinite = saved_meta.get("nonfinite", nonfinite)  # absent: saved before skipping
        nnx.replace_by_pure_dict(model_state, model_pure)
        nnx.replace_by_pure_dict(opt_state, opt_pure)
        logger.log({"event": "resume", "step": start, "directory": ckpt.directory}, echo=False)
        if primary:
            print(f"resumed from step {start} in {ckpt.directory}", flush=True)

    replicated, batch_sh = shd.replicated(mesh), shd.batch_sharding(mesh)
    train_step = make_train_step(
        layout.model_def,
        layout.opt_def,
        task.kind,
        learning_rate_schedule(config.optim),
        (layout.model_sh, layout.opt_sh, batch_sh, replicated),
        config.microbatches,
        carry=windows > 1,
    )
    eval_step = make_eval_step(
        layout.model_def, task.kind, (layout.model_sh, batch_sh, replicated), config.microbatches
    )
    rows = shd.process_rows(config.global_batch, mesh)

    def global_batch(step: int, split: str):
        if windows > 1 and split == "train":  # window step % W of the streams of group step // W
            batch = task.stream_window(seed, step // windows, step % windows, windows, rows, split)
        else:
            batch = task.batch(seed, step, rows, split)
        return shd.place_batch(batch, mesh, config.global_batch)

    empty_cache = jax.jit(
        lambda state: nnx.merge(layout.model_def, state).init_cache(config.global_batch),
        out_shardings=replicated,
    )
    cache = None

    def evaluate(step: int) -> dict[str, Any]:
        sums: dict[str, float] = {}
        for index in range(config.eval_batches):
            batch_sums = eval_step(model_state, global_batch(index, "eval"))
            for key, value in jax.device_get(batch_sums).items():
                sums[key] = sums.get(key, 0.0) + float(value)
        out = {"split": "eval", "step": step, "loss": sums["loss"] / max(sums["weight"], 1.0)}
        if "correct" in sums:
            out["accuracy"] = sums["correct"] / max(sums["weight"], 1.0)
        out.update(task.eval_metrics(out["loss"]))
        return out

    log = _TrainLog(logger, config, ckpt, nonfinite)
    try:
        steps = range(start, config.steps)
        batches = prefetch(lambda s: global_batch(s, "train"), steps)
        for step, batch in zip(steps, batches, strict=True):
            if windows == 1:
                model_state, opt_state, metrics = train_step(model_state, opt_state, batch)
            else:  # the caches start empty at each group of windows
                cache = empty_cache(model_state) if step % windows == 0 else cache
                model_state, opt_state, metrics, cache = train_step(
                    model_state, opt_state, batch, cache
                )
            done = step + 1
            log.pending.append((done, metrics))
            if step == start:
                log.start_clock(done)
            last = done == config.steps
            save = ckpt is not None and (done % config.checkpoint.save_every == 0 or last)
            if save or last or done % config.log_every == 0:
                log.flush(done)
            if save:
                meta = {
                    "run": record,
                    "data": {"seed": seed, "next_step": done}
                    | ({"carry_windows": windows} if windows > 1 else {}),
                    "nonfinite": dict(log.nonfinite),
                    **extra_meta,
                }
                ckpt.save(done, nnx.to_pure_dict(model_state), nnx.to_pure_dict(opt_state), meta)
            periodic = config.eval_every and done % config.eval_every == 0
            if config.eval_batches and (last or periodic):
                log.history.append(evaluate(done))
                logger.log(log.history[-1])
        if ckpt is not None:
            ckpt.wait()
    finally:
        if ckpt is not None:
            ckpt.close()
        logger.close()
    model = nnx.merge(layout.model_def, model_state)
    return TrainResult(model, max(start, config.steps), log.history)

"""The run configuration, and the record of it that every checkpoint carries."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from flax import nnx

from spectral_jax.data.lm_tasks import ByteCorpusLM, TokenShardLM
from spectral_jax.data.tasks import LOSS_KINDS, LDSRegression, SelectiveCopying, Task
from spectral_jax.data.tokenizer import describe as describe_tokenizer
from spectral_jax.nn.model import ModelConfig, SpectralModel
from spectral_jax.train.checkpoint import CheckpointConfig, CheckpointError
from spectral_jax.train.optim import OptimConfig
from spectral_jax.train.sharding import DistributedConfig, MeshConfig
from spectral_jax.validation import finite_float, one_of, positive_int

ModelFn = Callable[[nnx.Rngs], nnx.Module]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run: task, model, optimizer, devices, checkpoints and logging.

    ``model`` builds a ``SpectralModel``; leave it ``None`` only when passing
    ``model_fn`` to ``train``. ``seed`` drives both the initialisation and the data.

    ``microbatches``: the global batch is split into this many slices whose gradients are
    accumulated before one optimizer update (same result as one full batch, less activation
    memory); ``global_batch`` must divide into ``microbatches`` x the number of batch shards.
    ``peak_flops_per_device``: the peak FLOP/s that MFU is measured against; ``None`` looks
    the device kind up in ``flops.PEAK_BF16_FLOPS`` and reports no MFU for unknown devices
    (CPUs).
    ``stop_after_nonfinite_steps``: a step with a non-finite loss or gradient is skipped
    (parameters and optimizer state unchanged); this many in a row stop the run with
    ``NonFiniteLossError`` (1: the first one stops it). The default 3 rides out one bad batch
    or a transient overflow, and stops a diverged run, whose every step is non-finite, within
    a few steps instead of burning its budget.
    ``carry_windows``: 1 (default): every step trains fresh windows. ``W > 1``: carried-state
    training (``spectral_jax.train.carry``): step ``s`` trains window ``s % W`` of the streams of
    group ``s // W`` (the task's ``stream_window``), continuing from the caches the group's
    previous window left, gradient stopped; caches start empty at each group. ``steps`` and
    ``checkpoint.save_every`` must be multiples of ``W`` (checkpoints fall on group starts, so
    resume stays exact), with ``microbatches=1``; evaluation keeps independent windows.
    ``init_from``: a checkpoint directory, trained or distilled, whose latest weights start this
    run (a fresh optimizer at step 0; e.g. a carried-state post-training phase). Its model
    replaces ``model``, and a distilled one's record (``meta["distill"]``) is saved with every
    checkpoint of this run, so ``generate``, ``evaluate`` and ``load_for_inference`` read them
    as distilled. Resuming this run's own checkpoints then restores them over those weights.
    """

    task: Task
    model: ModelConfig | None = None
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    steps: int = 1000
    global_batch: int = 8
    seed: int = 0
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig | None = None
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only after the last step
    eval_batches: int = 4
    metrics_path: str | None = None  # JSONL file, appended to
    tensorboard_dir: str | None = None
    microbatches: int = 1
    peak_flops_per_device: float | None = None
    stop_after_nonfinite_steps: int = 3
    carry_windows: int = 1
    init_from: str | None = None

    def __post_init__(self):
        positive_int("TrainConfig", "carry_windows", self.carry_windows)
        if self.init_from is not None and not (isinstance(self.init_from, str) and self.init_from):
            raise ValueError(
                f"TrainConfig.init_from must be a checkpoint directory or None, got "
                f"{self.init_from!r}"
            )
        names = ("steps", "global_batch", "log_every", "microbatches", "stop_after_nonfinite_steps")
        for name in names:
            positive_int("TrainConfig", name, getattr(self, name))
        for name in ("seed", "eval_every", "eval_batches"):
            positive_int("TrainConfig", name, getattr(self, name), minimum=0)
        if not isinstance(self.task, Task):
            raise ValueError(
                f"TrainConfig.task must follow the Task protocol of spectral_jax.data.tasks "
                f"(kind, seq_len, batch, eval_metrics), got {self.task!r}"
            )
        if not dataclasses.is_dataclass(self.task):
            raise ValueError(
                f"TrainConfig.task must be a (frozen) dataclass, whose fields every checkpoint "
                f"records, got {type(self.task).__name__}"
            )
        one_of("TrainConfig", "task.kind", self.task.kind, LOSS_KINDS)
        if self.global_batch % self.microbatches:
            raise ValueError(
                f"TrainConfig.global_batch={self.global_batch} must be a multiple of "
                f"microbatches={self.microbatches}"
            )
        if self.peak_flops_per_device is not None:  # None: looked up by device kind
            finite_float(
                "TrainConfig", "peak_flops_per_device", self.peak_flops_per_device, strict=True
            )
        if self.model is not None and not isinstance(self.model, ModelConfig):
            raise ValueError(f"model must be a ModelConfig or None, got {self.model!r}")


def _describe(obj) -> dict[str, Any] | None:
    if obj is None:
        return None
    return {"type": type(obj).__name__, **dataclasses.asdict(obj)}


def run_record(config: TrainConfig) -> dict[str, Any]:
    """The JSON-able description of a run stored in every checkpoint (with the task's
    tokenizer, if it has one: kind, vocabulary, end-of-text id and fingerprint)."""
    tokenizer = config.task.text_tokenizer()
    record = {
        "task": _describe(config.task),
        "model": _describe(config.model),
        "optim": _describe(config.optim),
        "seed": config.seed,
        "global_batch": config.global_batch,
        "steps": config.steps,
        "tokenizer": None if tokenizer is None else describe_tokenizer(tokenizer),
    }
    return json.loads(json.dumps(record))


_MUST_MATCH_ON_RESUME = ("task", "model", "seed", "global_batch")


def check_resumable(saved: dict[str, Any], current: dict[str, Any], directory: str) -> None:
    """Raise CheckpointError unless the saved run continues into the current one.

    Task, model, seed and global batch must match (they fix the parameters' shapes
    and the data stream), and so must the tokenizer where both records name one; steps and
    optimizer settings may change.
    """
    saved_tok, current_tok = saved.get("tokenizer"), current.get("tokenizer")
    if saved_tok and current_tok and saved_tok["fingerprint"] != current_tok["fingerprint"]:
        raise CheckpointError(
            f"tokenizer mismatch: the checkpoints in {directory} were trained with tokenizer "
            f"{saved_tok['fingerprint'][:12]} (vocab {saved_tok['vocab_size']}), but this run's "
            f"shards use {current_tok['fingerprint'][:12]} (vocab {current_tok['vocab_size']}); "
            "use another checkpoint directory or the original shards"
        )
    for key in _MUST_MATCH_ON_RESUME:
        if saved.get(key) != current[key]:
            raise CheckpointError(
                f"the checkpoints in {directory} were written with {key}={saved.get(key)!r}, "
                f"but this run has {key}={current[key]!r}; use another checkpoint directory "
                f"or restore the original {key}"
            )


def model_config_from_record(record: dict[str, Any]) -> ModelConfig:
    """The ``ModelConfig`` of a run record (``run_record``), validated again."""
    fields = dict(record.get("model") or {})
    if fields.pop("type", None) != ModelConfig.__name__:
        raise CheckpointError(
            f"the run record has no ModelConfig (model={record.get('model')!r}): it was "
            "trained with a custom model_fn; pass the same model_fn to load it"
        )
    return ModelConfig(**fields)


def task_from_record(record: dict[str, Any]) -> Task:
    """The task of a run record (``run_record``), validated again."""
    fields = dict(record.get("task") or {})
    kind = fields.pop("type", None)
    tasks = {
        cls.__name__: cls for cls in (LDSRegression, ByteCorpusLM, TokenShardLM, SelectiveCopying)
    }
    if kind not in tasks:
        raise CheckpointError(f"the run record names an unknown task {record.get('task')!r}")
    return tasks[kind](**fields)


def spectral_model_fn(model_config: ModelConfig | None) -> ModelFn:
    """``rngs -> SpectralModel(model_config)``."""
    if model_config is None:
        raise ValueError("config.model is None: give a ModelConfig or pass model_fn")
    return lambda rngs: SpectralModel(model_config, rngs=rngs)

"""Named training runs and ``key=value`` overrides (used by ``spectral-jax train`` and
``experiments/train.py``).

Presets:

- ``lds_small``: a 2-layer STU regressor on a random symmetric LDS; CPU, well under a minute.
- ``lm_bytes_small``: a 4-layer hybrid (STU + sliding-window attention) byte-level LM on the
  Python standard library; CPU, about 10 minutes.
- ``lm_tokens_small``: the same kind of model on BPE tokens (vocabulary 4096) of the standard
  library, from ``spectral-jax prepare-data --stdlib --out data/stdlib_bpe4k --tokenizer
  bpe:4096`` (``task.path`` names another shard directory); CPU, minutes.
- ``lm_bytes_gpu8``: a 12-layer hybrid at d_model=1024, L=4096, on one 8-GPU node
  (data-parallel x FSDP). Documented, not run here.
- ``lm_bytes_tpu_pod``: the same model on a TPU v4/v5 pod slice, every host a process
  (``jax.distributed`` auto-detection), FSDP over 4 chips. Documented, not run here.
- ``flashstu_small``: flash-stu-2's architecture (:func:`flashstu_lm`) at CPU size (d_model 96,
  4 layers, K=16, window 64) on the standard-library BPE shards of ``lm_tokens_small``; CPU,
  about 9,500 tokens/s on one loaded core (20 steps in 12 s including compilation), so the
  600 steps take 2-3 minutes.
- ``flashstu_pod``: exactly the architecture of flash-stu-2's training config: d_model 1536,
  26 layers alternating approx STU and attention (8 heads, ALiBi, softcap 50, window_size
  1024), GeGLU with mlp_scale 12, tied o200k embeddings, seq 8192, K=24 (~2.67B parameters),
  bf16 activations, full remat, 4 microbatches, FSDP over 8 chips of a TPU pod slice; its
  ``spectral-jax export`` is a checkpoint flash-stu-2 loads. Not run here.
- ``lm_tokens_tpu_pod``: the same architecture scaled to ~350M parameters (d_model 1024,
  12 layers, 16 heads, mlp_scale 3), seq 8192, bf16 activations, full per-block remat,
  2 microbatches, on a TPU pod slice. Launch notes: ``experiments/tpu/README.md``. Not run here.

The pod presets read a token-shard directory and tokenizer given by ``--set task.path=...
--set task.tokenizer=...``.

Overrides name a field by its dotted path, e.g. ``steps=2000``, ``model.d_model=256``,
``task.seq_len=512``, ``optim.learning_rate=1e-3``; an unknown key is an error.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from spectral_jax.data.lm_tasks import ByteCorpusLM, TokenShardLM
from spectral_jax.data.tasks import LDSRegression
from spectral_jax.interop.flashstu import TORCH_RMSNORM_EPS
from spectral_jax.nn.model import ModelConfig
from spectral_jax.train.config import TrainConfig
from spectral_jax.train.optim import OptimConfig
from spectral_jax.train.sharding import DistributedConfig, MeshConfig


def lds_small() -> TrainConfig:
    task = LDSRegression(seq_len=256, d_input=4, d_output=4, state_dim=16)
    model = ModelConfig(
        d_model=32, num_layers=2, max_len=256, d_input=4, d_output=4, num_filters=16
    )
    optim = OptimConfig(learning_rate=3e-3, warmup_steps=15, decay_steps=301)
    return TrainConfig(
        task=task, model=model, optim=optim, steps=300, global_batch=16, log_every=30
    )


def hybrid_lm(
    d_model: int, num_layers: int, max_len: int, vocab_size: int, **fields
) -> ModelConfig:
    """The language model of every LM preset: tensordot STU layers alternating with
    sliding-window attention (``layer_pattern="SA"``), tied embeddings; ``fields`` set the rest
    (``num_filters``, ``window``, ``num_heads``, ``dtype``, ``remat``, ...)."""
    return ModelConfig(
        d_model=d_model,
        num_layers=num_layers,
        max_len=max_len,
        vocab_size=vocab_size,
        tie_embeddings=True,
        layer_pattern="SA",
        stu_projection="tensordot",
        **fields,
    )


def small_lm(
    task, vocab_size: int, steps: int, warmup_steps: int, log_every: int, eval_every: int
) -> TrainConfig:
    """A CPU-sized hybrid LM run on ``task`` (d_model 96, 4 layers, K=16, window 64)."""
    model = hybrid_lm(96, 4, task.seq_len, vocab_size, num_filters=16, window=64)
    optim = OptimConfig(learning_rate=2e-3, warmup_steps=warmup_steps, decay_steps=steps + 1)
    return TrainConfig(
        task=task,
        model=model,
        optim=optim,
        steps=steps,
        global_batch=16,
        log_every=log_every,
        eval_every=eval_every,
        eval_batches=8,
    )


def lm_bytes_small() -> TrainConfig:
    return small_lm(ByteCorpusLM(seq_len=256), 256, 2000, 100, log_every=100, eval_every=500)


def lm_tokens_small() -> TrainConfig:
    task = TokenShardLM(path="data/stdlib_bpe4k", seq_len=128, document_mask=True)
    return small_lm(task, 4096, 600, 50, log_every=50, eval_every=200)


def _lm_bytes_large(mesh: MeshConfig, distributed: DistributedConfig) -> TrainConfig:
    task = ByteCorpusLM(seq_len=4096)
    model = hybrid_lm(
        1024, 12, 4096, 256, num_filters=24, num_heads=16, window=512, dtype="bfloat16"
    )
    optim = OptimConfig(learning_rate=6e-4, warmup_steps=1000, decay_steps=50_000)
    return TrainConfig(
        task=task,
        model=model,
        optim=optim,
        steps=50_000,
        global_batch=256,
        mesh=mesh,
        distributed=distributed,
        log_every=50,
        eval_every=2000,
    )


def lm_bytes_gpu8() -> TrainConfig:
    return _lm_bytes_large(MeshConfig(data=4, fsdp=2), DistributedConfig())


def lm_bytes_tpu_pod() -> TrainConfig:
    return _lm_bytes_large(MeshConfig(data=-1, fsdp=4), DistributedConfig(auto=True))


POD_VOCAB = 200_064
"""The o200k vocabulary (200,019 ids) padded to a multiple of 64, so that the embedding rows
divide every ``fsdp`` size up to 64 (flash-stu-2 pads it the same way)."""


def flashstu_lm(
    d_model: int, num_layers: int, max_len: int, vocab_size: int, mlp_scale: int, **fields
) -> ModelConfig:
    """flash-stu-2's ``FlashSTU``: approx-mode STU (tensordot, one filter mixture shared by both
    branches) alternating with sliding-window attention with ALiBi and a score softcap of 50,
    GeGLU MLPs of width ``d_model * mlp_scale``, tied embeddings, no biases, torch's RMSNorm
    epsilon; ``fields`` set the rest (``num_heads``, ``window``, ``num_filters``, ``dtype``,
    ``remat``). :func:`spectral_jax.interop.flashstu.save` exports it as flash-stu-2 loads it."""
    return ModelConfig(
        d_model=d_model,
        num_layers=num_layers,
        max_len=max_len,
        vocab_size=vocab_size,
        tie_embeddings=True,
        layer_pattern="SA",
        d_hidden=d_model * mlp_scale,
        mlp_activation="geglu",
        stu_projection="tensordot",
        stu_shared_mixture=True,
        attention_positions="alibi",
        attention_softcap=50.0,
        norm_eps=TORCH_RMSNORM_EPS,
        **fields,
    )


def flashstu_small() -> TrainConfig:
    task = TokenShardLM(path="data/stdlib_bpe4k", seq_len=128, document_mask=True)
    model = flashstu_lm(96, 4, 128, 4096, 4, num_heads=4, window=64, num_filters=16)
    optim = OptimConfig(learning_rate=2e-3, warmup_steps=50, decay_steps=601)
    return TrainConfig(
        task=task,
        model=model,
        optim=optim,
        steps=600,
        global_batch=16,
        log_every=50,
        eval_every=200,
        eval_batches=8,
    )


def _pod_run(model: ModelConfig, microbatches: int, fsdp: int) -> TrainConfig:
    optim = OptimConfig(learning_rate=3e-4, warmup_steps=1000, decay_steps=20_000)
    return TrainConfig(
        # Set task.path to your prepare-data (or flash-stu-2) shard directory and, for a
        # directory without one, task.tokenizer to its tokenizer.json.
        task=TokenShardLM(path="data/pod_shards", seq_len=model.max_len, document_mask=True),
        model=model,
        optim=optim,
        steps=20_000,
        global_batch=64,  # 64 x 8192 = 524,288 tokens per step
        microbatches=microbatches,
        mesh=MeshConfig(data=-1, fsdp=fsdp),
        distributed=DistributedConfig(auto=True),
        log_every=50,
        eval_every=1000,
    )


def flashstu_pod() -> TrainConfig:
    # flash-stu-2's training config: its training/example.py reads training/config.json, not in
    # the index; flash-stu's (windsornguyen/flash-stu) holds the same keys with n_heads 8,
    # seq_len 8192 and num_eigh 24, which are also FlashSTUConfig's defaults
    model = flashstu_lm(
        1536, 26, 8192, POD_VOCAB, 12, num_heads=8, window=1025, num_filters=24,
        dtype="bfloat16", remat="full",
    )  # fmt: skip
    return _pod_run(model, microbatches=4, fsdp=8)


def lm_tokens_tpu_pod() -> TrainConfig:
    model = flashstu_lm(
        1024, 12, 8192, POD_VOCAB, 3, num_heads=16, window=1025, num_filters=24,
        dtype="bfloat16", remat="full",
    )  # fmt: skip
    return _pod_run(model, microbatches=2, fsdp=4)


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "lds_small": lds_small,
    "lm_bytes_small": lm_bytes_small,
    "lm_tokens_small": lm_tokens_small,
    "lm_bytes_gpu8": lm_bytes_gpu8,
    "lm_bytes_tpu_pod": lm_bytes_tpu_pod,
    "lm_tokens_tpu_pod": lm_tokens_tpu_pod,
    "flashstu_small": flashstu_small,
    "flashstu_pod": flashstu_pod,
}


def preset(name: str) -> TrainConfig:
    """The named run; ``ValueError`` lists the names if ``name`` is unknown."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()


def _parse_value(text: str, current: Any) -> Any:
    """Parse ``text`` for a field whose current value is ``current``."""
    if isinstance(current, str):
        return text
    if isinstance(current, bool):
        if text.lower() not in ("true", "false"):
            raise ValueError(f"expected true or false, got {text!r}")
        return text.lower() == "true"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a string for a field that is None now
    if isinstance(current, float) and isinstance(value, int):
        return float(value)
    return value


def _replace_path(obj: Any, path: Sequence[str], text: str, full_key: str) -> Any:
    names = [f.name for f in dataclasses.fields(obj)]
    head, rest = path[0], path[1:]
    if head not in names:
        raise ValueError(f"unknown config key {full_key!r}: {head!r} is not one of {names}")
    current = getattr(obj, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"unknown config key {full_key!r}: {head!r} has no fields")
        return dataclasses.replace(obj, **{head: _replace_path(current, rest, text, full_key)})
    if dataclasses.is_dataclass(current):
        raise ValueError(f"config key {full_key!r} is a group; set one of its fields")
    try:
        value = _parse_value(text, current)
    except ValueError as err:
        raise ValueError(f"bad value for {full_key}: {err}") from None
    return dataclasses.replace(obj, **{head: value})


def apply_overrides(config: TrainConfig, overrides: Sequence[str]) -> TrainConfig:
    """Apply ``key=value`` overrides (dotted keys) to ``config``; every result is re-validated
    by the dataclasses' own checks."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form key=value")
        config = _replace_path(config, key.split("."), text, key)
    return config

"""Training: data, sharding, optimizer, checkpoints and the loop.

Typical use::

    from spectral_jax.train import TrainConfig, LDSRegression, train

    result = train(TrainConfig(task=LDSRegression(), model=model_config, steps=500))
"""

from spectral_jax.train.checkpoint import CheckpointConfig, Checkpointer, CheckpointError
from spectral_jax.train.config import TrainConfig
from spectral_jax.train.data import (
    Batch,
    ByteCorpusLM,
    LDSRegression,
    SelectiveCopying,
    Task,
    TokenShardLM,
    prefetch,
    stdlib_corpus,
)
from spectral_jax.train.loop import NonFiniteLossError, TrainResult, load_model, train
from spectral_jax.train.optim import OptimConfig, make_optimizer
from spectral_jax.train.sharding import (
    DistributedConfig,
    MeshConfig,
    initialize_distributed,
    make_mesh,
)

__all__ = [
    "Batch",
    "ByteCorpusLM",
    "CheckpointConfig",
    "CheckpointError",
    "Checkpointer",
    "DistributedConfig",
    "LDSRegression",
    "MeshConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "SelectiveCopying",
    "Task",
    "TokenShardLM",
    "TrainConfig",
    "TrainResult",
    "initialize_distributed",
    "load_model",
    "make_mesh",
    "make_optimizer",
    "prefetch",
    "stdlib_corpus",
    "train",
]

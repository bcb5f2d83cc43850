"""Training: config, sharding, optimizer, checkpoints and the loop (tasks are in
:mod:`spectral_jax.data`).

Typical use::

    from spectral_jax.data.tasks import LDSRegression
    from spectral_jax.train import TrainConfig, train

    result = train(TrainConfig(task=LDSRegression(), model=model_config, steps=500))
"""

from spectral_jax.train.checkpoint import CheckpointConfig, Checkpointer, CheckpointError
from spectral_jax.train.config import TrainConfig
from spectral_jax.train.loop import NonFiniteLossError, TrainResult, train
from spectral_jax.train.optim import OptimConfig, make_optimizer
from spectral_jax.train.restore import load_for_inference, load_model
from spectral_jax.train.sharding import (
    DistributedConfig,
    MeshConfig,
    initialize_distributed,
    make_mesh,
)

__all__ = [
    "CheckpointConfig",
    "CheckpointError",
    "Checkpointer",
    "DistributedConfig",
    "MeshConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "TrainConfig",
    "TrainResult",
    "initialize_distributed",
    "load_for_inference",
    "load_model",
    "make_mesh",
    "make_optimizer",
    "train",
]

"""Device mesh, FSDP sharding rules, and multi-host batch placement.

One code path for 1 CPU, simulated CPU devices, a GPU node and a TPU pod slice:

- ``make_mesh`` builds a 2-D mesh with axes ``("data", "fsdp")`` over all devices of
  all processes (``jax.make_mesh``).
- Parameters and optimizer state are sharded FSDP-style: each array is split along
  its largest dimension divisible by the ``fsdp`` axis size and replicated over
  ``data``; arrays with no such dimension (scalars, small vectors) are replicated.
  XLA inserts the all-gathers and reduce-scatters.
- Batches are split along their leading dimension over both axes, so every device
  sees different rows. Each process generates only the rows its own devices hold
  (``process_rows``) and ``place_batch`` assembles the global array from those
  per-process shares (``jax.make_array_from_process_local_data``).
- ``initialize_distributed`` wraps ``jax.distributed.initialize`` for multi-host
  runs; call it first, before any other JAX call.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA = "data"
FSDP = "fsdp"
BATCH_AXES = (DATA, FSDP)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape. ``data=-1`` uses every device not taken by ``fsdp``."""

    data: int = -1
    fsdp: int = 1

    def __post_init__(self):
        if not isinstance(self.data, int) or (self.data <= 0 and self.data != -1):
            raise ValueError(f"data must be a positive int or -1 (all devices), got {self.data!r}")
        if not isinstance(self.fsdp, int) or self.fsdp <= 0:
            raise ValueError(f"fsdp must be a positive int, got {self.fsdp!r}")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
    """How processes find each other.

    Leave everything unset for a single process. ``auto=True`` lets JAX detect the
    cluster (TPU pod slices, SLURM, Open MPI, ...); otherwise give the coordinator's
    ``host:port``, the number of processes and this process's id.
    """

    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False

    def __post_init__(self):
        explicit = (self.coordinator_address, self.num_processes, self.process_id)
        if self.auto and any(v is not None for v in explicit):
            raise ValueError(
                "auto=True detects the cluster itself: leave coordinator_address, "
                f"num_processes and process_id unset, got {explicit}"
            )
        if any(v is not None for v in explicit) and any(v is None for v in explicit):
            raise ValueError(
                "coordinator_address, num_processes and process_id must be given together, "
                f"got {explicit}"
            )
        if self.num_processes is not None and self.num_processes <= 0:
            raise ValueError(f"num_processes must be positive, got {self.num_processes}")
        if self.process_id is not None and not 0 <= self.process_id < self.num_processes:
            raise ValueError(
                f"process_id must be in [0, {self.num_processes}), got {self.process_id}"
            )

    @property
    def enabled(self) -> bool:
        return self.auto or self.coordinator_address is not None


def initialize_distributed(config: DistributedConfig) -> None:
    """Join the multi-controller runtime when ``config`` asks for it; idempotent.

    Must run before any other JAX call in the process. On CPU, processes exchange
    data with the gloo collectives JAX ships.
    """
    if not config.enabled or jax.distributed.is_initialized():
        return
    if config.auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )


def make_mesh(config: MeshConfig = MeshConfig(), devices=None) -> Mesh:
    """A ``("data", "fsdp")`` mesh over ``devices`` (default: all devices, all processes)."""
    devices = jax.devices() if devices is None else list(devices)
    n = len(devices)
    data = n // config.fsdp if config.data == -1 else config.data
    if data * config.fsdp != n:
        raise ValueError(
            f"mesh data={config.data} x fsdp={config.fsdp} does not match the {n} devices "
            f"available; choose sizes whose product is {n} (data=-1 fills the rest)"
        )
    return jax.make_mesh(
        (data, config.fsdp), (DATA, FSDP), axis_types=(AxisType.Auto,) * 2, devices=devices
    )


def fsdp_partition_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """Shard the largest dimension divisible by ``fsdp_size`` over ``fsdp``.

    Ties go to the earlier dimension. Replicated (``P()``) when ``fsdp_size == 1``
    or no dimension divides.
    """
    if fsdp_size == 1:
        return P()
    candidates = [(size, -axis) for axis, size in enumerate(shape) if size % fsdp_size == 0]
    if not candidates:
        return P()
    axis = -max(candidates)[1]
    return P(*([None] * axis + [FSDP]))


def state_shardings(tree, mesh: Mesh):
    """NamedShardings for a pytree of arrays (or ``jax.ShapeDtypeStruct``), FSDP rule."""
    fsdp_size = mesh.shape[FSDP]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_partition_spec(tuple(x.shape), fsdp_size)), tree
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data`` and ``fsdp``; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_global_batch(global_batch: int, mesh: Mesh) -> None:
    """Raise ValueError unless ``global_batch`` splits evenly over the batch axes."""
    shards = mesh.shape[DATA] * mesh.shape[FSDP]
    if not isinstance(global_batch, int) or global_batch <= 0 or global_batch % shards:
        raise ValueError(
            f"global_batch={global_batch!r} must be a positive multiple of the number of "
            f"batch shards {shards} (mesh data={mesh.shape[DATA]} x fsdp={mesh.shape[FSDP]})"
        )


def process_rows(global_batch: int, mesh: Mesh) -> np.ndarray:
    """Global row indices (sorted) of the batch shards held by this process's devices.

    With the usual device order these are the contiguous block
    ``[p * B / P, (p + 1) * B / P)`` for process ``p`` of ``P``.
    """
    check_global_batch(global_batch, mesh)
    indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    rows = set()
    for (index,) in indices.values():
        rows.update(range(*index.indices(global_batch)))
    return np.array(sorted(rows), dtype=np.int64)


def place_batch(local_batch, mesh: Mesh, global_batch: int):
    """Assemble global ``jax.Array``s from this process's rows (see ``process_rows``).

    ``local_batch``: pytree of NumPy arrays ``[rows, ...]``; returns the same pytree
    of arrays ``[global_batch, ...]`` sharded by ``batch_sharding(mesh)``.
    """
    sharding = batch_sharding(mesh)
    expected = len(process_rows(global_batch, mesh))

    def place(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] != expected:
            raise ValueError(
                f"this process must supply {expected} rows of the global batch "
                f"{global_batch}, got an array of shape {x.shape}"
            )
        return jax.make_array_from_process_local_data(sharding, x, (global_batch, *x.shape[1:]))

    return jax.tree.map(place, local_batch)

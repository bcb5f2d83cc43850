"""Device mesh, FSDP sharding rules, and multi-host batch placement.

One code path for 1 CPU, simulated CPU devices, a GPU node and a TPU pod slice:

- ``make_mesh`` builds a 2-D mesh with axes ``("data", "fsdp")`` over all devices of
  all processes (``jax.make_mesh``).
- Parameters and optimizer state are sharded FSDP-style by their *logical axis names*:
  every parameter is created with ``logical_axes`` metadata (e.g. ``("embed", "mlp")``
  for an MLP matrix, ``("time", "filters")`` for the fixed spectral filters), and the one
  rule table ``LOGICAL_AXIS_RULES`` maps those names to mesh axes (``logical_partition_spec``).
  Arrays are replicated over ``data``; XLA inserts the all-gathers and reduce-scatters.
  The names live in our own ``logical_axes`` metadata, not in flax's ``out_sharding``: flax
  0.12 shards a variable with ``out_sharding`` eagerly where it is created (which needs a mesh
  in the layer code), while the layers here stay mesh-free and the loop places the state.
- Batches are split along their leading dimension over both axes, so every device
  sees different rows. Each process generates only the rows its own devices hold
  (``process_rows``) and ``place_batch`` assembles the global array from those
  per-process shares (``jax.make_array_from_process_local_data``).
- ``initialize_distributed`` wraps ``jax.distributed.initialize`` for multi-host
  runs; call it first, before any other JAX call.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from spectral_jax.validation import positive_int

DATA = "data"
FSDP = "fsdp"
BATCH_AXES = (DATA, FSDP)

LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", FSDP),  # embedding rows / LM-head columns
    ("mlp", FSDP),  # SwiGLU hidden width
    ("qkv", FSDP),  # fused q, k, v output width (3 * heads * head_dim)
    ("heads", FSDP),  # attention output projection's input (heads * head_dim)
    ("embed", FSDP),  # model width: the fallback axis of every matrix that has one
    ("filters", None),  # K spectral filters: small, replicated
    ("time", None),  # the filters' time axis: never sharded (each position needs all of it)
    ("lag", None),  # autoregressive lags k_u, k_y
    ("input", None),  # regression input width
    ("norm", None),  # norm scales: vectors, replicated
)
"""The one table from logical axis names to mesh axes, in priority order.

For each array, the rules are taken in this order; a rule shards the first dimension of the
array that carries its name, if that mesh axis is not used yet by this array and divides the
dimension. So ``[embed, mlp]`` shards ``mlp``; ``[vocab, embed]`` shards ``vocab`` when the
vocabulary divides the ``fsdp`` size and falls back to ``embed`` when it does not. A dimension
named ``None`` is replicated; a name missing from the table is an error.
"""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape. ``data=-1`` uses every device not taken by ``fsdp``."""

    data: int = -1
    fsdp: int = 1

    def __post_init__(self):
        if self.data != -1:
            positive_int("MeshConfig", "data (or -1: all devices)", self.data)
        positive_int("MeshConfig", "fsdp", self.fsdp)


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
        if self.num_processes is not None:
            positive_int("DistributedConfig", "num_processes", self.num_processes)
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


def logical_partition_spec(
    names: Sequence[str | None],
    shape: Sequence[int],
    mesh_shape: Mapping[str, int],
    rules: Sequence[tuple[str, str | None]] = LOGICAL_AXIS_RULES,
) -> P:
    """The ``PartitionSpec`` of an array with logical axis ``names`` (see ``LOGICAL_AXIS_RULES``).

    names, shape: one entry per dimension; mesh_shape: mesh axis name -> size. A mesh axis of
    size 1 shards nothing, so every array is replicated on a mesh without ``fsdp``.
    """
    if len(names) != len(shape):
        raise ValueError(f"logical axes {tuple(names)} do not match the array shape {tuple(shape)}")
    table = dict(rules)
    unknown = sorted({n for n in names if n is not None and n not in table})
    if unknown:
        raise ValueError(
            f"logical axis names {unknown} are not in the rule table; known: {sorted(table)}"
        )
    spec: list[str | None] = [None] * len(shape)
    used: set[str] = set()
    for name, mesh_axis in rules:
        if mesh_axis is None or mesh_axis in used or mesh_shape.get(mesh_axis, 1) == 1:
            continue
        for dim, (dim_name, size) in enumerate(zip(names, shape, strict=True)):
            if dim_name == name and spec[dim] is None and size % mesh_shape[mesh_axis] == 0:
                spec[dim] = mesh_axis
                used.add(mesh_axis)
                break
    while spec and spec[-1] is None:  # P("fsdp") rather than P("fsdp", None)
        spec.pop()
    return P(*spec)


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The ``logical_axes`` metadata of a parameter or state variable (``None`` if absent)."""
    return variable.get_metadata().get("logical_axes")


def state_shardings(tree, mesh: Mesh):
    """``NamedSharding``s for an ``nnx.State`` (concrete or abstract), by the rule table.

    Each variable is sharded by its ``logical_axes``; an unnamed array (a custom
    ``model_fn`` whose layers do not name their axes, a scalar step count) is replicated, since
    nothing says which of its axes may be split. When a sharded mesh axis divides none of
    a parameter's named dimensions, that parameter is replicated and a warning names it.
    """
    mesh_shape, table = dict(mesh.shape), dict(LOGICAL_AXIS_RULES)
    replicated_params = []

    def sharding(path, x):
        if not _is_variable(x):
            return NamedSharding(mesh, P())
        names = logical_axes(x)
        if names is None:
            return x.replace(NamedSharding(mesh, P()))
        spec = logical_partition_spec(names, tuple(x.shape), mesh_shape)
        shardable = any(mesh_shape.get(table.get(n) or "", 1) > 1 for n in names if n)
        if shardable and spec == P() and isinstance(x, nnx.Param):
            replicated_params.append(f"{jax.tree_util.keystr(path)} {tuple(x.shape)} {names}")
        return x.replace(NamedSharding(mesh, spec))

    out = jax.tree_util.tree_map_with_path(sharding, tree, is_leaf=_is_variable)
    if replicated_params:
        warnings.warn(
            f"replicated (no named axis divisible by the mesh {mesh_shape}): "
            + "; ".join(replicated_params),
            stacklevel=2,
        )
    return out


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data`` and ``fsdp``; the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_global_batch(global_batch: int, mesh: Mesh, microbatches: int = 1) -> None:
    """Raise ValueError unless every one of ``microbatches`` slices of ``global_batch`` splits
    evenly over the batch axes."""
    shards = mesh.shape[DATA] * mesh.shape[FSDP]
    positive_int("TrainConfig", "microbatches", microbatches)
    if (
        not isinstance(global_batch, int)
        or global_batch <= 0
        or global_batch % (shards * microbatches)
    ):
        per = f" x microbatches {microbatches}" if microbatches > 1 else ""
        raise ValueError(
            f"global_batch={global_batch!r} must be a positive multiple of the number of "
            f"batch shards {shards}{per} (mesh data={mesh.shape[DATA]} x fsdp={mesh.shape[FSDP]})"
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

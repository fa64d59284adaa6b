"""Device mesh and the one table that maps logical axis names onto it.

Parameters are annotated with logical names in ``pipo_jax.model.layers``/``pipo_jax.model.pipo``
(``nn.with_logical_partitioning``), and the main activations are constrained with logical names
too (``constrain``: the residual stream, latents, MTP states); this table decides where each name
lives, so a larger mesh needs a different config, not different model code.

Mesh axes: ``data`` (pure data parallelism: parameters replicated), ``fsdp`` (data parallelism
with parameters, gradients and optimizer state sharded over the ``embed`` dimension: ZeRO-3,
gathered per layer by XLA), ``tensor`` (Megatron-style: heads, MLP and vocabulary columns split).
The batch is split over ``data × fsdp``.

Multi-process (multi-host) runs see one global array per value; ``global_batch`` assembles one
from the rows each process holds, and ``to_host`` reads one back on every process.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pipo_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # Parameters.
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("head_dim", None),
    ("layers", None),
    ("unmodeled", None),
    ("lora", None),
    # Activations: batch-major, split like the batch; the hidden dimension stays whole (fsdp
    # gathers weights, not activations); head, MLP and vocabulary columns follow the weights.
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)


def build_mesh(mesh_cfg: MeshConfig, devices: list[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp, tensor)`` mesh; one axis may be -1 (all remaining devices)."""
    devices = devices if devices is not None else jax.devices()
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    if sizes.count(-1) > 1:
        raise ConfigError("at most one mesh axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh axis sizes must be positive or -1, got {sizes}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(f"{len(devices)} devices cannot be split into mesh axes {sizes}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        shape = dict(zip(MESH_AXES, sizes, strict=True))
        raise ConfigError(f"mesh {shape} needs {int(np.prod(sizes))} devices but "
                          f"{len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def parse_mesh(text: str) -> MeshConfig:
    """``"data=1,fsdp=8,tensor=1"`` (a ``--mesh`` flag) → ``MeshConfig``; axes left out are 1,
    one may be -1."""
    sizes: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES:
            raise ConfigError(f"--mesh {text!r}: each item must be AXIS=SIZE with AXIS one of "
                              f"{', '.join(MESH_AXES)} (e.g. --mesh data=1,fsdp=8,tensor=1)")
        if name in sizes:
            raise ConfigError(f"--mesh {text!r}: axis {name} is given twice")
        try:
            size = int(value)
        except ValueError:
            raise ConfigError(f"--mesh {text!r}: size of {name} must be an integer, got "
                              f"{value!r}") from None
        if size == 0 or size < -1:
            raise ConfigError(f"--mesh {text!r}: size of {name} must be positive or -1")
        sizes[name] = size
    if not sizes:
        raise ConfigError(f"--mesh {text!r} names no axis (e.g. --mesh fsdp=8)")
    return MeshConfig(**{axis: sizes.get(axis, 1) for axis in MESH_AXES})


def logical_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
    """Shardings for a tree of logically partitioned (boxed, possibly abstract) values."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch-major arrays are split over the data-parallel axes."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), LOGICAL_AXIS_RULES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Pins an activation to the mesh placement of its logical ``axes`` (one name per dim).

    A no-op outside a mesh context (``jax.set_mesh``): eager calls and one-device programs
    compile exactly as before; the stages and the runner trace their programs inside one.
    """
    return nn.with_logical_constraint(x, axes, rules=LOGICAL_AXIS_RULES)


def batch_parallel(mesh: Mesh) -> int:
    """How many ways the batch is split: ``data × fsdp``."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


def check_batch(mesh: Mesh, batch_size: int, what: str) -> None:
    """A batch that cannot be split evenly over ``data × fsdp`` is a ``ConfigError``."""
    ways = batch_parallel(mesh)
    if batch_size % ways:
        raise ConfigError(
            f"{what} is {batch_size}, which the mesh (data={mesh.shape['data']}, "
            f"fsdp={mesh.shape['fsdp']}) cannot split evenly: it must be a multiple of {ways}")


def global_batch(tree: Any, mesh: Mesh) -> Any:
    """Host arrays (the whole global batch, identical on every process) → global device arrays
    split over the batch axes.

    Each process copies only the rows its own devices hold (``make_array_from_callback`` asks
    for exactly those), so a host never sends data to another host's devices.
    """
    sh = batch_sharding(mesh)

    def put(x: Any) -> jax.Array:
        x = np.asarray(x)
        if jax.process_count() == 1:
            return jax.device_put(x, sh)
        return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])

    return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
    """Device values → numpy on every process; arrays spread over several processes are
    gathered first (a collective: every process must call it)."""
    from jax.experimental import multihost_utils  # only needed by multi-process runs

    def get(x: Any) -> Any:
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return np.asarray(x)
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(get, tree)


def check_divisible(tree: Any, shardings: Any, what: str = "parameter") -> None:
    """Every dimension the rules split must divide evenly over its mesh axes; otherwise a
    ``ConfigError`` names the array, its shape and the mesh axes (JAX's own error comes later,
    mid-initialisation, and does not say which rule or config to change)."""
    for (path, leaf), sh in zip(jax.tree_util.tree_leaves_with_path(tree),
                                jax.tree.leaves(shardings), strict=True):
        for dim, axes in zip(leaf.shape, sh.spec, strict=False):
            names = (axes,) if isinstance(axes, str) else tuple(axes or ())
            ways = int(np.prod([sh.mesh.shape[a] for a in names]))
            if dim % ways:
                raise ConfigError(
                    f"{what} {jax.tree_util.keystr(path)} has shape {tuple(leaf.shape)}: its "
                    f"dimension of size {dim} cannot be split {ways} ways over mesh axes "
                    f"{names}; choose mesh sizes that divide it (see LOGICAL_AXIS_RULES)")

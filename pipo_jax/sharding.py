"""Device mesh and the one table that maps logical axis names onto it.

Parameters are annotated with logical names in ``pipo_jax.layers``/``pipo_jax.model``
(``nn.with_logical_partitioning``); this table decides where each name lives, so a larger mesh
needs a different config, not different model code.
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


def logical_shardings(boxed_tree: Any, mesh: Mesh) -> Any:
    """Shardings for a tree of logically partitioned (boxed, possibly abstract) values."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch-major arrays are split over the data-parallel axes."""
    return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), LOGICAL_AXIS_RULES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())

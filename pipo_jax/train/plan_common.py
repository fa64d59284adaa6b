"""What the planners (``plan`` for the teacher-forced stages, ``plan_opd``) share: per-device bytes
of abstract trees, fit verdicts, compiling with an out-of-memory verdict, TPU compile-only
devices, and byte formatting."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from pipo_jax.config import ConfigError
from pipo_jax.model.self_attention import available_impls


@dataclasses.dataclass(frozen=True)
class Verdict:
    device: str
    memory_bytes: int
    fits: bool
    headroom_bytes: int  # device memory − peak; negative when it does not fit


def verdicts(peak_bytes: int, devices: list[tuple[str, int]]) -> tuple[Verdict, ...]:
    """A fits / does-not-fit verdict of a ``peak_bytes`` plan for each ``(name, bytes)``."""
    return tuple(Verdict(name, mem, peak_bytes <= mem, mem - peak_bytes) for name, mem in devices)


def verdict_line(v: Verdict, fits_word: str = "fits") -> str:
    """One verdict as the planners print it."""
    if v.fits:
        return (f"{v.device} ({human_bytes(v.memory_bytes)}): {fits_word}, headroom "
                f"{human_bytes(v.headroom_bytes)}")
    return (f"{v.device} ({human_bytes(v.memory_bytes)}): DOES NOT FIT, short by "
            f"{human_bytes(-v.headroom_bytes)}")


def tree_bytes_per_device(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of ``tree`` (abstract leaves) laid out with ``shardings``: the
    largest shard of each leaf (shards are equal unless a dim does not divide)."""
    leaves, treedef = jax.tree.flatten(tree)
    shards = treedef.flatten_up_to(shardings)
    return sum(math.prod(sh.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize
               for leaf, sh in zip(leaves, shards, strict=True))


def topology_devices(name: str) -> list[jax.Device]:
    """Compile-only devices of the TPU slice ``name`` (``v5p:2x2x2``: 8 v5p chips), made by
    libtpu without a TPU: their programs compile with the TPU compiler but cannot run."""
    from jax.experimental import topologies
    try:
        return list(topologies.get_topology_desc(name, "tpu").devices)
    except RuntimeError as e:
        if "not installed" in str(e):
            raise ConfigError("--topology needs libtpu, the TPU compiler (it compiles without a "
                              "TPU): pip install libtpu") from None
        raise ConfigError(f"--topology {name!r}: libtpu cannot make this slice "
                          f"({str(e).strip().splitlines()[0][:200]}); give a name such as "
                          "v5p:2x2x1 (4 chips), v5p:2x2x2 (8) or v5p:2x2x4 (16)") from None


def compile_or_refuse(lowered: Any, backend: str, what: str) -> Any:
    """``lowered.compile()``; a compiler that finds the program larger than the device is a
    one-line ``ConfigError`` (the TPU compiler checks its temporaries against the HBM; XLA:GPU's
    autotuner runs each matmul once and fails on an intermediate larger than the device)."""
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        detail = next((line for line in str(e).splitlines() if "RESOURCE_EXHAUSTED" in line),
                      str(e).strip().splitlines()[-1])[:300]
        hint = ("set XLA_FLAGS=--xla_gpu_autotune_level=0 (no autotuning) or add --simulate for "
                "numbers" if backend == "gpu" else
                "fewer rows per device or more micro-batches (grad_accum) bring it down")
        raise ConfigError(f"{what} DOES NOT FIT a {backend} device: compiling it ran out of "
                          f"device memory ({detail}); {hint}") from None


def human_bytes(n: int) -> str:
    """``1536`` → ``"1.50 KiB"``; binary units, as memory is sized."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def planning_model(mcfg: Any, backend: str) -> Any:
    """``mcfg`` (a ``ModelConfig``) as the planner compiles it on ``backend``: an attention
    kernel the backend lacks (``cudnn``, ``splash`` on a CPU) replaced by ``blockwise``, linear
    in memory as the fused kernels are."""
    if mcfg.attention_impl in available_impls(backend):
        return mcfg
    return dataclasses.replace(mcfg, attention_impl="blockwise")


def compiled_where(backend: str, n_devices: int, simulated: bool, topology: str | None) -> str:
    """Where a plan was compiled, for its header."""
    if simulated:
        return f"{backend}, {n_devices} simulated devices"
    if topology:
        return f"{backend} {topology}, {n_devices} compile-only devices"
    return f"{backend}, {n_devices} device{'s' if n_devices > 1 else ''}"

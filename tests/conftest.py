"""Fixtures shared by the test modules."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

# The suite compiles far more than it runs: XLA:CPU's LLVM optimisation of each program is a
# third of the suite's time and buys the tiny models nothing. Off for the tests and for the
# subprocesses they start (they inherit the environment); XLA reads the flags when the first
# backend starts, after this. float32 results move only in the last bits (docs/testing.md).
NO_LLVM_OPT = "--xla_backend_optimization_level=0"
if NO_LLVM_OPT not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {NO_LLVM_OPT}".strip()


@pytest.fixture(scope="module")
def compilation_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A persistent compilation cache shared by the session's test modules.

    Most of a training test's time is XLA compilation; a run whose config matches an earlier
    one (another module's, or a subprocess pointed here) loads the compiled step instead. The
    previous JAX settings are restored when the module ends.
    """
    path = tmp_path_factory.getbasetemp() / "jax-compilation-cache"
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {name: getattr(jax.config, name) for name in names}
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    compilation_cache.reset_cache()
    yield path
    for name, value in old.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()

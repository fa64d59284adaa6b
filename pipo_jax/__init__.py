"""pipo-jax: PIPO (Pair-In, Pair-Out latent multi-token prediction) in JAX/Flax.

``pipo_jax.load(run_dir)`` returns a ``PipoRunner`` whose ``generate`` decodes with PIPO or with
the run's autoregressive baseline. The names are imported on first use, so ``import pipo_jax``
(or ``pipo_jax.config``) costs nothing until one is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipo_jax.decode.runner import Generation, PipoRunner, load

__all__ = ["Generation", "PipoRunner", "load"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("pipo_jax.decode.runner"), name)
    raise AttributeError(f"module 'pipo_jax' has no attribute {name!r}")

"""pipo-jax: PIPO (Pair-In, Pair-Out latent multi-token prediction) in JAX/Flax.

``pipo_jax.load(run_dir)`` returns a ``PipoRunner`` whose ``generate`` decodes with PIPO or with
the run's autoregressive baseline.
"""

from pipo_jax.api import Generation, PipoRunner, load

__all__ = ["Generation", "PipoRunner", "load"]

"""pipo-jax: PIPO (Pair-In, Pair-Out latent multi-token prediction) in JAX/Flax."""

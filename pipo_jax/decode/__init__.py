"""Decoding: the on-device engine (AR and PIPO, one while-loop) and the runner behind
`pipo_jax.load`."""

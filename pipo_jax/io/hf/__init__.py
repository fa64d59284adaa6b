"""Hugging Face checkpoints: the key mapping (``mapping``) and the converters (``convert``,
``python -m pipo_jax.io.hf.convert``)."""

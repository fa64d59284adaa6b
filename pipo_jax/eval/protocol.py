"""Evaluation protocol: named presets of sampling options and the per-request seeds.

``--preset paper`` is the paper's evaluation setting (PAPER §4, §9.2): 4 samples per question,
temperature 1.0, top-p 0.95, top-k 20, presence penalty 1.5, confidence threshold 0.95 (the
reference eval script's default). Flags given explicitly override preset values. The budget
(``max_new_tokens``) is not part of the preset: the paper's 32K is far beyond the embedded
models' context, so it stays the run's ``decode.max_new_tokens`` unless ``--max-new-tokens``.

PIPO and AR always decode with the same options and the same ``max_new_tokens``, which counts
REAL (non-PAD) tokens for both. The reference code instead doubles PIPO's ``max_new_tokens``
"to align slots" (PAPER §9.6), letting PIPO emit up to twice as many real tokens as the
baseline; an equal budget of real tokens keeps the accuracy comparison fair.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pipo_jax.config import ConfigError

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"samples": 4, "temperature": 1.0, "top_p": 0.95, "top_k": 20,
              "presence_penalty": 1.5, "threshold": 0.95},
}
DEFAULT_SAMPLES = 1


def resolve_options(preset: str | None, explicit: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """``(samples, decode options)`` from a preset and explicitly given values (None = not
    given); explicit values win, and options given by neither are left to the run's config."""
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    merged = dict(PRESETS[preset]) if preset else {}
    merged.update({k: v for k, v in explicit.items() if v is not None})
    samples = merged.pop("samples", DEFAULT_SAMPLES)
    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    return samples, merged


def sample_seed(base_seed: int, question_id: str, sample: int) -> int:
    """The sampling seed of one (question, sample), in [0, 2**31).

    A stable hash (not Python's salted ``hash``) of the base seed, the question id and the sample
    index: a question's samples do not depend on which other questions run, in what order or
    batch, or whether the evaluation was resumed. PIPO and AR get the same seeds.
    """
    digest = hashlib.blake2b(f"{base_seed}\0{question_id}\0{sample}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**31

"""Choosing tokens from logits: greedy, temperature, top-k, top-p, presence penalty, and the
per-request PRNG keys that make a request's samples independent of its batch-mates."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pipo_jax.io.tokenizer import Tokenizer

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Static sampling options (hashable: they select a compiled program)."""

    temperature: float = 0.0  # 0 → greedy
    top_k: int = 0  # 0 → off
    top_p: float = 1.0  # 1 → off
    presence_penalty: float = 0.0
    # Ids from here on are never drawn: the embedding's padding rows past the tokenizer's
    # vocabulary (Qwen3.5 pads 248,077 tokens to 248,320 rows). 0 → every id may be drawn.
    vocab_limit: int = 0


def vocab_limit(tokenizer: Tokenizer, vocab_size: int) -> int:
    """``SamplingParams.vocab_limit`` for a model of ``vocab_size`` rows: the tokenizer's own
    vocabulary size when the embedding has padding rows past it, else 0 (no limit)."""
    text_vocab = getattr(tokenizer, "tokenizer_vocab_size", vocab_size)
    return text_vocab if text_vocab < vocab_size else 0


def request_keys(seeds: Sequence[int]) -> Array:
    """One PRNG key per request, so a request's samples do not depend on its batch-mates."""
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def adjusted_logits(logits_BxV: Array, seen_BxV: Array | None, sp: SamplingParams,
                    forbid: int | None) -> Array:
    """The logits ``sample`` draws from (float32): presence penalty, ``forbid`` and the vocab
    limit applied; then, when sampling, temperature, top-k and top-p (cut tokens at -inf).
    Greedy takes their argmax; speculative sampling compares their softmaxes."""
    logits = logits_BxV.astype(jnp.float32)
    if sp.presence_penalty:
        assert seen_BxV is not None
        logits = logits - sp.presence_penalty * seen_BxV.astype(jnp.float32)
    if forbid is not None:
        logits = logits.at[:, forbid].set(-jnp.inf)
    if sp.vocab_limit:
        logits = logits.at[:, sp.vocab_limit:].set(-jnp.inf)
    if sp.temperature == 0.0:
        return logits
    logits = logits / sp.temperature
    if sp.top_k:
        kth = jax.lax.top_k(logits, sp.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sp.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Smallest logit still inside the nucleus (the first token is always kept).
        n_keep = jnp.maximum(jnp.sum(mass_before < sp.top_p, axis=-1, keepdims=True), 1)
        cutoff = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample(logits_BxV: Array, keys_B: Array, seen_BxV: Array | None, sp: SamplingParams,
           forbid: int | None, step: Array | int = 0, slot: int = 0) -> Array:
    """Samples one token per row (greedy when ``temperature == 0``); ``forbid`` is never drawn.

    ``seen_BxV`` (the tokens emitted so far) is read only with a presence penalty. Row ``b``
    draws with ``fold_in(fold_in(keys_B[b], step[b]), slot)`` (``step``: a scalar or one per
    row, the row's own decode step), so a request's samples depend only on its own key and
    position in the output, not on its batch-mates or when it joined the batch.
    """
    logits = adjusted_logits(logits_BxV, seen_BxV, sp, forbid)
    if sp.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), keys_B.shape)
    keys = jax.vmap(lambda k, s: jax.random.fold_in(jax.random.fold_in(k, s), slot))(keys_B,
                                                                                   steps)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def mark_seen(seen_BxV: Array | None, tokens_B: Array, mask_B: Array) -> Array | None:
    """Records emitted tokens for the presence penalty (None when it is off: nothing kept)."""
    if seen_BxV is None:
        return None
    return seen_BxV.at[jnp.arange(tokens_B.shape[0]), tokens_B].max(mask_B)

"""Attention of new positions (one decode step, or a prompt chunk) against a key/value cache.

Each row ``b`` of the cache holds its keys and values in slots ``start[b] ≤ s < length[b]``;
the ``C`` new positions sit at slots ``length[b] … length[b] + C - 1`` and attend to the filled
slots and, causally, to each other. Two forms with one result (``docs/decode_engine.md``):

* ``masked``: scores against every allocated slot, masked: the reference. Its cost is the
  allocation (prompt + whole budget), whatever is filled.
* ``blocked``: a loop over fixed-size key/value blocks from the first filled block to the last,
  with an online softmax (running max, running sum), then the new positions themselves. Its
  cost follows the filled part: at a 32K budget, step 1 reads one block, not 32K slots.

Written here rather than taken from a library because the portable kernel has to run inside
the decode loop on CPU (tests) and on every backend with per-row lengths; the library kernels
(cuDNN through ``jax.nn.dot_product_attention``, Pallas ragged paged attention on TPU) want
their own cache layouts and cannot be validated without the device. Shapes: ``B`` batch,
``C`` new positions, ``S`` slots, ``K`` key/value heads, ``G`` query heads per key head,
``D`` head dim. All scores and sums in float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

Array = jax.Array
_NEG_INF = -1e30
IMPLEMENTATIONS = ("blocked", "masked")


@dataclasses.dataclass(frozen=True)
class CacheAttention:
    """How decode and chunked prefill attend to the cache: ``impl`` (``blocked`` or
    ``masked``) and, for ``blocked``, the key/value block size in slots (the allocation is a
    multiple of it)."""

    impl: str = "blocked"
    block: int = 256

    def __post_init__(self) -> None:
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention impl must be one of {IMPLEMENTATIONS}, got {self.impl!r}")
        if self.block <= 0:
            raise ValueError(f"attention block must be positive, got {self.block}")


def _new_scores(q_BxCxKxGxD: Array, k_BxCxKxD: Array, start_B: Array,
                length_B: Array) -> tuple[Array, Array]:
    """Scores of the new positions against themselves (B×K×G×C×C) and their mask: causal, and a
    new key is real only at a slot ≥ ``start`` (a chunk may begin inside a row's left pad)."""
    c = q_BxCxKxGxD.shape[1]
    s = jnp.einsum("bckgd,bjkd->bkgcj", q_BxCxKxGxD, k_BxCxKxD,
                   preferred_element_type=jnp.float32)
    slot = length_B[:, None] + jnp.arange(c)[None]  # B × C
    real = slot >= start_B[:, None]
    mask = jnp.tril(jnp.ones((c, c), bool))[None] & real[:, None, :]  # B × C × C
    return s, mask[:, None, None]


def _filled(slot: Array, start_B: Array, length_B: Array) -> Array:
    """B × 1 × 1 × 1 × n mask of the filled slots among ``slot`` (n)."""
    m = (slot[None] >= start_B[:, None]) & (slot[None] < length_B[:, None])
    return m[:, None, None, None, :]


def attend(q_BxCxKxGxD: Array, k_BxCxKxD: Array, v_BxCxKxD: Array, cache_k_BxSxKxD: Array,
           cache_v_BxSxKxD: Array, start_B: Array, length_B: Array,
           spec: CacheAttention) -> Array:
    """Attention output B×C×K×G×D (float32) of ``C`` new positions (queries already scaled)."""
    if spec.impl == "masked":
        return _masked(q_BxCxKxGxD, k_BxCxKxD, v_BxCxKxD, cache_k_BxSxKxD, cache_v_BxSxKxD,
                       start_B, length_B)
    return _blocked(q_BxCxKxGxD, k_BxCxKxD, v_BxCxKxD, cache_k_BxSxKxD, cache_v_BxSxKxD,
                    start_B, length_B, spec.block)


def _masked(q: Array, k: Array, v: Array, ck: Array, cv: Array, start: Array,
            length: Array) -> Array:
    s_cache = jnp.einsum("bckgd,bskd->bkgcs", q, ck, preferred_element_type=jnp.float32)
    m_cache = _filled(jnp.arange(ck.shape[1]), start, length)
    s_new, m_new = _new_scores(q, k, start, length)
    scores = jnp.concatenate([jnp.where(m_cache, s_cache, _NEG_INF),
                              jnp.where(m_new, s_new, _NEG_INF)], axis=-1)
    probs = jax.nn.softmax(scores, axis=-1)
    n = ck.shape[1]
    return (jnp.einsum("bkgcs,bskd->bckgd", probs[..., :n], cv.astype(jnp.float32))
            + jnp.einsum("bkgcj,bjkd->bckgd", probs[..., n:], v.astype(jnp.float32)))


def _blocked(q: Array, k: Array, v: Array, ck: Array, cv: Array, start: Array, length: Array,
             block: int) -> Array:
    b, c, nk, g, d = q.shape
    slots = ck.shape[1]
    block = min(block, slots)
    if slots % block:
        raise ValueError(f"a cache of {slots} slots is not a multiple of the attention block "
                         f"{block}: allocate slots in multiples of the block")

    def fold(carry: tuple[Array, Array, Array], s: Array, mask: Array,
             vals: Array, eq: str) -> tuple[Array, Array, Array]:
        # Online softmax: rescale what was summed so far to the new running max.
        m, l_sum, acc = carry
        s = jnp.where(mask, s, _NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l_sum = l_sum * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum(eq, p, vals.astype(jnp.float32))
        return m_new, l_sum, acc

    def body(j: Array, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        kb = jax.lax.dynamic_slice_in_dim(ck, j * block, block, axis=1)
        vb = jax.lax.dynamic_slice_in_dim(cv, j * block, block, axis=1)
        s = jnp.einsum("bckgd,bskd->bkgcs", q, kb, preferred_element_type=jnp.float32)
        mask = _filled(j * block + jnp.arange(block), start, length)
        return fold(carry, s, mask, vb, "bkgcs,bskd->bkgcd")

    init = (jnp.full((b, nk, g, c), _NEG_INF, jnp.float32), jnp.zeros((b, nk, g, c), jnp.float32),
            jnp.zeros((b, nk, g, c, d), jnp.float32))
    # Only the blocks some row has filled: the loop's trip count is the filled length.
    first = jnp.min(start) // block
    last = (jnp.max(length) + block - 1) // block
    carry = jax.lax.fori_loop(first, last, body, init)
    s_new, m_new = _new_scores(q, k, start, length)
    _, l_sum, acc = fold(carry, s_new, m_new, v, "bkgcj,bjkd->bkgcd")
    # A query with nothing to attend to (inside a left pad) gets 0, not 0/0.
    out = acc / jnp.where(l_sum > 0, l_sum, 1.0)[..., None]
    return out.transpose(0, 3, 1, 2, 4)

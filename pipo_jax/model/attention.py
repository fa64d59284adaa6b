"""Attention of new positions (one decode step, or a prompt chunk) against a key/value cache.

Each row ``b`` of the cache holds its keys and values in slots ``start[b] ≤ s < length[b]``;
the ``C`` new positions are written at slots ``length[b] … length[b] + C - 1`` and attend to the
filled slots and, causally, to each other. Two forms with one result
(``docs/decode_engine.md``):

* ``masked``: scores against every allocated slot, masked: the reference. Its cost is the
  allocation (prompt + whole budget), whatever is filled.
* ``blocked``: a loop over fixed-size key/value blocks from the first filled block to the last,
  with an online softmax (running max, running sum), then the new positions themselves. Its
  cost follows the filled part: at a 32K budget, step 1 reads one block, not 32K slots.
* ``xla`` / ``cudnn``: the library kernel, ``jax.nn.dot_product_attention`` with that
  ``implementation``, over the layer's whole allocation with ``key_value_seq_lengths`` (the
  fill plus the new positions) and a mask for the left pad and the causal order inside a
  chunk. ``cudnn`` is the GPU switch (bf16/fp16 only); ``xla`` is the same call on any backend,
  which is how CPU tests hold the library form to the portable one.

The portable ``blocked`` form is written here because it has to run inside the decode loop on
CPU (tests) and on every backend with per-row lengths, and because its cost provably follows
the fill; the library form's does only as far as the kernel skips tiles past
``key_value_seq_lengths`` (cuDNN's padding mask), which cannot be measured without a device
(``docs/decode_engine.md``). Pallas ragged paged attention (TPU) wants a paged, k/v-interleaved
cache layout and is not wired. Shapes: ``B`` batch,
``C`` new positions, ``S`` slots, ``K`` key/value heads, ``G`` query heads per key head,
``D`` head dim. All scores and sums in float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pipo_jax.config.schema import ATTENTION_IMPLS

Array = jax.Array
_NEG_INF = -1e30
IMPLEMENTATIONS = ATTENTION_IMPLS


@dataclasses.dataclass(frozen=True)
class CacheAttention:
    """How decode and chunked prefill attend to the cache: ``impl`` (one of
    ``IMPLEMENTATIONS``) and the key/value block size in slots (the allocation is a multiple of
    it; the block loop of ``blocked`` steps by it)."""

    impl: str = "blocked"
    block: int = 256

    def __post_init__(self) -> None:
        if self.impl not in IMPLEMENTATIONS:
            raise ValueError(f"attention impl must be one of {IMPLEMENTATIONS}, got {self.impl!r}")
        if self.block <= 0:
            raise ValueError(f"attention block must be positive, got {self.block}")


def _allowed(slot_n: Array, start_B: Array, length_B: Array, c: int) -> Array:
    """B × 1 × 1 × C × n mask: query ``i`` (at slot ``length + i``) sees the filled slots and
    the new ones up to itself, ``start ≤ slot ≤ length + i``."""
    last = length_B[:, None] + jnp.arange(c)[None]  # B × C
    m = (slot_n[None, None] >= start_B[:, None, None]) & (slot_n[None, None] <= last[..., None])
    return m[:, None, None]


def _block(cache: Array, layer: Array | None, first: Array, size: int) -> Array:
    """Slots ``first … first + size - 1`` of ``cache`` (``[nb ×] B × S × K × D``) for one
    layer → B × size × K × D, sliced straight from the (stacked) cache: no copy of a layer."""
    if layer is None:
        return jax.lax.dynamic_slice_in_dim(cache, first, size, axis=1)
    b, _, k, d = cache.shape[1:]
    return jax.lax.dynamic_slice(cache, (layer, 0, first, 0, 0), (1, b, size, k, d))[0]


def attend(q_BxCxKxGxD: Array, cache_k: Array, cache_v: Array, layer: Array | None,
           start_B: Array, length_B: Array, spec: CacheAttention) -> Array:
    """Attention output B×C×K×G×D (float32) of ``C`` new positions (queries already scaled)
    whose keys and values are already written at slots ``length … length + C - 1`` of the
    cache (``[nb ×] B × S × K × D``; ``layer`` picks the block of a stacked cache).

    The new rows are written first and then read back, not attended beside the cache: an
    in-place write after a read of the same loop-carried buffer makes XLA copy the whole cache
    every step, which is a cost that grows with the allocation, not the fill.
    """
    c = q_BxCxKxGxD.shape[1]
    if spec.impl in ("xla", "cudnn"):
        return _library(q_BxCxKxGxD, cache_k, cache_v, layer, start_B, length_B, spec.impl)
    if spec.impl == "masked":
        ck = cache_k if layer is None else cache_k[layer]
        cv = cache_v if layer is None else cache_v[layer]
        s = jnp.einsum("bckgd,bskd->bkgcs", q_BxCxKxGxD, ck, preferred_element_type=jnp.float32)
        s = jnp.where(_allowed(jnp.arange(ck.shape[1]), start_B, length_B, c), s, _NEG_INF)
        probs = jax.nn.softmax(s, axis=-1)
        return jnp.einsum("bkgcs,bskd->bckgd", probs, cv.astype(jnp.float32))
    return _blocked(q_BxCxKxGxD, cache_k, cache_v, layer, start_B, length_B, spec.block)


def _blocked(q: Array, ck: Array, cv: Array, layer: Array | None, start: Array, length: Array,
             block: int) -> Array:
    b, c, nk, g, d = q.shape
    slots = ck.shape[-3]
    block = min(block, slots)
    if slots % block:
        raise ValueError(f"a cache of {slots} slots is not a multiple of the attention block "
                         f"{block}: allocate slots in multiples of the block")

    def body(j: Array, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        # Online softmax: rescale what was summed so far to the new running max.
        m, l_sum, acc = carry
        kb, vb = _block(ck, layer, j * block, block), _block(cv, layer, j * block, block)
        s = jnp.einsum("bckgd,bskd->bkgcs", q, kb, preferred_element_type=jnp.float32)
        mask = _allowed(j * block + jnp.arange(block), start, length, c)
        s = jnp.where(mask, s, _NEG_INF)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l_sum = l_sum * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("bkgcs,bskd->bkgcd", p,
                                                 vb.astype(jnp.float32))
        return m_new, l_sum, acc

    init = (jnp.full((b, nk, g, c), _NEG_INF, jnp.float32), jnp.zeros((b, nk, g, c), jnp.float32),
            jnp.zeros((b, nk, g, c, d), jnp.float32))
    # Only the blocks some row has filled: the loop's trip count is the filled length.
    first = jnp.min(start) // block
    last = (jnp.max(length) + c + block - 1) // block
    _, l_sum, acc = jax.lax.fori_loop(first, last, body, init)
    # A query with nothing to attend to (inside a left pad) gets 0, not 0/0.
    out = acc / jnp.where(l_sum > 0, l_sum, 1.0)[..., None]
    return out.transpose(0, 3, 1, 2, 4)


def _library(q: Array, ck: Array, cv: Array, layer: Array | None, start: Array, length: Array,
             implementation: str) -> Array:
    """``jax.nn.dot_product_attention`` over the layer's allocation: ``key_value_seq_lengths``
    bounds the fill (what cuDNN's padding mask can skip), the boolean mask adds the left pad and
    the causal order of the chunk. Queries are already scaled (``scale=1``)."""
    b, c, nk, g, d = q.shape
    ck = ck if layer is None else ck[layer]
    cv = cv if layer is None else cv[layer]
    mask = _allowed(jnp.arange(ck.shape[1]), start, length, c)[:, 0]  # B × 1 × C × S
    out = jax.nn.dot_product_attention(
        q.reshape(b, c, nk * g, d).astype(ck.dtype), ck, cv, mask=mask, scale=1.0,
        key_value_seq_lengths=(length + c).astype(jnp.int32), implementation=implementation)
    out = out.reshape(b, c, nk, g, d).astype(jnp.float32)
    # A query inside a left pad has nothing to attend to: 0, as the other forms give.
    real = (length[:, None] + jnp.arange(c)[None]) >= start[:, None]
    return jnp.where(real[:, :, None, None, None], out, 0.0)

"""Decode caches: what each layer type keeps between decode steps, as named pytrees.

* ``AttentionCache``: keys and values of a full-attention layer, one row per slot (``S``
  slots), written in place at the slot being decoded;
* ``DeltaNetCache``: the Gated DeltaNet's causal-conv window and recurrent state, replaced
  every step (their size does not grow with the context);
* ``DecodeCache``: the backbone's caches (one per layer-pattern slot, stacked over its
  ``n_blocks`` repeats), the PIPO MTP layer's own ``AttentionCache``, and, per row, which slots
  are filled: ``start ≤ slot < length``.

Each row's filled slots are one contiguous run: a left-padded prompt starts at ``start``, and
every backbone pass appends one slot at ``length``. So "what a query may attend to" is two
integers per row rather than a B×S mask, every row can be at its own length (continuous
batching), and decode attention can stop at the filled part (``pipo_jax.model.attention``).

A layer's ``extend`` writes its C new key/value rows at each row's ``length`` (its block of the
stacked cache, ``put_block_rows``) before reading the cache, or replaces its DeltaNet states,
and returns the updated cache; the caller advances ``length`` (``next_slot``). The one-shot
prefill of a whole prompt puts its rows in place with ``DecodeCache.write``. The caches live
in the decode loop's carry, so nothing here allocates per step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from pipo_jax.config import ModelConfig

Array = jax.Array


@struct.dataclass
class AttentionCache:
    """Full-attention keys and values, each ``[n_blocks ×] B × S × K × D`` (the MTP layer's has
    no block axis). In a layer's output: the new row, ``B × 1 × K × D``."""

    k: Array
    v: Array


@struct.dataclass
class DeltaNetCache:
    """Gated DeltaNet state: the last ``kernel-1`` projected inputs ``[n_blocks ×] B ×
    (kernel-1) × C`` and the recurrent state ``[n_blocks ×] B × N × dk × dv`` (float32)."""

    conv: Array
    state: Array


LayerCache = AttentionCache | DeltaNetCache
# The Flax collection a verify pass sows each Gated DeltaNet layer's per-position states into
# (``DeltaNetCache(window B×(kernel-1+C)×conv, states B×C×N×dk×dv)``, stacked over blocks).
KEPT = "kept"


@struct.dataclass
class DecodeCache:
    """Everything a decode step reads and writes besides the parameters.

    ``layers[j]`` is pattern slot ``j`` of the backbone (``ModelConfig.layer_pattern``), stacked
    over blocks. Row ``b`` holds positions in slots ``start[b] ≤ slot < length[b]`` (B int32
    each); the next pass writes at ``length[b]``. ``mtp`` is the PIPO MTP layer's cache (None
    for AR, or PIPO decoding without drafts).
    """

    layers: tuple[LayerCache, ...]
    start: Array
    length: Array
    mtp: AttentionCache | None = None

    @property
    def slots(self) -> int:
        """``S``, the slots allocated per row."""
        for layer in (*self.layers, self.mtp):
            if isinstance(layer, AttentionCache):
                return layer.k.shape[-3]
        return 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, slots: int, mtp: bool,
              dtype: Any) -> DecodeCache:
        """Zero keys/values, conv and recurrent states; nothing filled (``start = length = 0``)."""
        nb = cfg.n_blocks
        layers: list[LayerCache] = []
        for layer_type in cfg.layer_pattern:
            if layer_type == "full_attention":
                kv = jnp.zeros((nb, batch, slots, cfg.n_kv_heads, cfg.head_dim), dtype)
                layers.append(AttentionCache(kv, kv))
            else:
                conv = jnp.zeros((nb, batch, cfg.linear_conv_kernel - 1, cfg.linear_conv_dim),
                                 dtype)
                state = jnp.zeros((nb, batch, cfg.linear_n_value_heads, cfg.linear_key_head_dim,
                                   cfg.linear_value_head_dim), jnp.float32)
                layers.append(DeltaNetCache(conv, state))
        mtp_kv = None
        if mtp:
            zeros = jnp.zeros((batch, slots, cfg.n_kv_heads, cfg.head_dim), dtype)
            mtp_kv = AttentionCache(zeros, zeros)
        zeros_b = jnp.zeros((batch,), jnp.int32)
        return cls(layers=tuple(layers), start=zeros_b, length=zeros_b, mtp=mtp_kv)

    def write(self, made: tuple[LayerCache, ...], index_B: Array | None = None) -> DecodeCache:
        """What the backbone's layers made, put in place: C key/value rows per row (C = 1 for a
        decode step, a chunk of a prompt) at slot ``index_B`` (default ``length``); DeltaNet
        states replace the old ones."""
        index_B = self.length if index_B is None else index_B
        out: list[LayerCache] = []
        for old, new in zip(self.layers, made, strict=True):
            if isinstance(old, AttentionCache):
                out.append(AttentionCache(put_rows(old.k, new.k, index_B, stacked=True),
                                          put_rows(old.v, new.v, index_B, stacked=True)))
            else:
                out.append(DeltaNetCache(new.conv.astype(old.conv.dtype),
                                         new.state.astype(old.state.dtype)))
        return self.replace(layers=tuple(out))

    def write_mtp(self, made: AttentionCache, index_B: Array | None = None) -> DecodeCache:
        """The MTP layer's key/value rows, put in place at slot ``index_B`` (default
        ``length``)."""
        assert self.mtp is not None
        index_B = self.length if index_B is None else index_B
        return self.replace(mtp=AttentionCache(put_rows(self.mtp.k, made.k, index_B),
                                               put_rows(self.mtp.v, made.v, index_B)))

    def keep_position(self, kept: tuple[DeltaNetCache | None, ...],
                      index_B: Array) -> DecodeCache:
        """Rolls the Gated DeltaNet layers back to the state after new position ``index[b]``
        of a verify pass, from what it kept per position (``kept[j]`` for pattern slot ``j``,
        None for attention slots; see ``KEPT``). Key/value rows need nothing: those past the
        accepted position lie past ``length``."""
        out: list[LayerCache] = []
        for old, k in zip(self.layers, kept, strict=True):
            if k is None:
                out.append(old)
                continue
            assert isinstance(old, DeltaNetCache)
            width = old.conv.shape[-2]

            def conv(w: Array, i: Array, width: int = width) -> Array:  # w: nb × W × C
                return jax.lax.dynamic_slice_in_dim(w, i + 1, width, axis=1)

            def state(s: Array, i: Array) -> Array:  # s: nb × T × N × dk × dv
                return jax.lax.dynamic_index_in_dim(s, i, axis=1, keepdims=False)

            out.append(DeltaNetCache(
                jax.vmap(conv, in_axes=(1, 0), out_axes=1)(k.conv, index_B).astype(
                    old.conv.dtype),
                jax.vmap(state, in_axes=(1, 0), out_axes=1)(k.state, index_B).astype(
                    old.state.dtype)))
        return self.replace(layers=tuple(out))

    def next_slot(self, active_B: Array, n: int = 1) -> DecodeCache:
        """The ``n`` slots just written become filled for the rows still running."""
        return self.replace(length=self.length + n * active_B.astype(jnp.int32))


def put_block_rows(cache: Array, rows_BxCxKxD: Array, block: Array | None,
                   index_B: Array) -> Array:
    """``rows`` written into layer ``block`` of a stacked cache (``nb × B × S × K × D``; an
    unstacked ``B × S × K × D`` one when ``block`` is None) at slot ``index_B[b]`` of each row."""
    if block is None:
        return put_rows(cache, rows_BxCxKxD, index_B)

    def one(c: Array, r: Array, i: Array) -> Array:  # c: nb × S × K × D, r: C × K × D
        zero = jnp.zeros((), jnp.int32)
        return jax.lax.dynamic_update_slice(c, r[None].astype(c.dtype), (block, i, zero, zero))

    return jax.vmap(one, in_axes=(1, 0, 0), out_axes=1)(cache, rows_BxCxKxD, index_B)


def put_rows(cache: Array, rows: Array, index_B: Array, stacked: bool = False) -> Array:
    """Writes ``rows`` (``[nb ×] B × C × …``) into ``cache`` (``[nb ×] B × S × …``) at slot
    ``index_B[b]`` of each row ``b``: one in-place dynamic-update-slice per row."""

    axis = 1 if stacked else 0  # the batch axis; the slot axis is the next one

    def one(c: Array, r: Array, i: Array) -> Array:
        return jax.lax.dynamic_update_slice_in_dim(c, r.astype(c.dtype), i, axis=axis)

    return jax.vmap(one, in_axes=(axis, axis, 0), out_axes=axis)(cache, rows, index_B)

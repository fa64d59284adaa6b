"""Decode caches: what each layer type keeps between decode steps, as named pytrees.

* ``AttentionCache``: keys and values of a full-attention layer, one row per slot (``S``
  slots), written in place at the slot being decoded;
* ``DeltaNetCache``: the Gated DeltaNet's causal-conv window and recurrent state, replaced
  every step (their size does not grow with the context);
* ``DecodeCache``: the backbone's caches (one per layer-pattern slot, stacked over its
  ``n_blocks`` repeats), the PIPO MTP layer's own ``AttentionCache``, and which slots hold a
  position a query may attend to.

A layer's ``decode`` reads its cache and returns what it made (a B×1 key/value row, or the new
DeltaNet states) in the same type; ``DecodeCache.write`` puts it in place. The caches live in
the decode loop's carry, so nothing here allocates per step.
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


@struct.dataclass
class DecodeCache:
    """Everything a decode step reads and writes besides the parameters.

    ``layers[j]`` is pattern slot ``j`` of the backbone (``ModelConfig.layer_pattern``), stacked
    over blocks. ``valid`` B × S marks the slots a query may attend to; ``index`` is the next
    slot to write. ``mtp`` is the PIPO MTP layer's cache (None for AR, or PIPO decoding without
    drafts).
    """

    layers: tuple[LayerCache, ...]
    valid: Array
    index: Array
    mtp: AttentionCache | None = None

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, slots: int, mtp: bool,
              dtype: Any) -> DecodeCache:
        """Zero keys/values, conv and recurrent states; no slot valid, ``index`` 0."""
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
        return cls(layers=tuple(layers), valid=jnp.zeros((batch, slots), bool),
                   index=jnp.int32(0), mtp=mtp_kv)

    def write(self, made: tuple[LayerCache, ...], index: Array | int) -> DecodeCache:
        """What the backbone's layers made, put in place: key/value rows (any number, e.g. a
        whole prompt) at slot ``index``; DeltaNet states replace the old ones."""
        out: list[LayerCache] = []
        for old, new in zip(self.layers, made, strict=True):
            if isinstance(old, AttentionCache):
                out.append(AttentionCache(_put(old.k, new.k, index, 2),
                                          _put(old.v, new.v, index, 2)))
            else:
                out.append(DeltaNetCache(new.conv.astype(old.conv.dtype),
                                         new.state.astype(old.state.dtype)))
        return self.replace(layers=tuple(out))

    def write_mtp(self, made: AttentionCache, index: Array | int) -> DecodeCache:
        """The MTP layer's key/value rows, put in place at slot ``index``."""
        assert self.mtp is not None
        return self.replace(mtp=AttentionCache(_put(self.mtp.k, made.k, index, 1),
                                               _put(self.mtp.v, made.v, index, 1)))

    def mark_valid(self, valid_BxL: Array) -> DecodeCache:
        """Marks prefilled slots ``0 … L-1`` (where ``valid``) attendable; next slot ``L``."""
        return self.replace(valid=jax.lax.dynamic_update_slice(self.valid, valid_BxL, (0, 0)),
                            index=jnp.int32(valid_BxL.shape[1]))

    def next_slot(self, active_B: Array) -> DecodeCache:
        """Marks the slot just written attendable (for the rows still running) and moves on."""
        col = active_B[:, None]
        return self.replace(valid=jax.lax.dynamic_update_slice(self.valid, col, (0, self.index)),
                            index=self.index + 1)


def _put(cache: Array, rows: Array, index: Array | int, slot_axis: int) -> Array:
    start = [0] * cache.ndim
    start[slot_axis] = index
    return jax.lax.dynamic_update_slice(cache, rows.astype(cache.dtype), tuple(start))

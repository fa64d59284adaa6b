"""Low-rank adapters (LoRA) for the projections of the backbone and the MTP layer (SPEC §4).

A projection ``y = x·W`` with an adapter computes ``y = x·W + (alpha / rank) · drop(x)·A·B``
with ``A`` (``in… × rank``) initialised like PEFT's (uniform ``±1/√fan_in``) and ``B``
(``rank × out…``) at zero, so a fresh adapter leaves the model unchanged. ``W`` stays in the tree
as ``kernel`` and the adapter's factors sit beside it as ``lora_a`` / ``lora_b``: merging is
``kernel + scale · A·B``, and a merged tree has exactly the layout of a model without LoRA.

Why not a library: ``flax.nnx.LoRA`` exists only for NNX modules. ``jax-lorax``, the option
for Linen, is a whole-function transform built on Qax's implicit arrays (a small project tested
mainly with Haiku): its implicit arrays would have to pass through ``nn.scan``, remat and the
sharded ``jit``, and the adapters would live outside the parameter tree that the checkpoints,
the logical sharding rules and the Hugging Face key table read. The explicit module below is a
subclass of ``nn.DenseGeneral`` (same ``kernel`` and logical axes), so all of those see the
layout they already know.

Trainable sets (``tuner``):
* ``full``: every parameter.
* ``lora``: the adapters, plus the PIPO modules SPEC §4 trains fully: compressor, confidence
  head, the MTP head's ``fc``, its two pre-fc norms and its final norm. Embeddings, LM head, the
  backbone (Gated DeltaNet projections included, PAPER §2.6) and the MTP layer's own weights and
  norms stay frozen.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from pipo_jax.config import LoraConfig

Array = jax.Array
Params = dict[str, Any]

LORA_LEAVES = ("lora_a", "lora_b")
# Parameter paths (prefixes) that the ``lora`` tuner trains fully, besides the adapters.
FULLY_TRAINED = (("compressor",), ("confidence_head",), ("mtp_head", "fc"),
                 ("mtp_head", "norm_emb"), ("mtp_head", "norm_hidden"),
                 ("mtp_head", "final_norm"))


def _uniform_fan_in(fan_in: int) -> nn.initializers.Initializer:
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _dropout(x: Array, rate: float, key: Array) -> Array:
    """Inverted dropout whose mask comes from 16 random bits per element instead of a float32
    uniform: on CPU it costs a quarter of ``jax.random.bernoulli``'s time (a LoRA step draws one
    mask per adapted projection), and the rate is exact to 1/65536."""
    drop = round(rate * 65536)
    keep = jax.random.bits(key, x.shape, jnp.uint16) >= drop
    return jnp.where(keep, x * (65536 / (65536 - drop)), 0).astype(x.dtype)


class LoraDenseGeneral(nn.DenseGeneral):
    """``nn.DenseGeneral`` (no bias) with an optional adapter on the same input.

    ``in_axes_names`` / ``out_axes_names`` are the logical axis names of the kernel's input and
    output dims (the kernel's own are ``in + out``); the adapter's rank axis is ``lora``.
    ``name`` must be the projection's (``q_proj``…) so that ``lora.targets`` can select it.
    """

    lora: LoraConfig | None = None
    in_axes_names: tuple[str, ...] = ()
    out_axes_names: tuple[str, ...] = ()

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        y = super().__call__(inputs)
        if self.lora is None or self.name not in self.lora.targets:
            return y
        axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        in_shape = tuple(inputs.shape[a] for a in axis)
        features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        r = self.lora.rank
        a = self.param("lora_a", nn.with_logical_partitioning(
            _uniform_fan_in(math.prod(in_shape)), (*self.in_axes_names, "lora")),
            (*in_shape, r), self.param_dtype)
        b = self.param("lora_b", nn.with_logical_partitioning(
            nn.initializers.zeros, ("lora", *self.out_axes_names)), (r, *features),
            self.param_dtype)
        x = inputs
        if self.lora.dropout > 0 and self.has_rng("dropout"):
            x = _dropout(x, self.lora.dropout, self.make_rng("dropout"))
        dt = self.dtype or inputs.dtype
        n_in = len(axis)
        # The contracted input axes are the trailing ones in every use (checked by the shapes).
        low = jnp.tensordot(x.astype(dt), a.astype(dt), axes=n_in)  # … × rank
        delta = jnp.tensordot(low, b.astype(dt), axes=1)  # … × out…
        return y + (self.lora.scale * delta).astype(y.dtype)


def _flat(params: Params) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(params)


def has_adapters(params: Params) -> bool:
    return any(path[-1] in LORA_LEAVES for path in _flat(params))


def trainable(path: Sequence[str], tuner: str) -> bool:
    """Whether the parameter at ``path`` (a tuple of names) trains under ``tuner``: everything
    (``full``), the adapters and the PIPO modules (``lora``), the MTP drafter (``mtp``)."""
    if tuner == "full":
        return True
    if tuner == "mtp":  # the MTP drafter on a frozen AR model
        return path[0] == "mtp_head"
    if path[-1] in LORA_LEAVES:
        return True
    return any(tuple(path[:len(p)]) == p for p in FULLY_TRAINED)


def partition(params: Params, tuner: str) -> tuple[Params, Params]:
    """``params`` → (trainable, frozen): two nested dicts whose leaves together are ``params``'s.

    Works on any tree with ``params``'s dict structure (abstract shapes, shardings, boxed
    leaves), so optimizer state and its shardings are built for the trainable part only.
    """
    flat = _flat(params)
    train = {k: v for k, v in flat.items() if trainable(k, tuner)}
    frozen = {k: v for k, v in flat.items() if not trainable(k, tuner)}
    return traverse_util.unflatten_dict(train), traverse_util.unflatten_dict(frozen)


def combine(trainable_params: Params, frozen_params: Params) -> Params:
    """Inverse of ``partition``."""
    flat = dict(_flat(frozen_params))
    flat.update(_flat(trainable_params))
    return traverse_util.unflatten_dict(flat)


def with_adapters(base: Params, fresh: Params) -> Params:
    """``base`` (no adapters) plus the adapter leaves of ``fresh`` (a freshly initialised tree of
    the LoRA model): every other leaf comes from ``base``, whose layout must be ``fresh``'s
    without the adapters."""
    flat_base, flat_fresh = _flat(base), _flat(fresh)
    missing = [k for k in flat_fresh if k not in flat_base and k[-1] not in LORA_LEAVES]
    extra = [k for k in flat_base if k not in flat_fresh]
    if missing or extra:
        raise ValueError(f"parameter layouts differ: missing {['/'.join(k) for k in missing][:4]}, "
                         f"unexpected {['/'.join(k) for k in extra][:4]}")
    return traverse_util.unflatten_dict(
        {k: flat_base.get(k, v) for k, v in flat_fresh.items()})


def merge(params: Params, lora: LoraConfig) -> Params:
    """Folds every adapter into its kernel: ``kernel + scale · A·B`` (computed in float32, cast to
    the kernel's dtype) and drops the adapter leaves. Scanned (stacked) layers merge per layer.
    Works on jax and numpy arrays; jit it for large trees."""
    flat = _flat(params)
    out = {k: v for k, v in flat.items() if k[-1] not in LORA_LEAVES}
    for key in flat:
        if key[-1] != "lora_a":
            continue
        parent = key[:-1]
        a, b, kernel = flat[key], flat[(*parent, "lora_b")], flat[(*parent, "kernel")]
        r = a.shape[-1]
        # Scanned layers carry a leading block axis on all three arrays: then the kernel has one
        # dim fewer than A and B together minus their two rank dims would suggest.
        stacked = kernel.ndim == a.ndim + b.ndim - 3
        xp = jnp if isinstance(kernel, jax.Array) else np
        a32, b32 = xp.asarray(a, xp.float32), xp.asarray(b, xp.float32)
        if stacked:
            delta = xp.einsum("lir,lro->lio", a32.reshape(a.shape[0], -1, r),
                              b32.reshape(b.shape[0], r, -1))
        else:
            delta = a32.reshape(-1, r) @ b32.reshape(r, -1)
        delta = delta.reshape(kernel.shape)
        out[(*parent, "kernel")] = (xp.asarray(kernel, xp.float32)
                                    + lora.scale * delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(out)

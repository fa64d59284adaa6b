"""Qwen3 / Qwen3.5 decoder building blocks: RMSNorm, RoPE, (gated) grouped-query attention,
Gated DeltaNet linear attention, SwiGLU, and the scanned hybrid stack.

Every parameter carries logical axis names (``embed``, ``heads``, ``kv``, ``mlp``, ``vocab``,
``layers``); ``pipo_jax.model.sharding`` maps them onto a device mesh with one rules table.

Every mixer has two modes with the same parameters:
* ``DecoderLayer.__call__``: a whole sequence (training, prefill); returns what a cache needs
  (``pipo_jax.model.cache``): an ``AttentionCache`` of keys/values B×L×K×D or a
  ``DeltaNetCache`` (conv state B×(k-1)×C, recurrent state B×N×dk×dv).
* ``DecoderLayer.extend``: ``C`` new positions (a decode step, or a prompt chunk) against a
  cache: writes their key/value rows into it first (or replaces the DeltaNet states) and
  returns the updated cache.

``Backbone`` runs either mode over the whole stack: with ``cache=`` it extends the cache.

Norm conventions (QWEN3_5.md §2.1): ``family: qwen3`` norms are ``w·x̂`` with ``w`` initialised
to ones; ``qwen3_5`` norms are ``(1 + w)·x̂`` with ``w`` stored as the offset and initialised to
zeros. The DeltaNet's gated output norm is ``w·x̂·silu(z)`` in both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from pipo_jax.config import LoraConfig, ModelConfig
from pipo_jax.model import attention, deltanet, sharding
from pipo_jax.model.attention import CacheAttention
from pipo_jax.model.cache import (
    KEPT,
    AttentionCache,
    DeltaNetCache,
    LayerCache,
    put_block_rows,
)
from pipo_jax.model.lora import LoraDenseGeneral
from pipo_jax.model.self_attention import causal_attention

# Logical axes of the residual stream (and of latents and MTP states), B×L×H.
RESIDUAL_AXES = ("act_batch", "act_length", "act_embed")

Array = jax.Array


def dtype_of(name: str) -> jnp.dtype:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def dense_init(cfg: ModelConfig, axes: tuple[str, ...]) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)


def projection(cfg: ModelConfig, lora: LoraConfig | None, features: int | tuple[int, ...],
               in_axes: tuple[str, ...], out_axes: tuple[str, ...],
               axis: int | tuple[int, ...] = -1, name: str | None = None) -> LoraDenseGeneral:
    """A bias-free projection over the trailing ``axis`` dims, with a LoRA adapter when ``lora``
    targets its ``name`` (in ``setup`` the attribute name is the module name)."""
    return LoraDenseGeneral(features, axis=axis, use_bias=False, dtype=dtype_of(cfg.dtype),
                            param_dtype=dtype_of(cfg.param_dtype),
                            kernel_init=dense_init(cfg, (*in_axes, *out_axes)), lora=lora,
                            in_axes_names=in_axes, out_axes_names=out_axes, name=name)


def _rms(x32: Array, eps: float) -> Array:
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nn.Module):
    """``x / rms(x) · scale`` (or ``· (1 + scale)`` with ``offset``) over the last axis, in fp32."""

    eps: float = 1e-6
    axis_name: str = "embed"
    param_dtype: jnp.dtype = jnp.float32
    offset: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", nn.with_logical_partitioning(init, (self.axis_name,)),
                           (x.shape[-1],), self.param_dtype)
        w = scale.astype(jnp.float32) + (1.0 if self.offset else 0.0)
        return (_rms(x.astype(jnp.float32), self.eps) * w).astype(x.dtype)


def norm(cfg: ModelConfig, axis_name: str = "embed", name: str | None = None) -> RMSNorm:
    """The family's RMSNorm (plain scale for Qwen3, ``1 + w`` for Qwen3.5)."""
    return RMSNorm(cfg.rms_eps, axis_name, dtype_of(cfg.param_dtype), cfg.norm_offset, name=name)


def apply_rope(x_BxLxNxD: Array, positions_BxL: Array, theta: float,
               rotary_dim: int | None = None) -> Array:
    """Rotary embedding, half-split (``rotate_half``) convention of Qwen/Llama.

    Only the first ``rotary_dim`` dims of each head rotate (Qwen3.5's partial RoPE), with
    frequencies ``theta^(-2j/rotary_dim)``; the rest pass through unchanged.
    """
    d = x_BxLxNxD.shape[-1]
    rd = d if rotary_dim is None else rotary_dim
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rd, 2, dtype=jnp.float32) / rd))
    angles = positions_BxL.astype(jnp.float32)[..., None] * inv_freq  # B x L x rd/2
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x_BxLxNxD.astype(jnp.float32)
    x1, x2, rest = x32[..., : rd // 2], x32[..., rd // 2: rd], x32[..., rd:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)
    return out.astype(x_BxLxNxD.dtype)


class Attention(nn.Module):
    """Grouped-query attention with per-head q/k RMSNorm before RoPE (Qwen3).

    With ``cfg.attn_output_gate`` (Qwen3.5) ``q_proj`` emits ``2·head_dim`` per head: the query,
    then a gate; the attention output is multiplied by ``sigmoid(gate)`` before ``o_proj``.
    """

    cfg: ModelConfig
    lora: LoraConfig | None = None
    cache_attention: CacheAttention = CacheAttention()

    def setup(self) -> None:
        c = self.cfg
        q_width = c.head_dim * (2 if c.attn_output_gate else 1)
        self.q_proj = projection(c, self.lora, (c.n_heads, q_width), ("embed",),
                                 ("heads", "head_dim"))
        self.k_proj = projection(c, self.lora, (c.n_kv_heads, c.head_dim), ("embed",),
                                 ("kv", "head_dim"))
        self.v_proj = projection(c, self.lora, (c.n_kv_heads, c.head_dim), ("embed",),
                                 ("kv", "head_dim"))
        self.o_proj = projection(c, self.lora, c.d_model, ("heads", "head_dim"), ("embed",),
                                 axis=(-2, -1))
        self.q_norm = norm(c, "head_dim")
        self.k_norm = norm(c, "head_dim")

    def _qkv(self, x: Array, positions: Array) -> tuple[Array, Array, Array, Array | None]:
        c = self.cfg
        q = self.q_proj(x)
        gate = None
        if c.attn_output_gate:
            q, gate = q[..., : c.head_dim], q[..., c.head_dim:]
        q = apply_rope(self.q_norm(q), positions, c.rope_theta, c.rotary_dim)
        k = apply_rope(self.k_norm(self.k_proj(x)), positions, c.rope_theta, c.rotary_dim)
        return q, k, self.v_proj(x), gate

    def _out(self, attn_BxLxNxD: Array, gate: Array | None) -> Array:
        if gate is not None:
            attn_BxLxNxD = attn_BxLxNxD * jax.nn.sigmoid(gate.astype(jnp.float32)).astype(
                attn_BxLxNxD.dtype)
        return self.o_proj(attn_BxLxNxD)

    def _grouped(self, q_BxLxNxD: Array) -> Array:
        b, length, _, d = q_BxLxNxD.shape
        g = self.cfg.n_heads // self.cfg.n_kv_heads
        return q_BxLxNxD.reshape(b, length, self.cfg.n_kv_heads, g, d)

    def __call__(self, x_BxLxH: Array, positions_BxL: Array,
                 key_valid_BxL: Array | None) -> tuple[Array, AttentionCache]:
        """Causal self-attention over a whole sequence → (out B×L×H, (k, v) B×L×K×D)."""
        q, k, v, gate = self._qkv(x_BxLxH, positions_BxL)
        # Initialisation only needs shapes: any form does, so a config for another platform
        # (cudnn, splash) can be built and planned on this one.
        impl = "xla" if self.is_initializing() else self.cfg.attention_impl
        out = causal_attention(q, k, v, key_valid_BxL, impl, self.cfg.attention_block)
        return self._out(out, gate), AttentionCache(k, v)

    def extend(self, x_BxCxH: Array, positions_BxC: Array, cache: AttentionCache,
               layer: Array | None, start_B: Array,
               length_B: Array) -> tuple[Array, AttentionCache]:
        """``C`` new positions (one decode step, or a prompt chunk) at slots ``length …
        length + C - 1``: their keys and values are written into the cache (``[nb ×] B × S × K
        × D``, ``layer`` picking this layer's block of a stacked one), then they attend to the
        filled slots ``start ≤ slot < length`` and causally to each other → (out B×C×H, the
        updated cache)."""
        q, k, v, gate = self._qkv(x_BxCxH, positions_BxC)
        cache = AttentionCache(put_block_rows(cache.k, k, layer, length_B),
                               put_block_rows(cache.v, v, layer, length_B))
        qg = self._grouped(q) * (self.cfg.head_dim ** -0.5)  # B x C x K x G x D
        out = attention.attend(qg, cache.k, cache.v, layer, start_B, length_B,
                               self.cache_attention)
        b, c = x_BxCxH.shape[:2]
        out = out.reshape(b, c, self.cfg.n_heads, self.cfg.head_dim).astype(v.dtype)
        return self._out(out, gate), cache


class GatedDeltaNet(nn.Module):
    """Qwen3.5's linear-attention mixer (QWEN3_5.md §2.4).

    ``x → in_proj_qkv → causal depthwise conv → silu → (q, k, v)``; ``β = sigmoid(in_proj_b x)``;
    ``g = −exp(A_log)·softplus(in_proj_a x + dt_bias)``; q/k L2-normed (q also scaled by
    ``dk^-½``) and repeated to the value heads; the gated delta rule (``pipo_jax.model.deltanet``);
    a gated RMSNorm ``w·x̂·silu(z)`` with ``z = in_proj_z x``; ``out_proj``.
    """

    cfg: ModelConfig

    def setup(self) -> None:
        c = self.cfg
        pdt, dt = dtype_of(c.param_dtype), dtype_of(c.dtype)
        nv, dv = c.linear_n_value_heads, c.linear_value_head_dim

        def dense(features: int, axes: tuple[str, str], name: str) -> nn.Dense:
            return nn.Dense(features, use_bias=False, dtype=dt, param_dtype=pdt,
                            kernel_init=dense_init(c, axes), name=name)

        self.in_proj_qkv = dense(c.linear_conv_dim, ("embed", "mlp"), "in_proj_qkv")
        self.in_proj_z = dense(nv * dv, ("embed", "mlp"), "in_proj_z")
        self.in_proj_b = dense(nv, ("embed", "unmodeled"), "in_proj_b")
        self.in_proj_a = dense(nv, ("embed", "unmodeled"), "in_proj_a")
        self.out_proj = dense(c.d_model, ("mlp", "embed"), "out_proj")
        # Torch's Conv1d layout with the singleton dim squeezed: C × kernel, tap k-1 = newest.
        self.conv1d = self.param(
            "conv1d", dense_init(c, ("mlp", "unmodeled")),
            (c.linear_conv_dim, c.linear_conv_kernel), pdt)

        def a_log_init(key: Array, shape: tuple[int, ...], dtype: jnp.dtype) -> Array:
            # Decay rates A ~ U(1, 16), as HF initialises them.
            return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, 16.0)).astype(dtype)

        self.A_log = self.param(
            "A_log", nn.with_logical_partitioning(a_log_init, ("unmodeled",)), (nv,), pdt)
        self.dt_bias = self.param(
            "dt_bias", nn.with_logical_partitioning(nn.initializers.ones, ("unmodeled",)),
            (nv,), pdt)
        # The gated norm is always a plain scale (initialised to ones), even in Qwen3.5.
        self.norm = RMSNorm(c.rms_eps, "unmodeled", pdt, offset=False)

    def _conv_out(self, window_BxTxC: Array, t: int) -> Array:
        """Causal depthwise conv over a window holding ``kernel - 1`` extra leading columns."""
        k = self.cfg.linear_conv_kernel
        w = self.conv1d.astype(jnp.float32)
        win = window_BxTxC.astype(jnp.float32)
        out = sum(w[:, j] * win[:, j:j + t] for j in range(k))
        return jax.nn.silu(out)

    def _gates(self, x: Array) -> tuple[Array, Array]:
        beta = jax.nn.sigmoid(self.in_proj_b(x).astype(jnp.float32))
        a = self.in_proj_a(x).astype(jnp.float32)
        g = -jnp.exp(self.A_log.astype(jnp.float32)) * jax.nn.softplus(
            a + self.dt_bias.astype(jnp.float32))
        return g, beta

    def _split(self, u_BxTxC: Array) -> tuple[Array, Array, Array]:
        """Conv output → q, k B×T×Nv×dk (L2-normed, repeated to value heads), v B×T×Nv×dv."""
        c = self.cfg
        b, t, _ = u_BxTxC.shape
        nk, nv = c.linear_n_key_heads, c.linear_n_value_heads
        dk, dv = c.linear_key_head_dim, c.linear_value_head_dim
        q = u_BxTxC[..., : nk * dk].reshape(b, t, nk, dk)
        k = u_BxTxC[..., nk * dk: 2 * nk * dk].reshape(b, t, nk, dk)
        v = u_BxTxC[..., 2 * nk * dk:].reshape(b, t, nv, dv)

        def l2(x: Array) -> Array:
            return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)

        q, k = l2(q) * dk ** -0.5, l2(k)
        groups = nv // nk
        return jnp.repeat(q, groups, axis=2), jnp.repeat(k, groups, axis=2), v

    def _output(self, o_BxTxNxV: Array, x: Array) -> Array:
        c = self.cfg
        b, t = x.shape[:2]
        z = self.in_proj_z(x).reshape(b, t, c.linear_n_value_heads, c.linear_value_head_dim)
        y = self.norm(o_BxTxNxV.astype(x.dtype))
        y = (y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))).astype(x.dtype)
        return self.out_proj(y.reshape(b, t, -1))

    def __call__(self, x_BxLxH: Array, key_valid_BxL: Array | None = None,
                 use_scan: bool = False) -> tuple[Array, tuple[Array, Array]]:
        """Whole sequence → (out B×L×H, (conv state B×(k-1)×C, recurrent state B×N×dk×dv)).

        Positions where ``key_valid`` is False (left padding) are zeroed first, so they neither
        decay nor write the state: a left-padded row ends in the state of its unpadded self.
        ``use_scan`` runs the token-by-token reference instead of the chunked form.
        """
        c = self.cfg
        if key_valid_BxL is not None:
            x_BxLxH = x_BxLxH * key_valid_BxL[..., None].astype(x_BxLxH.dtype)
        b, t, _ = x_BxLxH.shape
        mixed = self.in_proj_qkv(x_BxLxH)
        window = jnp.pad(mixed, ((0, 0), (c.linear_conv_kernel - 1, 0), (0, 0)))
        q, k, v = self._split(self._conv_out(window, t))
        g, beta = self._gates(x_BxLxH)
        if use_scan:
            o, state = deltanet.scan(q, k, v, g, beta)
        else:
            o, state = deltanet.chunked(q, k, v, g, beta, chunk=c.linear_chunk)
        conv_state = window[:, t:]  # the last kernel-1 projected inputs
        return self._output(o, x_BxLxH), DeltaNetCache(conv_state, state)

    def extend(self, x_BxCxH: Array, cache: DeltaNetCache,
               real_BxC: Array | None = None) -> tuple[Array, DeltaNetCache]:
        """``C`` new tokens (one decode step, or a prompt chunk) from the cached conv window and
        recurrent state → (out B×C×H, the new conv and recurrent states). ``real`` marks the
        tokens that are not left padding (zeroed, as in ``__call__``)."""
        c = self.cfg
        t = x_BxCxH.shape[1]
        if real_BxC is not None:
            x_BxCxH = x_BxCxH * real_BxC[..., None].astype(x_BxCxH.dtype)
        window = jnp.concatenate([cache.conv, self.in_proj_qkv(x_BxCxH).astype(
            cache.conv.dtype)], axis=1)
        q, k, v = self._split(self._conv_out(window, t))
        g, beta = self._gates(x_BxCxH)
        if self.is_mutable_collection(KEPT):
            # A verify pass: the state after every position, and the whole conv window (the
            # window after position j is ``window[:, j+1 : j+kernel]``), to roll back to.
            o, states = deltanet.scan_states(q, k, v.astype(jnp.float32), g, beta, cache.state)
            self.sow(KEPT, "states", DeltaNetCache(window, states))
            return self._output(o, x_BxCxH), DeltaNetCache(window[:, t:], states[:, -1])
        if t == 1:
            o, state = deltanet.recurrent_step(q[:, 0], k[:, 0], v[:, 0].astype(jnp.float32),
                                               g[:, 0], beta[:, 0], cache.state)
            o = o[:, None]
        else:
            o, state = deltanet.chunked(q, k, v, g, beta, cache.state, chunk=c.linear_chunk)
        return self._output(o, x_BxCxH), DeltaNetCache(window[:, t:], state)


class SwiGLU(nn.Module):
    cfg: ModelConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.cfg
        gate = projection(c, self.lora, c.mlp_dim, ("embed",), ("mlp",), name="gate_proj")(x)
        up = projection(c, self.lora, c.mlp_dim, ("embed",), ("mlp",), name="up_proj")(x)
        return projection(c, self.lora, c.d_model, ("mlp",), ("embed",), name="down_proj")(
            nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + mixer(norm(x))`` then ``x + mlp(norm(x))``.

    The mixer is gated/ungated full attention (``attn``) or a Gated DeltaNet (``linear_attn``),
    per ``layer_type``; every layer has the dense SwiGLU MLP.
    """

    cfg: ModelConfig
    layer_type: str = "full_attention"
    lora: LoraConfig | None = None
    cache_attention: CacheAttention = CacheAttention()

    def setup(self) -> None:
        self.input_norm = norm(self.cfg)
        if self.layer_type == "full_attention":
            self.attn = Attention(self.cfg, self.lora, self.cache_attention)
        else:
            # Gated DeltaNet projections are never adapted (PAPER §2.6).
            self.linear_attn = GatedDeltaNet(self.cfg)
        self.post_attn_norm = norm(self.cfg)
        self.mlp = SwiGLU(self.cfg, self.lora)

    def __call__(self, x_BxLxH: Array, positions_BxL: Array,
                 key_valid_BxL: Array | None) -> tuple[Array, LayerCache]:
        h = self.input_norm(x_BxLxH)
        if self.layer_type == "full_attention":
            a, cache = self.attn(h, positions_BxL, key_valid_BxL)
        else:
            a, cache = self.linear_attn(h, key_valid_BxL)
        x = x_BxLxH + a
        x = x + self.mlp(self.post_attn_norm(x))
        return sharding.constrain(x, RESIDUAL_AXES), cache

    def extend(self, x_BxCxH: Array, positions_BxC: Array, cache: LayerCache,
               layer: Array | None, start_B: Array,
               length_B: Array) -> tuple[Array, LayerCache]:
        """``C`` new positions against this layer's cache (``layer`` picks its block of a
        stacked ``n_blocks × …`` cache; None: unstacked), filled in ``start ≤ slot < length`` →
        (x, the cache with this layer's new key/value rows or DeltaNet states in place)."""
        h = self.input_norm(x_BxCxH)
        if self.layer_type == "full_attention":
            assert isinstance(cache, AttentionCache)
            a, new = self.attn.extend(h, positions_BxC, cache, layer, start_B, length_B)
        else:
            slot = length_B[:, None] + jnp.arange(x_BxCxH.shape[1])[None]
            mine = cache if layer is None else jax.tree.map(
                lambda s: jax.lax.dynamic_index_in_dim(s, layer, 0, keepdims=False), cache)
            a, made = self.linear_attn.extend(h, mine, slot >= start_B[:, None])
            new = made if layer is None else jax.tree.map(
                lambda s, n: jax.lax.dynamic_update_index_in_dim(s, n.astype(s.dtype), layer, 0),
                cache, made)
        x = x_BxCxH + a
        return x + self.mlp(self.post_attn_norm(x)), new


REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def slot_name(j: int) -> str:
    """Parameter name of position ``j`` in the layer pattern (``backbone/layers/layer_j``)."""
    return f"layer_{j}"


def layer_slot(cfg: ModelConfig, i: int) -> tuple[str, int]:
    """Where backbone layer ``i`` lives in the stacked parameters: ``(slot name, block)``, i.e.
    ``backbone/layers/layer_{i % P}`` at index ``i // P`` of its leading axis, with ``P`` the
    period of ``cfg.layer_pattern``. The one place that knows the stacked layout."""
    period = len(cfg.layer_pattern)
    return slot_name(i % period), i // period


class _ScanBody(nn.Module):
    """One repeat of the layer pattern over a whole sequence, in ``nn.scan``'s ``(carry, x) →
    (carry, y)`` form: returns what each layer's cache needs."""

    cfg: ModelConfig
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: Array, positions: Array,
                 key_valid: Array | None) -> tuple[Array, tuple[LayerCache, ...]]:
        made = []
        layer: type[nn.Module] = DecoderLayer
        if self.cfg.remat_policy == "layer":
            layer = nn.remat(DecoderLayer, prevent_cse=False)
        for j, layer_type in enumerate(self.cfg.layer_pattern):
            x, new = layer(self.cfg, layer_type, self.lora, name=slot_name(j))(
                x, positions, key_valid)
            made.append(new)
        return x, tuple(made)


class _ExtendBody(nn.Module):
    """One repeat of the layer pattern extending the caches: the whole stacked caches ride in
    the carry and each layer updates its own block (``block``) in place, so a step never
    copies a layer's cache out of the stack."""

    cfg: ModelConfig
    lora: LoraConfig | None = None
    cache_attention: CacheAttention = CacheAttention()

    @nn.compact
    def __call__(self, carry: tuple[Array, tuple[LayerCache, ...]], block: Array,
                 positions: Array, span: tuple[Array, Array]
                 ) -> tuple[tuple[Array, tuple[LayerCache, ...]], None]:
        x, caches = carry
        out = []
        for j, layer_type in enumerate(self.cfg.layer_pattern):
            layer = DecoderLayer(self.cfg, layer_type, self.lora, self.cache_attention,
                                 name=slot_name(j))
            x, new = layer.extend(x, positions, caches[j], block, *span)
            out.append(new)
        return (x, tuple(out)), None


class Backbone(nn.Module):
    """The decoder stack, scanned (``nn.scan``) over repeats of its layer pattern, + final norm.

    Layer ``i`` is ``layers/layer_{i % P}`` at index ``i // P`` of the stacked leading axis, with
    ``P = len(cfg.layer_pattern)`` (1 for an all-attention stack, 4 for Qwen3.5), so one
    parameter layout serves the scanned forward and the per-block decode step.
    """

    cfg: ModelConfig
    lora: LoraConfig | None = None
    cache_attention: CacheAttention = CacheAttention()

    @nn.compact
    def __call__(self, x_BxLxH: Array, positions_BxL: Array,
                 key_valid_BxL: Array | None = None,
                 cache: tuple[LayerCache, ...] | None = None,
                 span: tuple[Array, Array] | None = None) -> tuple[Array, tuple[LayerCache, ...]]:
        """Returns the final-normed hidden states B×L×H and, per pattern slot, its caches
        stacked over blocks (``n_blocks × …``).

        With ``cache`` (``DecodeCache.layers``) and ``span = (start_B, length_B)`` (the filled
        slots ``start ≤ slot < length``) the ``L`` positions are new ones at slots ``length …``
        (a decode step, L = 1, or a prompt chunk), attending to the filled slots and causally
        to each other; it returns the caches with their key/value rows written and the new
        DeltaNet states in place (``length`` is the caller's to advance).
        """
        if cache is not None:
            assert span is not None
            scanned_ext = nn.scan(_ExtendBody, variable_axes={"params": 0, KEPT: 0},
                                  split_rngs={"params": True, "dropout": True},
                                  in_axes=(0, nn.broadcast, nn.broadcast),
                                  length=self.cfg.n_blocks,
                                  metadata_params={nn.PARTITION_NAME: "layers"})
            (x, caches), _ = scanned_ext(self.cfg, self.lora, self.cache_attention,
                                         name="layers")(
                (x_BxLxH, tuple(cache)), jnp.arange(self.cfg.n_blocks), positions_BxL, span)
            return norm(self.cfg, name="final_norm")(x), caches
        body: type[nn.Module] = _ScanBody
        if self.cfg.remat_policy not in ("none", "layer"):  # "layer": inside the body
            body = nn.remat(body, policy=REMAT_POLICIES[self.cfg.remat_policy],
                            prevent_cse=False)
        # Each block draws its own LoRA dropout mask.
        scanned = nn.scan(body, variable_axes={"params": 0},
                          split_rngs={"params": True, "dropout": True},
                          in_axes=(nn.broadcast, nn.broadcast),
                          length=self.cfg.n_blocks,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        x, made = scanned(self.cfg, self.lora, name="layers")(x_BxLxH, positions_BxL,
                                                                key_valid_BxL)
        return norm(self.cfg, name="final_norm")(x), made

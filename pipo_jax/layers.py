"""Qwen-style decoder building blocks: RMSNorm, RoPE, grouped-query attention, SwiGLU.

Every parameter carries logical axis names (``embed``, ``heads``, ``kv``, ``mlp``, ``vocab``,
``layers``); ``pipo_jax.sharding`` maps them onto a device mesh with one rules table.

Attention has two modes with the same parameters:
* ``DecoderLayer.__call__``: a whole sequence (training, prefill); returns the keys/values it made
  so prefill can fill a cache.
* ``DecoderLayer.decode``: one new position against a cache it only reads; returns the new
  key/value row so the caller writes it in place (the cache never travels through the layer).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from pipo_jax.config import ModelConfig

Array = jax.Array
_NEG_INF = -1e30


def dtype_of(name: str) -> jnp.dtype:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def dense_init(cfg: ModelConfig, axes: tuple[str, ...]) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), axes)


class RMSNorm(nn.Module):
    """``x / rms(x) · scale`` over the last axis, computed in float32."""

    eps: float = 1e-6
    axis_name: str = "embed"
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones,
                                                                 (self.axis_name,)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


def apply_rope(x_BxLxNxD: Array, positions_BxL: Array, theta: float) -> Array:
    """Rotary embedding with the half-split (``rotate_half``) convention of Qwen/Llama."""
    d = x_BxLxNxD.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    angles = positions_BxL.astype(jnp.float32)[..., None] * inv_freq  # B x L x D/2
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x_BxLxNxD.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxLxNxD.dtype)


class Attention(nn.Module):
    """Grouped-query attention with per-head q/k RMSNorm and RoPE (Qwen3)."""

    cfg: ModelConfig

    def setup(self) -> None:
        c = self.cfg
        pdt, dt = dtype_of(c.param_dtype), dtype_of(c.dtype)
        self.q_proj = nn.DenseGeneral((c.n_heads, c.head_dim), use_bias=False, dtype=dt,
                                      param_dtype=pdt,
                                      kernel_init=dense_init(c, ("embed", "heads", "head_dim")))
        self.k_proj = nn.DenseGeneral((c.n_kv_heads, c.head_dim), use_bias=False, dtype=dt,
                                      param_dtype=pdt,
                                      kernel_init=dense_init(c, ("embed", "kv", "head_dim")))
        self.v_proj = nn.DenseGeneral((c.n_kv_heads, c.head_dim), use_bias=False, dtype=dt,
                                      param_dtype=pdt,
                                      kernel_init=dense_init(c, ("embed", "kv", "head_dim")))
        self.o_proj = nn.DenseGeneral(c.d_model, axis=(-2, -1), use_bias=False, dtype=dt,
                                      param_dtype=pdt,
                                      kernel_init=dense_init(c, ("heads", "head_dim", "embed")))
        self.q_norm = RMSNorm(c.rms_eps, "head_dim", pdt)
        self.k_norm = RMSNorm(c.rms_eps, "head_dim", pdt)

    def _qkv(self, x: Array, positions: Array) -> tuple[Array, Array, Array]:
        theta = self.cfg.rope_theta
        q = apply_rope(self.q_norm(self.q_proj(x)), positions, theta)
        k = apply_rope(self.k_norm(self.k_proj(x)), positions, theta)
        return q, k, self.v_proj(x)

    def _grouped(self, q_BxLxNxD: Array) -> Array:
        b, length, _, d = q_BxLxNxD.shape
        g = self.cfg.n_heads // self.cfg.n_kv_heads
        return q_BxLxNxD.reshape(b, length, self.cfg.n_kv_heads, g, d)

    def __call__(self, x_BxLxH: Array, positions_BxL: Array,
                 key_valid_BxL: Array | None) -> tuple[Array, tuple[Array, Array]]:
        """Causal self-attention over a whole sequence → (out B×L×H, (k, v) B×L×K×D)."""
        q, k, v = self._qkv(x_BxLxH, positions_BxL)
        groups = self.cfg.n_heads // self.cfg.n_kv_heads
        # Head-major 4-D matmuls: on CPU they run several times faster than a grouped 5-D einsum.
        q_t = (q * (self.cfg.head_dim ** -0.5)).transpose(0, 2, 1, 3)  # B x N x L x D
        k_t = jnp.repeat(k, groups, axis=2).transpose(0, 2, 3, 1)  # B x N x D x L
        v_t = jnp.repeat(v, groups, axis=2).transpose(0, 2, 1, 3)  # B x N x L x D
        scores = jnp.matmul(q_t, k_t, preferred_element_type=jnp.float32)  # B x N x L x L
        length = x_BxLxH.shape[1]
        allowed = jnp.tril(jnp.ones((length, length), dtype=bool))[None]
        if key_valid_BxL is not None:
            allowed = allowed & key_valid_BxL[:, None, :]
        scores = jnp.where(allowed[:, None], scores, _NEG_INF)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.matmul(probs, v_t).transpose(0, 2, 1, 3)  # B x L x N x D
        return self.o_proj(out), (k, v)

    def decode(self, x_Bx1xH: Array, positions_B: Array, k_cache_BxSxKxD: Array,
               v_cache_BxSxKxD: Array, cache_valid_BxS: Array) -> tuple[Array, tuple[Array, Array]]:
        """One new position against a read-only cache → (out B×1×H, (k, v) B×1×K×D).

        ``cache_valid`` marks the cache slots this position may attend to (the new position
        itself is attended to directly, so it need not be in the cache yet).
        """
        q, k, v = self._qkv(x_Bx1xH, positions_B[:, None])
        qg = self._grouped(q)[:, 0] * (self.cfg.head_dim ** -0.5)  # B x K x G x D
        s_cache = jnp.einsum("bkgd,bskd->bkgs", qg, k_cache_BxSxKxD,
                             preferred_element_type=jnp.float32)
        s_cache = jnp.where(cache_valid_BxS[:, None, None, :], s_cache, _NEG_INF)
        s_self = jnp.einsum("bkgd,bkd->bkg", qg, k[:, 0], preferred_element_type=jnp.float32)
        scores = jnp.concatenate([s_cache, s_self[..., None]], axis=-1)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = (jnp.einsum("bkgs,bskd->bkgd", probs[..., :-1], v_cache_BxSxKxD)
               + probs[..., -1:] * v[:, 0, :, None, :])
        out = out.reshape(x_Bx1xH.shape[0], 1, self.cfg.n_heads, self.cfg.head_dim)
        return self.o_proj(out), (k, v)


class SwiGLU(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.cfg
        pdt, dt = dtype_of(c.param_dtype), dtype_of(c.dtype)
        gate = nn.Dense(c.mlp_dim, use_bias=False, dtype=dt, param_dtype=pdt,
                        kernel_init=dense_init(c, ("embed", "mlp")), name="gate_proj")(x)
        up = nn.Dense(c.mlp_dim, use_bias=False, dtype=dt, param_dtype=pdt,
                      kernel_init=dense_init(c, ("embed", "mlp")), name="up_proj")(x)
        return nn.Dense(c.d_model, use_bias=False, dtype=dt, param_dtype=pdt,
                        kernel_init=dense_init(c, ("mlp", "embed")), name="down_proj")(
                            nn.silu(gate) * up)


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    cfg: ModelConfig

    def setup(self) -> None:
        pdt = dtype_of(self.cfg.param_dtype)
        self.input_norm = RMSNorm(self.cfg.rms_eps, "embed", pdt)
        self.attn = Attention(self.cfg)
        self.post_attn_norm = RMSNorm(self.cfg.rms_eps, "embed", pdt)
        self.mlp = SwiGLU(self.cfg)

    def __call__(self, x_BxLxH: Array, positions_BxL: Array,
                 key_valid_BxL: Array | None) -> tuple[Array, tuple[Array, Array]]:
        a, kv = self.attn(self.input_norm(x_BxLxH), positions_BxL, key_valid_BxL)
        x = x_BxLxH + a
        return x + self.mlp(self.post_attn_norm(x)), kv

    def decode(self, x_Bx1xH: Array, positions_B: Array, k_cache: Array, v_cache: Array,
               cache_valid_BxS: Array) -> tuple[Array, tuple[Array, Array]]:
        a, kv = self.attn.decode(self.input_norm(x_Bx1xH), positions_B, k_cache, v_cache,
                                 cache_valid_BxS)
        x = x_Bx1xH + a
        return x + self.mlp(self.post_attn_norm(x)), kv


REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class _ScanBody(nn.Module):
    """Adapts ``DecoderLayer`` to ``nn.scan``'s ``(carry, x) → (carry, y)`` signature."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: Array, positions: Array,
                 key_valid: Array | None) -> tuple[Array, tuple[Array, Array]]:
        return DecoderLayer(self.cfg, name="layer")(x, positions, key_valid)


class Backbone(nn.Module):
    """The decoder stack, scanned over layers (``nn.scan``), plus the final norm.

    Parameters are stacked along a leading ``layers`` axis, one checkpoint layout for both the
    scanned training forward and the per-layer decode step in ``pipo_jax.model``.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxH: Array, positions_BxL: Array,
                 key_valid_BxL: Array | None = None) -> tuple[Array, tuple[Array, Array]]:
        """Returns the final-normed hidden states B×L×H and stacked (k, v) n_layers×B×L×K×D."""
        body: type[nn.Module] = _ScanBody
        if self.cfg.remat_policy != "none":
            body = nn.remat(body, policy=REMAT_POLICIES[self.cfg.remat_policy],
                            prevent_cse=False)
        scanned = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                          in_axes=(nn.broadcast, nn.broadcast), length=self.cfg.n_layers,
                          metadata_params={nn.PARTITION_NAME: "layers"})
        x, kv = scanned(self.cfg, name="layers")(x_BxLxH, positions_BxL, key_valid_BxL)
        h = RMSNorm(self.cfg.rms_eps, "embed", dtype_of(self.cfg.param_dtype), name="final_norm")(x)
        return h, kv

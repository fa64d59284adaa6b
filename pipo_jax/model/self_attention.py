"""Causal self-attention over a whole sequence: the teacher-forced forward of training, teacher
scoring and the one-shot prefill (decode against a cache is ``model/attention.py``).

``model.attention_impl`` picks one of these forms; they give one result (``docs/attention.md``):

* ``xla``: the materialised form, ``B × N × L × L`` float32 scores and probabilities. The
  reference, and the fastest on CPU where it fits; its memory is quadratic in the length.
* ``blockwise``: an online softmax (running max and sum, flash-attention style) over key blocks
  for each query block, blocks past the diagonal skipped; each query block is rematerialised in
  the backward pass (``jax.checkpoint``), so neither pass keeps more than one query block's
  ``block × L`` probabilities: memory linear in the length. Portable (any backend), the CPU
  path for long sequences and the reference the kernels are held to.
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused flash
  attention (GPU, bfloat16/float16).
* ``splash``: Pallas splash attention (TPU): a causal mask and segment ids for the key mask.
* ``auto``: ``cudnn`` on a GPU with a 16-bit dtype, ``splash`` on a TPU, else ``xla`` up to
  ``AUTO_BLOCKWISE_FROM`` positions and ``blockwise`` from there.

Shapes: ``B`` batch, ``L`` positions, ``N`` query heads, ``K`` key/value heads (``N = K·G``),
``D`` head dim. ``key_valid_BxL`` (None: every key) masks keys out (a left pad); a query with no
allowed key (inside a left pad) gets whatever its form gives: nothing reads it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pipo_jax.config.schema import TRAIN_ATTENTION_IMPLS, ModelConfig
from pipo_jax.errors import ConfigError

Array = jax.Array
_NEG_INF = -1e30
AUTO_BLOCKWISE_FROM = 4096  # positions; below this the materialised form is faster on CPU


def available_impls(backend: str | None = None) -> tuple[str, ...]:
    """The forms that run on ``backend`` (default: JAX's default backend)."""
    backend = backend or jax.default_backend()
    kernels = {"gpu": ("cudnn",), "cuda": ("cudnn",), "tpu": ("splash",)}.get(backend, ())
    return ("auto", "xla", "blockwise", *kernels)


def resolve_impl(impl: str, length: int, dtype: jnp.dtype, backend: str | None = None,
                 check: bool = True) -> str:
    """The form ``impl`` stands for on ``backend`` (``auto`` resolved); a ``ConfigError``
    naming the forms that are available when ``impl`` is not (``check=False``: no check, for
    the planner, which sizes a step for devices it may not run on)."""
    backend = backend or jax.default_backend()
    if impl not in TRAIN_ATTENTION_IMPLS:
        raise ConfigError(f"model.attention_impl must be one of {', '.join(TRAIN_ATTENTION_IMPLS)}"
                          f", got {impl!r}")
    if check and impl not in available_impls(backend):
        raise ConfigError(f"model.attention_impl={impl} does not run on this {backend} backend; "
                          f"choose one of {', '.join(available_impls(backend))}")
    if check and impl == "cudnn" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
        raise ConfigError(f"model.attention_impl=cudnn needs model.dtype bfloat16 (cuDNN flash "
                          f"attention has no {jnp.dtype(dtype).name} kernel); or choose "
                          "blockwise or xla")
    if impl != "auto":
        return impl
    if backend in ("gpu", "cuda") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if backend == "tpu":
        return "splash"
    return "blockwise" if length >= AUTO_BLOCKWISE_FROM else "xla"


def check_impl(cfg: ModelConfig, backend: str | None = None) -> None:
    """Fails with ``resolve_impl``'s one-line error when ``cfg.attention_impl`` cannot run on
    ``backend``: what a stage calls before it builds anything."""
    resolve_impl(cfg.attention_impl, 0, jnp.dtype(cfg.dtype), backend)


def causal_attention(q_BxLxNxD: Array, k_BxLxKxD: Array, v_BxLxKxD: Array,
                     key_valid_BxL: Array | None, impl: str = "xla",
                     block: int = 256) -> Array:
    """Causal grouped-query attention → B × L × N × D (in ``v``'s dtype). ``q`` is not yet
    scaled. ``impl``: one of ``TRAIN_ATTENTION_IMPLS`` (``auto`` is resolved here)."""
    impl = resolve_impl(impl, q_BxLxNxD.shape[1], v_BxLxKxD.dtype)
    if impl == "xla":
        return _materialised(q_BxLxNxD, k_BxLxKxD, v_BxLxKxD, key_valid_BxL)
    if impl == "blockwise":
        return _blockwise(q_BxLxNxD, k_BxLxKxD, v_BxLxKxD, key_valid_BxL, block)
    if impl == "cudnn":
        return _library(q_BxLxNxD, k_BxLxKxD, v_BxLxKxD, key_valid_BxL, "cudnn")
    return _splash(q_BxLxNxD, k_BxLxKxD, v_BxLxKxD, key_valid_BxL)


def _materialised(q: Array, k: Array, v: Array, key_valid: Array | None) -> Array:
    b, length, n, d = q.shape
    groups = n // k.shape[2]
    # Head-major 4-D matmuls: on CPU they run several times faster than a grouped 5-D einsum.
    q_t = (q * (d ** -0.5)).transpose(0, 2, 1, 3)  # B x N x L x D
    k_t = jnp.repeat(k, groups, axis=2).transpose(0, 2, 3, 1)  # B x N x D x L
    v_t = jnp.repeat(v, groups, axis=2).transpose(0, 2, 1, 3)  # B x N x L x D
    scores = jnp.matmul(q_t, k_t, preferred_element_type=jnp.float32)  # B x N x L x L
    allowed = jnp.tril(jnp.ones((length, length), dtype=bool))[None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, :]
    scores = jnp.where(allowed[:, None], scores, _NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.matmul(probs, v_t).transpose(0, 2, 1, 3)  # B x L x N x D


def _blockwise(q: Array, k: Array, v: Array, key_valid: Array | None, block: int) -> Array:
    b, length, n, d = q.shape
    nk = k.shape[2]
    g = n // nk
    block = min(block, length)
    nb = -(-length // block)
    pad = nb * block - length
    valid = jnp.ones((b, length), bool) if key_valid is None else key_valid
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
    # Blocks first, so that lax.map / lax.scan walk them: nb × B × block × K × [G ×] D.
    qb = (q * (d ** -0.5)).reshape(b, nb, block, nk, g, d).transpose(1, 0, 2, 3, 4, 5)
    kb = k.reshape(b, nb, block, nk, d).transpose(1, 0, 2, 3, 4)
    vb = v.reshape(b, nb, block, nk, d).transpose(1, 0, 2, 3, 4)
    validb = valid.reshape(b, nb, block).transpose(1, 0, 2)
    offsets = jnp.arange(block)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def query_block(i: Array, q_i: Array) -> Array:
        def key_block(carry: tuple[Array, Array, Array], j: Array
                      ) -> tuple[tuple[Array, Array, Array], None]:
            def attend(carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
                m, s_sum, acc = carry
                s = jnp.einsum("bqkgd,bskd->bkgqs", q_i, kb[j],
                               preferred_element_type=jnp.float32)  # B × K × G × bq × bk
                allowed = ((j * block + offsets)[None, :] <= (i * block + offsets)[:, None])
                allowed = allowed[None] & validb[j][:, None, :]  # B × bq × bk
                allowed = allowed[:, None, None]
                s = jnp.where(allowed, s, _NEG_INF)
                m_new = jnp.maximum(m, jnp.max(s, axis=-1))
                p = jnp.where(allowed, jnp.exp(s - m_new[..., None]), 0.0)
                scale = jnp.exp(m - m_new)
                acc = acc * scale[..., None] + jnp.einsum(
                    "bkgqs,bskd->bkgqd", p.astype(vb.dtype), vb[j],
                    preferred_element_type=jnp.float32)
                return m_new, s_sum * scale + jnp.sum(p, axis=-1), acc

            # Key blocks past the diagonal hold no allowed key: skipped.
            return jax.lax.cond(j <= i, attend, lambda c: c, carry), None

        init = (jnp.full((b, nk, g, block), _NEG_INF, jnp.float32),
                jnp.zeros((b, nk, g, block), jnp.float32),
                jnp.zeros((b, nk, g, block, d), jnp.float32))
        (_, s_sum, acc), _ = jax.lax.scan(key_block, init, jnp.arange(nb))
        out = acc / jnp.where(s_sum > 0, s_sum, 1.0)[..., None]  # B × K × G × bq × D
        return out.transpose(0, 3, 1, 2, 4).reshape(b, block, n, d)

    out = jax.lax.map(lambda args: query_block(*args), (jnp.arange(nb), qb))  # nb × B × bq × N × D
    out = out.transpose(1, 0, 2, 3, 4).reshape(b, nb * block, n, d)
    return out[:, :length].astype(v.dtype)


def _library(q: Array, k: Array, v: Array, key_valid: Array | None, implementation: str
             ) -> Array:
    mask = None if key_valid is None else key_valid[:, None, None, :]  # B × 1 × 1 × L
    return jax.nn.dot_product_attention(q.astype(k.dtype), k, v, mask=mask, is_causal=True,
                                        implementation=implementation)


def _splash(q: Array, k: Array, v: Array, key_valid: Array | None,
            interpret: bool = False) -> Array:
    """Pallas splash attention: one multi-query kernel per key/value head (its ``G`` query
    heads), mapped over heads and rows; the key mask as segment ids (1 real, 0 pad), so a pad
    query attends to the pads before it instead of to nothing."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as splash_mask,
    )

    b, length, n, d = q.shape
    nk = k.shape[2]
    g = n // nk
    unit = 128  # the kernel's block sizes divide the length
    padded = -(-length // unit) * unit
    valid = jnp.ones((b, length), jnp.int32) if key_valid is None else key_valid.astype(
        jnp.int32)
    if padded != length:
        q, k, v = (jnp.pad(x, ((0, 0), (0, padded - length), (0, 0), (0, 0))) for x in (q, k, v))
        valid = jnp.pad(valid, ((0, 0), (0, padded - length)), constant_values=2)
    block = min(512, padded)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                              block_q_dq=block, block_kv_dq=block)
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((padded, padded))] * g)
    kernel = splash.make_splash_mqa_single_device(mask=mask, block_sizes=sizes,
                                                  interpret=interpret)
    qh = (q * (d ** -0.5)).reshape(b, padded, nk, g, d).transpose(0, 2, 3, 1, 4)  # B K G L D
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # B × K × L × D
    segments = splash.SegmentIds(q=valid, kv=valid)

    def row(q_kgld: Array, k_kld: Array, v_kld: Array, seg: splash.SegmentIds) -> Array:
        return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=seg))(
            q_kgld, k_kld, v_kld)

    out = jax.vmap(row)(qh, kh, vh, segments)  # B × K × G × L × D
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, padded, n, d)
    return out[:, :length].astype(v.dtype)

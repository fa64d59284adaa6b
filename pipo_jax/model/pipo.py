"""PIPO model (SPEC §2–3) and its autoregressive baseline, as pure Linen modules.

Shapes: ``T`` tokens, ``L = T/2`` latents (pairs), ``H`` hidden size, ``V`` vocabulary.

Teacher-forced forward of PIPO on tokens ``t_0 … t_{T-1}``:
* latent ``c_i = compressor(e(t_{2i}), e(t_{2i+1}))``; backbone ``h_i`` over ``c_0 … c_i`` at pair
  positions ``0 … L-1``; ``lm_head(h_i)`` predicts ``t_{2i+2}``;
* MTP ``m_i = mtp(h_0…h_i, e(t_2)…e(t_{2i+2}))`` (causal, own attention layer);
  ``lm_head(m_i)`` predicts ``t_{2i+3}``;
* confidence logit ``z_i = confidence_head(h_i, m_i)``.

The AR baseline is the same ``Embedder`` + ``Backbone`` on tokens at token positions.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from pipo_jax.config import LoraConfig, ModelConfig
from pipo_jax.model import sharding
from pipo_jax.model.attention import CacheAttention
from pipo_jax.model.cache import AttentionCache, DecodeCache
from pipo_jax.model.layers import (
    RESIDUAL_AXES,
    Backbone,
    DecoderLayer,
    dense_init,
    dtype_of,
    layer_slot,
    norm,
    slot_name,
)

Array = jax.Array


class Embedder(nn.Module):
    """Token embedding table and the LM head: tied (logits through the embedding) or, with
    ``tie_embeddings: false``, a separate ``lm_head`` matrix V×H (torch layout)."""

    cfg: ModelConfig

    def setup(self) -> None:
        init = nn.with_logical_partitioning(nn.initializers.normal(self.cfg.init_std),
                                            ("vocab", "embed"))
        shape = (self.cfg.vocab_size, self.cfg.d_model)
        pdt = dtype_of(self.cfg.param_dtype)
        self.embedding = self.param("embedding", init, shape, pdt)
        self.lm_head = None if self.cfg.tie_embeddings else self.param("lm_head", init, shape, pdt)

    def __call__(self, tokens: Array) -> Array:
        """tokens ``[...]`` int → embeddings ``[..., H]`` in the compute dtype."""
        return jnp.take(self.embedding, tokens, axis=0).astype(dtype_of(self.cfg.dtype))

    def attend(self, h: Array) -> Array:
        """hidden ``[..., H]`` → logits ``[..., V]`` in float32."""
        head = self.embedding if self.lm_head is None else self.lm_head
        return jnp.einsum("...h,vh->...v", h, head.astype(h.dtype),
                          preferred_element_type=jnp.float32)


def _identity_sum_kernel(h: int) -> nn.initializers.Initializer:
    """``[2H, H]`` kernel ``[I; I]``: maps ``[a; b]`` to ``a + b``."""

    def init(key: Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> Array:
        del key
        assert shape == (2 * h, h), shape
        eye = jnp.eye(h, dtype=dtype)
        return jnp.concatenate([eye, eye], axis=0)

    return init


def _identity_kernel(key: Array, shape: tuple[int, ...], dtype: jnp.dtype = jnp.float32) -> Array:
    del key
    return jnp.eye(shape[0], shape[1], dtype=dtype)


class Compressor(nn.Module):
    """Folds a pair of token embeddings into one latent (SPEC §3).

    * ``linear``: ``Dense(2H→H, bias)``; identity init gives exactly ``e_a + e_b``.
    * ``mlp``: ``Dense(2H→2H, bias) → SiLU → Dense(2H→H, bias)``; identity init (first layer
      ``I``, second ``[I; I]``, biases 0) gives exactly ``silu(e_a) + silu(e_b)``: SiLU sits between
      the layers, so the start is the sum of the SiLU'd embeddings, not the plain sum.
    * ``compressor_init: random`` uses the normal init for both (ablations).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, e_a_BxLxH: Array, e_b_BxLxH: Array) -> Array:
        c = self.cfg
        h = c.d_model
        pdt, dt = dtype_of(c.param_dtype), dtype_of(c.dtype)
        identity = c.compressor_init == "identity"
        x = jnp.concatenate([e_a_BxLxH, e_b_BxLxH], axis=-1)
        sum_init = _identity_sum_kernel(h) if identity else nn.initializers.normal(c.init_std)
        bias_init = nn.with_logical_partitioning(nn.initializers.zeros, ("embed",))
        if c.compressor_type == "mlp":
            first_init = _identity_kernel if identity else nn.initializers.normal(c.init_std)
            x = nn.Dense(2 * h, dtype=dt, param_dtype=pdt, name="fc1",
                         kernel_init=nn.with_logical_partitioning(first_init, ("embed", "mlp")),
                         bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(x)
            x = nn.silu(x)
            return nn.Dense(h, dtype=dt, param_dtype=pdt, name="fc2",
                            kernel_init=nn.with_logical_partitioning(sum_init, ("mlp", "embed")),
                            bias_init=bias_init)(x)
        return nn.Dense(h, dtype=dt, param_dtype=pdt, name="fc",
                        kernel_init=nn.with_logical_partitioning(sum_init, ("mlp", "embed")),
                        bias_init=bias_init)(x)


class MTPHead(nn.Module):
    """``fc([RMSNorm_e(e(token1)); RMSNorm_h(h)])`` → one full-attention decoder layer → final
    RMSNorm; the structure of Qwen3.5's native MTP module (``mtp.*``), norms of the family's
    convention."""

    cfg: ModelConfig
    lora: LoraConfig | None = None
    cache_attention: CacheAttention = CacheAttention()

    def setup(self) -> None:
        c = self.cfg
        self.norm_emb = norm(c)
        self.norm_hidden = norm(c)
        self.fc = nn.Dense(c.d_model, use_bias=False, dtype=dtype_of(c.dtype),
                           param_dtype=dtype_of(c.param_dtype),
                           kernel_init=dense_init(c, ("mlp", "embed")))
        self.layer = DecoderLayer(c, "full_attention", self.lora, self.cache_attention)
        self.final_norm = norm(c)

    def _input(self, h: Array, e_tok1: Array) -> Array:
        return self.fc(jnp.concatenate([self.norm_emb(e_tok1), self.norm_hidden(h)], axis=-1))

    def __call__(self, h_BxLxH: Array, e_tok1_BxLxH: Array, positions_BxL: Array,
                 key_valid_BxL: Array | None = None) -> tuple[Array, AttentionCache]:
        """Whole sequence → (m B×L×H post-norm, its keys/values B×L×K×D)."""
        x, kv = self.layer(self._input(h_BxLxH, e_tok1_BxLxH), positions_BxL, key_valid_BxL)
        return self.final_norm(x), kv

    def extend(self, h_BxCxH: Array, e_tok1_BxCxH: Array, positions_BxC: Array,
               cache: AttentionCache, start_B: Array, index_B: Array
               ) -> tuple[Array, AttentionCache]:
        """``C`` new positions at slots ``index …`` against the MTP layer's own cache, filled
        in ``start ≤ slot < index`` → (m B×C×H, the cache with their rows written)."""
        x, kv = self.layer.extend(self._input(h_BxCxH, e_tok1_BxCxH), positions_BxC, cache,
                                  None, start_B, index_B)
        return self.final_norm(x), kv


class ConfidenceHead(nn.Module):
    """``RMSNorm(2H) → Dense(2H→H) → SiLU → Dense(H→1)`` on ``[h; m]`` → a logit."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h: Array, m: Array) -> Array:
        """``h, m [..., H]`` → logits ``[...]`` (float32)."""
        c = self.cfg
        pdt, dt = dtype_of(c.param_dtype), dtype_of(c.dtype)
        x = norm(c, "mlp", name="norm")(jnp.concatenate([h, m], axis=-1))
        x = nn.Dense(c.d_model, use_bias=False, dtype=dt, param_dtype=pdt, name="fc1",
                     kernel_init=dense_init(c, ("mlp", "embed")))(x)
        x = nn.Dense(1, use_bias=False, dtype=dt, param_dtype=pdt, name="fc2",
                     kernel_init=dense_init(c, ("embed", "unmodeled")))(nn.silu(x))
        return x[..., 0].astype(jnp.float32)


class PipoLM(nn.Module):
    """PIPO (``pipo=True``) or the AR baseline (``pipo=False``) on the same backbone.

    ``__call__`` is the teacher-forced training forward. Decoding (``pipo_jax.decode.engine``)
    calls ``prefill`` once and ``step`` per backbone pass (PIPO: ``prefill_mtp`` / ``step_mtp``
    after each, for the draft); each takes and returns the explicit ``DecodeCache``.
    """

    cfg: ModelConfig
    pipo: bool = True
    # Adapters on the backbone's and the MTP layer's projections (``pipo_jax.model.lora``).
    lora: LoraConfig | None = None
    # How decode steps and prompt chunks attend to the cache (no parameters).
    cache_attention: CacheAttention = CacheAttention()
    # The AR model with an MTP drafter (``pipo=False``): the same ``mtp_head`` module predicts
    # token t+2 from the backbone state at t and the embedding of token t+1, for speculative
    # decoding (``pipo_jax.decode.speculative``).
    drafter: bool = False

    def setup(self) -> None:
        if self.pipo and self.drafter:
            raise ValueError("drafter=True is the AR model's MTP drafter (pipo=False)")
        self.embedder = Embedder(self.cfg)
        self.backbone = Backbone(self.cfg, self.lora, self.cache_attention)
        if self.pipo or self.drafter:
            self.mtp_head = MTPHead(self.cfg, self.lora, self.cache_attention)
        if self.pipo:
            self.compressor = Compressor(self.cfg)
            self.confidence_head = ConfidenceHead(self.cfg)

    def compress(self, tokens_BxT: Array) -> Array:
        """Pairs of tokens → latents ``B×T/2×H``."""
        e = self.embedder(tokens_BxT)
        return sharding.constrain(self.compressor(e[:, 0::2], e[:, 1::2]), RESIDUAL_AXES)

    def __call__(self, tokens_BxT: Array,
                 detach_confidence_inputs: bool = True) -> dict[str, Array]:
        """Teacher-forced forward.

        PIPO returns ``h`` B×(L-1)×H (predicting ``t_{2i+2}``), ``m`` B×(L-1)×H (predicting
        ``t_{2i+3}``) and ``conf_logits`` B×(L-1). The AR model returns ``h`` B×(T-1)×H
        (predicting ``t_{j+1}``); with the drafter also ``m`` B×(T-2)×H, the MTP module on
        ``(h_j, e(t_{j+1}))`` predicting ``t_{j+2}``. The last latent/token has no target and is
        dropped.
        """
        b, t = tokens_BxT.shape
        if not self.pipo:
            positions = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
            e = self.embedder(tokens_BxT)
            h, _ = self.backbone(e, positions)
            if not self.drafter:
                return {"h": h[:, :-1]}
            m, _ = self.mtp_head(h[:, :-2], e[:, 1:-1], positions[:, :-2])
            return {"h": h[:, :-1], "m": sharding.constrain(m, RESIDUAL_AXES)}
        if t % 2:
            raise ValueError(f"PIPO sequences must have even length, got {t}")
        n_latents = t // 2
        positions = jnp.broadcast_to(jnp.arange(n_latents)[None], (b, n_latents))
        h, _ = self.backbone(self.compress(tokens_BxT), positions)
        h = h[:, :-1]
        tok1 = tokens_BxT[:, 2::2]  # the known first token of the next pair
        m, _ = self.mtp_head(h, self.embedder(tok1), positions[:, :-1])
        m = sharding.constrain(m, RESIDUAL_AXES)
        h_c, m_c = (jax.lax.stop_gradient(h), jax.lax.stop_gradient(m)) \
            if detach_confidence_inputs else (h, m)
        return {"h": h, "m": m, "conf_logits": self.confidence_head(h_c, m_c)}

    def logits(self, h: Array) -> Array:
        return self.embedder.attend(h)

    # ------------------------------------------------------------------------------ decoding

    def _inputs(self, tokens_BxT: Array) -> Array:
        """The backbone's inputs: latents of token pairs (PIPO) or token embeddings (AR)."""
        return self.compress(tokens_BxT) if self.pipo else self.embedder(tokens_BxT)

    def prefill(self, prompt_BxP: Array, valid_BxP: Array, slots: int,
                draft: bool) -> tuple[Array, Array, DecodeCache, Array]:
        """The whole (left-padded) prompt through the backbone at once, into a fresh cache of
        ``slots``: the one-shot form ``extend`` is tested against.

        PIPO reads ``P/2`` latents (``valid`` of each pair's first token marks the real ones),
        AR reads ``P`` tokens. Returns the last position's logits B×V (token1 of the first
        pair, or the first token), every position's hidden state B×L×H (``prefill_mtp``'s
        input), the cache (filled ``start … L-1``; with an MTP cache when ``draft``) and each
        row's next position B.
        """
        valid = valid_BxP[:, 0::2] if self.pipo else valid_BxP
        positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
        h, made = self.backbone(self._inputs(prompt_BxP), positions, valid)
        b, length = valid.shape
        cache = DecodeCache.empty(self.cfg, b, slots, draft, h.dtype).write(made)
        n_real = jnp.sum(valid, axis=1, dtype=jnp.int32)
        cache = cache.replace(start=length - n_real, length=jnp.full((b,), length, jnp.int32))
        return self.logits(h[:, -1]), h, cache, positions[:, -1] + 1

    def extend(self, tokens_BxT: Array, cache: DecodeCache,
               tok1_BxC: Array | None = None) -> tuple[Array, DecodeCache]:
        """A chunk of a prompt into the cache: ``C`` new positions (PIPO: ``T/2`` latents; AR:
        ``T`` tokens) at slots ``length …`` of every row, attending to what is filled and
        causally to each other; slots before a row's ``start`` are its left padding. With
        ``tok1`` (PIPO with an MTP cache: the first token of the next pair at each position)
        the MTP layer consumes the chunk too. Returns the hidden states B×C×H and the cache,
        ``length`` advanced by ``C``. Chunk by chunk, equal to ``prefill`` (+ ``prefill_mtp``).
        """
        x = self._inputs(tokens_BxT)
        b, c = x.shape[:2]
        slot = cache.length[:, None] + jnp.arange(c)[None]
        positions = jnp.maximum(slot - cache.start[:, None], 0)
        h, layers = self.backbone(x, positions, None, cache.layers,
                                  (cache.start, cache.length))
        out = cache.replace(layers=layers)
        if tok1_BxC is not None:
            assert cache.mtp is not None
            _, mtp = self.mtp_head.extend(h, self.embedder(tok1_BxC), positions, cache.mtp,
                                          cache.start, cache.length)
            out = out.replace(mtp=mtp)
        return h, out.next_slot(jnp.ones((b,), bool), c)

    def step(self, last_Bx2: Array, positions_B: Array,
             cache: DecodeCache) -> tuple[Array, Array, DecodeCache]:
        """One backbone pass on the last emitted pair (PIPO; AR: the last token, B×1) at
        ``positions`` → (logits B×V of the next token1, hidden B×H, cache with this pass's rows
        written at each row's ``length``; ``next_slot`` makes them filled)."""
        h, layers = self.backbone(self._inputs(last_Bx2), positions_B[:, None], None,
                                  cache.layers, (cache.start, cache.length))
        return self.logits(h[:, 0]), h[:, 0], cache.replace(layers=layers)

    def verify(self, tokens_BxC: Array,
               cache: DecodeCache) -> tuple[Array, Array, DecodeCache]:
        """The AR model on ``C`` new tokens at slots ``length …`` (a speculative verify pass:
        the last token and the drafts) → (logits B×C×V, hidden B×C×H, the cache with their
        rows written; ``length`` is the caller's to advance). Applied with the ``KEPT``
        collection mutable, Gated DeltaNet layers also keep their state at every position."""
        x = self.embedder(tokens_BxC)
        c = x.shape[1]
        slot = cache.length[:, None] + jnp.arange(c)[None]
        positions = jnp.maximum(slot - cache.start[:, None], 0)
        h, layers = self.backbone(x, positions, None, cache.layers,
                                  (cache.start, cache.length))
        return self.logits(h), h, cache.replace(layers=layers)

    def mtp_extend(self, h_BxCxH: Array, tok_BxC: Array, positions_BxC: Array,
                   cache: DecodeCache, index_B: Array) -> tuple[Array, DecodeCache]:
        """The MTP module on ``C`` positions at slots ``index …`` of its own cache, attending
        to its rows before them → (its output states B×C×H, the cache with their rows)."""
        assert cache.mtp is not None
        m, mtp = self.mtp_head.extend(h_BxCxH, self.embedder(tok_BxC), positions_BxC,
                                      cache.mtp, cache.start, index_B)
        return m, cache.replace(mtp=mtp)

    def prefill_mtp(self, h_BxLxH: Array, tok1_BxL: Array, valid_BxP: Array,
                    cache: DecodeCache) -> tuple[Array, Array, DecodeCache]:
        """The MTP layer over the prompt's latents at once, teacher-forced with ``tok1`` (the
        first token of the next pair at each position: the known prompt token, and the sampled
        token1 at the last) → (the last position's draft logits B×V, its confidence logit B,
        the cache with the MTP layer's rows)."""
        valid = valid_BxP[:, 0::2]
        positions = jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=1) - 1, 0)
        m, kv = self.mtp_head(h_BxLxH, self.embedder(tok1_BxL), positions, valid)
        conf = self.confidence_head(h_BxLxH[:, -1], m[:, -1])
        return self.logits(m[:, -1]), conf, cache.write_mtp(kv, jnp.zeros_like(cache.length))

    def step_mtp(self, h_BxH: Array, token1_B: Array, positions_B: Array,
                 cache: DecodeCache, index_B: Array | None = None
                 ) -> tuple[Array, Array, DecodeCache]:
        """The MTP and confidence heads at slot ``index`` (default: this pass's, ``length``),
        attending to the MTP rows before it → (draft logits B×V, confidence logit B, cache with
        the MTP row written there). After ``extend`` the prompt's last position is redone with
        ``index = length - 1`` and the sampled token1."""
        assert cache.mtp is not None
        index_B = cache.length if index_B is None else index_B
        m, mtp = self.mtp_head.extend(h_BxH[:, None], self.embedder(token1_B[:, None]),
                                      positions_B[:, None], cache.mtp, cache.start, index_B)
        conf = self.confidence_head(h_BxH, m[:, 0])
        return self.logits(m[:, 0]), conf, cache.replace(mtp=mtp)


def lm_head(params: dict) -> Array:
    """The V×H matrix the logits are taken against: ``embedder/lm_head`` when the model has an
    untied head, else the embedding."""
    embedder = params["embedder"]
    return embedder["lm_head"] if "lm_head" in embedder else embedder["embedding"]


def init_params(cfg: ModelConfig, pipo: bool, rng: Array,
                lora: LoraConfig | None = None, drafter: bool = False) -> dict:
    """Boxed (logically partitioned) parameters; ``nn.unbox`` them for use."""
    model = PipoLM(cfg, pipo, lora, drafter=drafter)
    tokens = jnp.zeros((1, 4), jnp.int32)
    return model.init(rng, tokens)["params"]


def backbone_layer(cfg: ModelConfig, backbone_params: dict, i: int) -> dict:
    """Parameters of backbone layer ``i`` (un-stacked from its scanned pattern slot)."""
    slot, block = layer_slot(cfg, i)
    return jax.tree.map(lambda x: x[block], backbone_params["layers"][slot])


def pipo_from_ar(cfg: ModelConfig, ar_params: dict, rng: Array,
                 native_mtp: dict | None = None) -> dict:
    """Builds PIPO parameters from an AR checkpoint (the ``sft`` stage's start).

    Embedder and backbone are copied; the compressor gets its configured init (identity-sum by
    default); the confidence head is fresh. The MTP head depends on ``cfg.mtp_init``:
    * ``native``: ``native_mtp``, a checkpoint's own MTP module (Qwen3.5's ``mtp.*``);
    * ``last_layer``: the layer is a copy of the last full-attention backbone layer and the final
      norm the backbone's, with fc the identity-sum ``[I; I]`` so the layer first sees
      ``norm(e(token1)) + norm(h)``;
    * ``random``: fresh.
    """
    fresh = nn.unbox(init_params(cfg, True, rng))
    params = dict(fresh)
    params["embedder"] = ar_params["embedder"]
    params["backbone"] = ar_params["backbone"]
    if cfg.mtp_init == "native":
        if native_mtp is None:
            raise ValueError("mtp_init is 'native' but no native MTP parameters were given")
        params["mtp_head"] = native_mtp
    elif cfg.mtp_init == "last_layer":
        mtp = dict(fresh["mtp_head"])
        mtp["layer"] = backbone_layer(cfg, ar_params["backbone"], cfg.last_full_attention)
        mtp["final_norm"] = ar_params["backbone"]["final_norm"]
        kernel = mtp["fc"]["kernel"]
        mtp["fc"] = {"kernel": _identity_sum_kernel(cfg.d_model)(rng, kernel.shape, kernel.dtype)}
        params["mtp_head"] = mtp
    return params


def drafter_from_ar(cfg: ModelConfig, ar_params: dict, rng: Array,
                    native_mtp: dict | None = None) -> dict:
    """The AR model's parameters plus an MTP drafter (``PipoLM(pipo=False, drafter=True)``),
    the drafter initialised as PIPO's MTP head is (``cfg.mtp_init``, see ``pipo_from_ar``)."""
    return {**ar_params, "mtp_head": pipo_from_ar(cfg, ar_params, rng, native_mtp)["mtp_head"]}


def kept_states(cfg: ModelConfig, kept: dict) -> tuple[Any, ...]:
    """Per pattern slot, what a verify pass kept (``KEPT`` collection of
    ``PipoLM.verify``): the ``DeltaNetCache`` of per-position states for Gated DeltaNet slots,
    None for attention ones; the form ``DecodeCache.keep_position`` reads."""
    layers = kept.get("backbone", {}).get("layers", {})
    return tuple(layers[slot_name(j)]["linear_attn"]["states"][0]
                 if t == "linear_attention" else None
                 for j, t in enumerate(cfg.layer_pattern))

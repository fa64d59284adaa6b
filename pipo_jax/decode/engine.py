"""On-device decode for PIPO and the AR baseline (SPEC §6).

Everything here is a pure function of (params, inputs). A request batch is left-padded (by an even
number of tokens for PIPO, so pairs stay aligned), prefilled in one call, then decoded by one
``lax.while_loop`` that exits early once every row is done; nothing returns to the host per token.

Caches are explicit pytrees (``KVCache``) held in the loop carry and written in place with
``dynamic_update_slice``: layers only *read* the cache and return the new key/value row.

Shapes: ``B`` batch, ``P`` prompt tokens, ``L0 = P/2`` prompt latents, ``S`` cache slots, ``N``
token budget (real, non-PAD tokens), ``V`` vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pipo_jax.config import ModelConfig
from pipo_jax.errors import PromptError
from pipo_jax.model.layers import DecoderLayer, norm, slot_name
from pipo_jax.model.pairs import parity_pad
from pipo_jax.model.pipo import PipoLM
from pipo_jax.model.sharding import batch_sharding, replicated

Array = jax.Array
Params = dict[str, Any]


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


@struct.dataclass
class KVCache:
    """Backbone (and MTP layer) decode state; ``valid`` marks slots a query may attend to.

    ``layers[j]`` holds pattern slot ``j`` of the backbone (``ModelConfig.layer_pattern``),
    stacked over its ``n_blocks`` repeats:
    * full attention: ``(k, v)``, each n_blocks × B × S × K × D, written one row per step;
    * Gated DeltaNet: ``(conv, state)``: the last ``kernel-1`` projected inputs
      n_blocks × B × (kernel-1) × C and the recurrent state n_blocks × B × N × dk × dv (fp32),
      replaced every step. Their size does not grow with the context.
    """

    layers: tuple[tuple[Array, Array], ...]
    valid: Array  # B × S bool
    index: Array  # int32 scalar: the next slot to write
    mtp_k: Array | None = None  # B × S × K × D (PIPO only)
    mtp_v: Array | None = None


@struct.dataclass
class DecodeState:
    cache: KVCache
    last: Array  # B × 2 (PIPO: the last emitted pair) or B × 1 (AR: the last token)
    positions: Array  # B int32: RoPE position of the next latent/token
    out: Array  # B × slots int32, PAD where nothing (or a rejected draft) was emitted
    step: Array  # int32 scalar: decode steps done after prefill
    done: Array  # B bool
    n_tokens: Array  # B int32: real tokens emitted (EOS included, PAD excluded)
    n_passes: Array  # B int32: backbone passes spent on this row (prefill included)
    n_drafts: Array  # B int32: MTP drafts that were gated (PIPO)
    n_commits: Array  # B int32: drafts committed
    seen: Array  # B × V bool: tokens emitted so far (presence penalty)
    keys: Array  # B PRNG keys, one per request


# ----------------------------------------------------------------------------- host-side prompts


def prepare_prompts(prompts: Sequence[Sequence[int]], pipo: bool, pad_id: int, bucket: int,
                    max_new_tokens: int, max_context: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token prompts into one batch → (tokens B×P int32, valid B×P bool).

    PIPO prompts are parity-padded first (one PAD appended to an odd prompt) and ``P`` is even,
    so every row's pairs line up with latent slots. ``P`` is rounded up to ``bucket`` to limit
    recompilation.
    """
    if not prompts:
        raise PromptError("no prompts given")
    rows = []
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise PromptError(f"prompt {i} is empty: give at least one token of text")
        rows.append(parity_pad(p, pad_id) if pipo else list(p))
    longest = max(len(r) for r in rows)
    if longest + max_new_tokens > max_context:
        raise PromptError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the model's "
            f"context of {max_context} tokens; shorten the prompt or lower max_new_tokens")
    bucket = max(2, bucket + bucket % 2)
    width = -(-longest // bucket) * bucket
    tokens = np.full((len(rows), width), pad_id, np.int32)
    valid = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        tokens[i, width - len(r):] = r
        valid[i, width - len(r):] = True
    return tokens, valid


def request_keys(seeds: Sequence[int]) -> Array:
    """One PRNG key per request, so a request's samples do not depend on its batch-mates."""
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


# ----------------------------------------------------------------------------------- sampling


def sample(logits_BxV: Array, keys_B: Array, seen_BxV: Array, sp: SamplingParams,
           forbid: int | None, step: Array | int = 0, slot: int = 0) -> Array:
    """Samples one token per row (greedy when ``temperature == 0``); ``forbid`` is never drawn.

    Row ``b`` draws with ``fold_in(fold_in(keys_B[b], step), slot)``, so a request's samples
    depend only on its own key and position in the output.
    """
    logits = logits_BxV.astype(jnp.float32)
    if sp.presence_penalty:
        logits = logits - sp.presence_penalty * seen_BxV.astype(jnp.float32)
    if forbid is not None:
        logits = logits.at[:, forbid].set(-jnp.inf)
    if sp.vocab_limit:
        logits = logits.at[:, sp.vocab_limit:].set(-jnp.inf)
    if sp.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
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
    keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, step), slot))(keys_B)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def _mark_seen(seen_BxV: Array, tokens_B: Array, mask_B: Array, sp: SamplingParams) -> Array:
    """Records emitted tokens for the presence penalty (skipped when it is off)."""
    if not sp.presence_penalty:
        return seen_BxV
    return seen_BxV.at[jnp.arange(tokens_B.shape[0]), tokens_B].max(mask_B)


# ------------------------------------------------------------------------------ model pieces


def _apply(cfg: ModelConfig, params: Params, fn: Callable[..., Any], *args: Any,
           pipo: bool = True) -> Any:
    return PipoLM(cfg, pipo).apply({"params": params}, *args, method=fn)


def embed(cfg: ModelConfig, params: Params, tokens: Array) -> Array:
    return _apply(cfg, params, lambda m, t: m.embedder(t), tokens, pipo=False)


def compress(cfg: ModelConfig, params: Params, tokens_BxT: Array) -> Array:
    """Token pairs → latents ``B×T/2×H`` (PIPO's input side)."""
    return _apply(cfg, params, lambda m, t: m.compress(t), tokens_BxT)


def lm_logits(cfg: ModelConfig, params: Params, h: Array) -> Array:
    return _apply(cfg, params, lambda m, x: m.logits(x), h, pipo=False)


def _latent_positions(valid_BxL: Array) -> Array:
    return jnp.maximum(jnp.cumsum(valid_BxL.astype(jnp.int32), axis=1) - 1, 0)


def _empty_cache(cfg: ModelConfig, batch: int, slots: int, pipo: bool, dtype: Any) -> KVCache:
    """A cache with zero keys/values, conv and recurrent states."""
    nb = cfg.n_blocks
    layers = []
    for layer_type in cfg.layer_pattern:
        if layer_type == "full_attention":
            kv = jnp.zeros((nb, batch, slots, cfg.n_kv_heads, cfg.head_dim), dtype)
            layers.append((kv, kv))
        else:
            conv = jnp.zeros((nb, batch, cfg.linear_conv_kernel - 1, cfg.linear_conv_dim), dtype)
            state = jnp.zeros((nb, batch, cfg.linear_n_value_heads, cfg.linear_key_head_dim,
                               cfg.linear_value_head_dim), jnp.float32)
            layers.append((conv, state))
    mtp = jnp.zeros((batch, slots, cfg.n_kv_heads, cfg.head_dim), dtype) if pipo else None
    return KVCache(layers=tuple(layers), valid=jnp.zeros((batch, slots), bool),
                   index=jnp.int32(0), mtp_k=mtp, mtp_v=mtp)


def _write_layers(cfg: ModelConfig, layers: tuple[tuple[Array, Array], ...],
                  made: tuple[tuple[Array, Array], ...],
                  index: Array | int) -> tuple[tuple[Array, Array], ...]:
    """Puts what the layers made into the cache: full-attention key/value rows in place at slot
    ``index``; DeltaNet conv and recurrent states replace the old ones."""
    out = []
    for layer_type, (a, b), (ma, mb) in zip(cfg.layer_pattern, layers, made, strict=True):
        if layer_type == "full_attention":
            out.append((jax.lax.dynamic_update_slice(a, ma.astype(a.dtype), (0, 0, index, 0, 0)),
                        jax.lax.dynamic_update_slice(b, mb.astype(b.dtype), (0, 0, index, 0, 0))))
        else:
            out.append((ma.astype(a.dtype), mb.astype(b.dtype)))
    return tuple(out)


def prefill_backbone(cfg: ModelConfig, params: Params, inputs_BxLxH: Array, valid_BxL: Array,
                     slots: int, pipo: bool) -> tuple[Array, KVCache, Array]:
    """Runs the backbone over the whole prompt and fills its cache.

    Returns hidden states B×L×H, the cache (``index = L``) and the next position per row (B).
    """
    b, length, _ = inputs_BxLxH.shape
    positions = _latent_positions(valid_BxL)
    h, made = _apply(cfg, params, lambda m, x, p, kv: m.backbone(x, p, kv), inputs_BxLxH,
                     positions, valid_BxL, pipo=pipo)
    cache = _empty_cache(cfg, b, slots, pipo, h.dtype)
    cache = cache.replace(
        layers=_write_layers(cfg, cache.layers, made, 0),
        valid=jax.lax.dynamic_update_slice(cache.valid, valid_BxL, (0, 0)),
        index=jnp.int32(length))
    return h, cache, positions[:, -1] + 1


def prefill_mtp(cfg: ModelConfig, params: Params, cache: KVCache, h_BxLxH: Array,
                tok1_BxL: Array, valid_BxL: Array) -> tuple[Array, Array, KVCache]:
    """Runs the MTP layer over the prompt positions (teacher-forced ``tok1``) and fills its cache.

    ``tok1[:, i]`` is the first token of pair ``i+1``: the known prompt token ``p_{2i+2}`` for
    ``i < L0-1`` and the sampled ``token1`` at ``L0-1``. Returns the last position's MTP hidden
    B×H, its confidence logit B and the cache.
    """
    positions = _latent_positions(valid_BxL)

    def run(m: PipoLM, h: Array, t: Array, p: Array, kv: Array) -> tuple[Array, Any, Array]:
        out, mtp_kv = m.mtp_head(h, m.embedder(t), p, kv)
        return out, mtp_kv, m.confidence_head(h[:, -1], out[:, -1])

    m_all, (k, v), conf = _apply(cfg, params, run, h_BxLxH, tok1_BxL, positions, valid_BxL)
    cache = cache.replace(mtp_k=jax.lax.dynamic_update_slice(cache.mtp_k, k, (0, 0, 0, 0)),
                          mtp_v=jax.lax.dynamic_update_slice(cache.mtp_v, v, (0, 0, 0, 0)))
    return m_all[:, -1], conf, cache


def backbone_step(cfg: ModelConfig, params: Params, cache: KVCache, x_Bx1xH: Array,
                  positions_B: Array) -> tuple[Array, KVCache]:
    """One backbone pass for one new latent (PIPO) or token (AR) → (h B×H, cache).

    Blocks of the layer pattern run under ``lax.scan`` over the stacked parameters and the
    read-only cache. The new key/value rows of all full-attention layers are written into the
    cache once, in place; DeltaNet layers return their whole (fixed-size) new states.
    """
    layers = [DecoderLayer(cfg, t) for t in cfg.layer_pattern]
    stacked = params["backbone"]["layers"]

    def body(x: Array, block: tuple[tuple[Params, ...], tuple[Any, ...]]) -> tuple[Array, Any]:
        block_params, block_cache = block
        new = []
        for layer, p_l, c_l in zip(layers, block_params, block_cache, strict=True):
            x, made = layer.apply({"params": p_l}, x, positions_B, c_l, cache.valid,
                                  method=DecoderLayer.decode)
            new.append(made)
        return x, tuple(new)

    block_params = tuple(stacked[slot_name(j)] for j in range(len(layers)))
    x, made = jax.lax.scan(body, x_Bx1xH, (block_params, cache.layers))
    h = norm(cfg).apply({"params": params["backbone"]["final_norm"]}, x)
    return h[:, 0], cache.replace(layers=_write_layers(cfg, cache.layers, made, cache.index))


def mtp_step(cfg: ModelConfig, params: Params, cache: KVCache, h_BxH: Array, token1_B: Array,
             positions_B: Array) -> tuple[Array, Array, KVCache]:
    """MTP head + confidence head at the current slot → (m B×H, conf logit B, cache)."""

    def run(m: PipoLM, h: Array, t: Array) -> tuple[Array, Any, Array]:
        out, kv = m.mtp_head.decode(h[:, None], m.embedder(t[:, None]), positions_B, cache.mtp_k,
                                    cache.mtp_v, cache.valid)
        return out[:, 0], kv, m.confidence_head(h, out[:, 0])

    m_out, (k, v), conf = _apply(cfg, params, run, h_BxH, token1_B)
    idx = cache.index
    dt = cache.mtp_k.dtype
    cache = cache.replace(
        mtp_k=jax.lax.dynamic_update_slice(cache.mtp_k, k.astype(dt), (0, idx, 0, 0)),
        mtp_v=jax.lax.dynamic_update_slice(cache.mtp_v, v.astype(dt), (0, idx, 0, 0)))
    return m_out, conf, cache


def advance(cache: KVCache, active_B: Array) -> KVCache:
    """Marks the slot just written as attendable (for active rows) and moves to the next one."""
    col = active_B[:, None]
    return cache.replace(valid=jax.lax.dynamic_update_slice(cache.valid, col, (0, cache.index)),
                         index=cache.index + 1)


# ----------------------------------------------------------------------------- gating / emit


def accept_pair(conf_B: Array, token2_B: Array, threshold: Array, pad_id: int) -> Array:
    """Commits each row's draft when its confidence reaches the threshold, else PAD.

    A ``lax.cond`` per sequence, vmapped over the batch (XLA turns it into a select). With
    ``threshold < 0`` every draft is committed, since a confidence is never negative; with
    ``threshold >= 1`` none is, even where the sigmoid rounds to exactly 1. ``threshold`` is a
    scalar or one threshold per row (B).
    """

    def one(c: Array, t: Array, thr: Array) -> Array:
        commit = (c >= thr) & (thr < 1.0)
        return jax.lax.cond(commit, lambda: t, lambda: jnp.int32(pad_id))

    return jax.vmap(one)(conf_B, token2_B, jnp.broadcast_to(threshold, conf_B.shape))


def _emit_pair(state: DecodeState, token1: Array, token2: Array, drafted: bool, slot: Array,
               eos_id: int, pad_id: int, budget: int, sp: SamplingParams) -> DecodeState:
    """Writes one step's (token1, token2-or-PAD) for the rows still running and updates counts."""
    active = ~state.done
    t1_eos = token1 == eos_id
    n1 = state.n_tokens + active
    # A draft exists only if token1 did not end the row and the budget has room for it.
    draft_ok = active & ~t1_eos & (n1 < budget)
    token2 = jnp.where(draft_ok, token2, pad_id)
    committed = token2 != pad_id
    token1 = jnp.where(active, token1, pad_id)
    out = jax.lax.dynamic_update_slice(state.out, jnp.stack([token1, token2], axis=1), (0, slot))
    n_tokens = n1 + committed
    done = state.done | (active & (t1_eos | (committed & (token2 == eos_id))
                                   | (n_tokens >= budget)))
    seen = _mark_seen(_mark_seen(state.seen, token1, active, sp), token2, committed, sp)
    return state.replace(
        out=out, done=done, n_tokens=n_tokens, seen=seen,
        n_drafts=state.n_drafts + (draft_ok if drafted else 0),
        n_commits=state.n_commits + committed,
        last=jnp.stack([token1, token2], axis=1))


# ------------------------------------------------------------------------------- PIPO decode


def _pipo_prefill(params: Params, prompt_BxP: Array, valid_BxP: Array, keys_B: Array,
                 threshold: Array, *, cfg: ModelConfig, sp: SamplingParams, use_mtp: bool,
                 budget: int, pad_id: int, eos_id: int) -> DecodeState:
    """Prefill: compress the prompt, fill backbone and MTP caches, emit the first pair.

    Unlike the reference implementation (which always emits PAD here), the drafted ``token2``
    of the prefill is emitted, subject to the same gating as every decode step.
    """
    b, p = prompt_BxP.shape
    latent_valid = valid_BxP[:, 0::2]
    latents = compress(cfg, params, prompt_BxP)
    slots = p // 2 + budget
    h_all, cache, positions = prefill_backbone(cfg, params, latents, latent_valid, slots, True)
    h_last = h_all[:, -1]
    seen = jnp.zeros((b, cfg.vocab_size), bool)
    step0 = jnp.int32(0)
    token1 = sample(lm_logits(cfg, params, h_last), keys_B, seen, sp, pad_id, step0, 0)
    token2 = jnp.full((b,), pad_id, jnp.int32)
    if use_mtp:
        tok1_seq = jnp.concatenate([prompt_BxP[:, 2::2], token1[:, None]], axis=1)
        m_last, conf_logit, cache = prefill_mtp(cfg, params, cache, h_all, tok1_seq, latent_valid)
        seen1 = _mark_seen(seen, token1, jnp.ones((b,), bool), sp)
        draft = sample(lm_logits(cfg, params, m_last), keys_B, seen1, sp, None, step0, 1)
        token2 = accept_pair(jax.nn.sigmoid(conf_logit), draft, threshold, pad_id)
    state = DecodeState(
        cache=cache, last=jnp.zeros((b, 2), jnp.int32), positions=positions,
        out=jnp.full((b, 2 * budget), pad_id, jnp.int32), step=jnp.int32(0),
        done=jnp.zeros((b,), bool), n_tokens=jnp.zeros((b,), jnp.int32),
        n_passes=jnp.ones((b,), jnp.int32), n_drafts=jnp.zeros((b,), jnp.int32),
        n_commits=jnp.zeros((b,), jnp.int32), seen=seen, keys=keys_B)
    return _emit_pair(state, token1, token2, use_mtp, jnp.int32(0), eos_id, pad_id, budget,
                      sp)


def pipo_step(params: Params, state: DecodeState, threshold: Array, *, cfg: ModelConfig,
              sp: SamplingParams, use_mtp: bool, budget: int, pad_id: int,
              eos_id: int) -> DecodeState:
    """One decode step: one backbone pass emits one pair (SPEC §6)."""
    active = ~state.done
    step = state.step + 1
    latent = compress(cfg, params, state.last)
    h, cache = backbone_step(cfg, params, state.cache, latent, state.positions)
    token1 = sample(lm_logits(cfg, params, h), state.keys, state.seen, sp, pad_id, step, 0)
    token2 = jnp.full_like(token1, pad_id)
    if use_mtp:  # static: threshold >= 1 skips the MTP forward entirely
        m, conf_logit, cache = mtp_step(cfg, params, cache, h, token1, state.positions)
        seen1 = _mark_seen(state.seen, token1, ~state.done, sp)
        draft = sample(lm_logits(cfg, params, m), state.keys, seen1, sp, None, step, 1)
        token2 = accept_pair(jax.nn.sigmoid(conf_logit), draft, threshold, pad_id)
    state = state.replace(cache=advance(cache, active), positions=state.positions + 1, step=step,
                          n_passes=state.n_passes + active)
    return _emit_pair(state, token1, token2, use_mtp, 2 * step, eos_id, pad_id, budget, sp)


def _loop(step_fn: Callable[[DecodeState], DecodeState], state: DecodeState,
          max_steps: int) -> DecodeState:
    return jax.lax.while_loop(lambda s: (s.step < max_steps) & ~jnp.all(s.done), step_fn, state)


def _pipo_decode_loop(params: Params, state: DecodeState, threshold: Array, *, cfg: ModelConfig,
                     sp: SamplingParams, use_mtp: bool, budget: int, pad_id: int,
                     eos_id: int) -> DecodeState:
    """Decodes until every row is done or has spent its budget (at most ``budget - 1`` steps)."""
    step_fn = functools.partial(pipo_step, params, threshold=threshold, cfg=cfg, sp=sp,
                                use_mtp=use_mtp, budget=budget, pad_id=pad_id, eos_id=eos_id)
    return _loop(step_fn, state, budget - 1)


# --------------------------------------------------------------------------------- AR decode


def _emit_token(state: DecodeState, token: Array, slot: Array, eos_id: int, pad_id: int,
                budget: int, sp: SamplingParams) -> DecodeState:
    active = ~state.done
    token = jnp.where(active, token, pad_id)
    out = jax.lax.dynamic_update_slice(state.out, token[:, None], (0, slot))
    n_tokens = state.n_tokens + active
    done = state.done | (active & ((token == eos_id) | (n_tokens >= budget)))
    seen = _mark_seen(state.seen, token, active, sp)
    return state.replace(out=out, done=done, n_tokens=n_tokens, seen=seen, last=token[:, None])


def _ar_prefill(params: Params, prompt_BxP: Array, valid_BxP: Array, keys_B: Array, *,
               cfg: ModelConfig, sp: SamplingParams, budget: int, pad_id: int,
               eos_id: int) -> DecodeState:
    """AR prefill over all prompt tokens → state with the first sampled token."""
    b, p = prompt_BxP.shape
    x = embed(cfg, params, prompt_BxP)
    h_all, cache, positions = prefill_backbone(cfg, params, x, valid_BxP, p + budget, False)
    seen = jnp.zeros((b, cfg.vocab_size), bool)
    token = sample(lm_logits(cfg, params, h_all[:, -1]), keys_B, seen, sp, pad_id)
    zeros = jnp.zeros((b,), jnp.int32)
    state = DecodeState(cache=cache, last=jnp.zeros((b, 1), jnp.int32), positions=positions,
                        out=jnp.full((b, budget), pad_id, jnp.int32), step=jnp.int32(0),
                        done=jnp.zeros((b,), bool), n_tokens=zeros, n_passes=zeros + 1,
                        n_drafts=zeros, n_commits=zeros, seen=seen, keys=keys_B)
    return _emit_token(state, token, jnp.int32(0), eos_id, pad_id, budget, sp)


def ar_step(params: Params, state: DecodeState, *, cfg: ModelConfig, sp: SamplingParams,
            budget: int, pad_id: int, eos_id: int) -> DecodeState:
    """One AR step: one backbone pass emits one token."""
    active = ~state.done
    step = state.step + 1
    h, cache = backbone_step(cfg, params, state.cache, embed(cfg, params, state.last),
                             state.positions)
    token = sample(lm_logits(cfg, params, h), state.keys, state.seen, sp, pad_id, step, 0)
    state = state.replace(cache=advance(cache, active), positions=state.positions + 1, step=step,
                          n_passes=state.n_passes + active)
    return _emit_token(state, token, step, eos_id, pad_id, budget, sp)


def _ar_decode_loop(params: Params, state: DecodeState, *, cfg: ModelConfig, sp: SamplingParams,
                   budget: int, pad_id: int, eos_id: int) -> DecodeState:
    step_fn = functools.partial(ar_step, params, cfg=cfg, sp=sp, budget=budget, pad_id=pad_id,
                                eos_id=eos_id)
    return _loop(step_fn, state, budget - 1)


_PIPO_STATIC = ("cfg", "sp", "use_mtp", "budget", "pad_id", "eos_id")
_AR_STATIC = ("cfg", "sp", "budget", "pad_id", "eos_id")
# Compiled with the shardings their inputs carry (one device, or whatever the caller placed);
# ``MeshDecoder`` compiles the same functions with explicit shardings for a mesh.
pipo_prefill = jax.jit(_pipo_prefill, static_argnames=_PIPO_STATIC)
pipo_decode_loop = jax.jit(_pipo_decode_loop, static_argnames=_PIPO_STATIC,
                           donate_argnames=("state",))
ar_prefill = jax.jit(_ar_prefill, static_argnames=_AR_STATIC)
ar_decode_loop = jax.jit(_ar_decode_loop, static_argnames=_AR_STATIC, donate_argnames=("state",))


# ------------------------------------------------------------------------------ on a device mesh


def decode_state_shardings(state: DecodeState, mesh: Mesh) -> DecodeState:
    """Shardings of a (possibly abstract) ``DecodeState`` on ``mesh``: every batch-major leaf
    split over the batch axes (the cache's stacked layers on their second axis, after
    ``n_blocks``), scalars replicated."""
    batch_axes = batch_sharding(mesh).spec[0]

    def one(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        if not leaf.shape:
            return replicated(mesh)
        stacked = any(getattr(k, "name", None) == "layers" for k in path)
        return NamedSharding(mesh, PartitionSpec(None, batch_axes) if stacked
                             else PartitionSpec(batch_axes))

    return jax.tree_util.tree_map_with_path(one, state)


class MeshDecoder:
    """Prefill and decode loop of PIPO (``pipo=True``) or the AR model, compiled for ``mesh``
    with explicit shardings: parameters as ``params_sh``, prompts, keys and the decode state
    split over the batch axes (``data × fsdp``; the batch must divide evenly), the threshold
    replicated. ``static``: the keyword arguments of ``pipo_prefill`` / ``ar_prefill``."""

    def __init__(self, mesh: Mesh, params_sh: Any, pipo: bool, **static: Any) -> None:
        self.mesh, self.params_sh, self.pipo = mesh, params_sh, pipo
        self._prefill_fn = functools.partial(_pipo_prefill if pipo else _ar_prefill, **static)
        self._loop_fn = functools.partial(_pipo_decode_loop if pipo else _ar_decode_loop,
                                          **static)
        self._programs: tuple[Any, Any] | None = None

    def _compile(self, params: Params, args: tuple[Any, ...]) -> tuple[Any, Any]:
        # The state's shardings depend on its tree (the model's layer pattern), not on the
        # batch or prompt length, so one pair of jitted programs serves every shape.
        if self._programs is None:
            batch, rep = batch_sharding(self.mesh), replicated(self.mesh)
            extra = (rep,) if self.pipo else ()  # the threshold
            state_sh = decode_state_shardings(
                jax.eval_shape(self._prefill_fn, params, *args), self.mesh)
            self._programs = (
                jax.jit(self._prefill_fn, in_shardings=(self.params_sh, batch, batch, batch,
                                                        *extra), out_shardings=state_sh),
                jax.jit(self._loop_fn, in_shardings=(self.params_sh, state_sh, *extra),
                        out_shardings=state_sh, donate_argnums=(1,)))
        return self._programs

    def prefill(self, params: Params, prompt_BxP: Array, valid_BxP: Array, keys_B: Array,
                *threshold: Array) -> DecodeState:
        """``pipo_prefill`` / ``ar_prefill`` (PIPO also takes the threshold)."""
        args = (prompt_BxP, valid_BxP, keys_B, *threshold)
        with jax.set_mesh(self.mesh):
            return self._compile(params, args)[0](params, *args)

    def loop(self, params: Params, state: DecodeState, *threshold: Array) -> DecodeState:
        """``pipo_decode_loop`` / ``ar_decode_loop`` on a state from ``prefill``."""
        if self._programs is None:
            raise RuntimeError("MeshDecoder.loop needs a state from MeshDecoder.prefill")
        with jax.set_mesh(self.mesh):
            return self._programs[1](params, state, *threshold)

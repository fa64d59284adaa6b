"""Speculative decoding with an MTP drafter: the verify-based baseline PIPO is compared with.

An AR model with a DeepSeek/Qwen3.5-style MTP module (``PipoLM(pipo=False, drafter=True)``:
the module predicts token ``t+2`` from the backbone state at ``t`` and the embedding of token
``t+1``) decodes in rounds. A round, for every running row at once, each at its own length:

1. **draft**: ``k`` tokens by chaining the MTP module (its own output state and the last draft
   feed the next call); the first draft was made at the end of the previous round;
2. **verify**: one backbone pass over ``k + 1`` positions, the last emitted token and the ``k``
   drafts, giving the AR model's distribution at each;
3. **accept** the longest verified prefix plus one token from the AR model (greedy: exact
   match, so the output is AR greedy's; sampling: the speculative-sampling rule, accept with
   ``min(1, p/q)`` and resample from ``max(0, p - q)``, so the output is distributed as AR
   sampling's);
4. **roll back** the caches to the accepted length: key/value rows are positions past
   ``length`` (nothing to undo), Gated DeltaNet conv and recurrent states are taken at the
   accepted position from the ones the verify pass kept per position;
5. the MTP module re-reads the ``k + 1`` verified positions teacher-forced (backbone state,
   next token), which rewrites its own cache rows and makes the next round's first draft.

Stopping, the budget and the stats (``n_drafts`` drafted, ``n_commits`` accepted,
``n_passes`` backbone passes) match ``engine.DecodeState``'s, so the three decoders report
alike. Presence penalty is not supported: the AR distribution at a draft position would depend
on the drafts before it being accepted (``DecodeConfig`` refuses it).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from pipo_jax.decode.engine import DecodeSpec, Prefilled, fill
from pipo_jax.decode.sampling import adjusted_logits, sample
from pipo_jax.model.cache import KEPT, DecodeCache, DeltaNetCache, put_rows
from pipo_jax.model.pipo import PipoLM, kept_states

Array = jax.Array
Params = Any
# Sampling slots of one round's keys (``fold_in(fold_in(key, round), slot)``).
_DRAFT, _ACCEPT, _BONUS = 0, 16, 32


@struct.dataclass
class SpecState:
    """The carry of a speculative decode: ``engine.DecodeState``'s fields (output written
    compactly, ``n_tokens`` real tokens per row) and what the next round's draft chain starts
    from."""

    cache: DecodeCache
    last: Array  # B int32: the last emitted token (not yet in the backbone cache)
    positions: Array  # B int32: its RoPE position
    draft: Array  # B int32: the first draft of the next round
    draft_h: Array  # B × H: the MTP output state that drafted it (the chain's next input)
    draft_logits: Array | None  # B × V: its distribution q (sampling only)
    out: Array  # B × out_width int32
    step: Array  # B int32: rounds done
    done: Array  # B bool
    n_tokens: Array  # B int32
    n_passes: Array  # B int32: backbone passes (prefill included)
    n_drafts: Array  # B int32: drafts verified
    n_commits: Array  # B int32: drafts accepted
    keys: Array  # B PRNG keys


def _hold(active_B: Array, new: Array, old: Array) -> Array:
    """``new`` for running rows, ``old`` for finished ones, of a stacked ``nb × B × …`` leaf."""
    return jnp.where(active_B.reshape((1, -1) + (1,) * (new.ndim - 2)), new, old)


def _check(spec: DecodeSpec) -> None:
    if not spec.speculative:
        raise ValueError("speculative decoding needs a DecodeSpec with speculative=k >= 1")


def _draft_from(model: PipoLM, params: Params, m_BxH: Array, keys_B: Array, step_B: Array,
                slot: int, spec: DecodeSpec) -> tuple[Array, Array | None]:
    """A draft token from the MTP output ``m`` (and its logits, when sampling)."""
    logits = model.apply({"params": params}, m_BxH, method=PipoLM.logits)
    token = sample(logits, keys_B, None, spec.sampling, spec.pad_id, step_B, _DRAFT + slot)
    return token, (logits if spec.sampling.temperature > 0 else None)


def first_emit(params: Params, pre: Prefilled, keys_B: Array, *,
               spec: DecodeSpec) -> SpecState:
    """The first token of a prefilled batch (from the prompt's last position) and the first
    draft: the MTP layer redoes the prompt's last position with the sampled token."""
    _check(spec)
    model = spec.model
    b = pre.logits.shape[0]
    zeros = jnp.zeros((b,), jnp.int32)
    token = sample(pre.logits, keys_B, None, spec.sampling, spec.pad_id, zeros, _BONUS)
    cache = pre.cache
    m, cache = model.apply({"params": params}, pre.h_last[:, None], token[:, None],
                           pre.positions[:, None] - 1, cache, cache.length - 1,
                           method=PipoLM.mtp_extend)
    draft, q = _draft_from(model, params, m[:, 0], keys_B, zeros + 1, 0, spec)
    out = jnp.full((b, spec.out_width), spec.pad_id, jnp.int32).at[:, 0].set(token)
    n_tokens = zeros + 1
    done = (token == spec.eos_id) | (n_tokens >= spec.budget)
    return SpecState(cache=cache, last=token, positions=pre.positions, draft=draft,
                     draft_h=m[:, 0], draft_logits=q, out=out, step=zeros, done=done,
                     n_tokens=n_tokens, n_passes=zeros + 1, n_drafts=zeros, n_commits=zeros,
                     keys=keys_B)


def prefill(params: Params, prompt_BxP: Array, valid_BxP: Array, keys_B: Array, *,
            spec: DecodeSpec) -> SpecState:
    """``engine.fill`` (chunked; the MTP layer teacher-forced over the prompt) then
    ``first_emit``."""
    return first_emit(params, fill(params, prompt_BxP, valid_BxP, spec=spec), keys_B, spec=spec)


def _accept(spec: DecodeSpec, p_logits: Array, drafts_BxK: Array, q_logits: Array | None,
            keys_B: Array, n_B: Array) -> tuple[Array, Array]:
    """How many drafts each row accepts (``a``, B) and the token after them (B).

    ``p_logits`` B×(k+1)×V are the AR model's at the verified positions, ``q_logits``
    B×k×V the drafter's (sampling only)."""
    sp, k = spec.sampling, drafts_BxK.shape[1]
    p_adj = jax.vmap(lambda lg: adjusted_logits(lg, None, sp, spec.pad_id), 1, 1)(p_logits)
    if sp.temperature == 0.0:
        target = jnp.argmax(p_adj, axis=-1).astype(jnp.int32)  # B × (k+1)
        ok = drafts_BxK == target[:, :k]
        a = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)
        return a, jnp.take_along_axis(target, a[:, None], axis=1)[:, 0]
    assert q_logits is not None
    q_adj = jax.vmap(lambda lg: adjusted_logits(lg, None, sp, spec.pad_id), 1, 1)(q_logits)
    p, q = jax.nn.softmax(p_adj, axis=-1), jax.nn.softmax(q_adj, axis=-1)
    pick = drafts_BxK[..., None]
    p_d = jnp.take_along_axis(p[:, :k], pick, axis=-1)[..., 0]
    q_d = jnp.take_along_axis(q, pick, axis=-1)[..., 0]

    def uniforms(key: Array, n: Array) -> Array:
        base = jax.random.fold_in(key, n)
        return jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(base, _ACCEPT + j)))(
            jnp.arange(k))

    u = jax.vmap(uniforms)(keys_B, n_B)  # B × k
    # u < p/q, written without the division: q(d) > 0 for a draft q drew.
    ok = u * q_d < p_d
    a = jnp.sum(jnp.cumprod(ok, axis=1), axis=1).astype(jnp.int32)
    # After a rejection at j the token comes from max(0, p_j - q_j); after k acceptances from
    # p_k (q padded with zeros there).
    q_ext = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)
    p_a = jnp.take_along_axis(p, a[:, None, None], axis=1)[:, 0]
    q_a = jnp.take_along_axis(q_ext, a[:, None, None], axis=1)[:, 0]
    resid = jnp.maximum(p_a - q_a, 0.0)
    # p == q to the last bit leaves nothing: then p itself is the right distribution.
    resid = jnp.where(jnp.sum(resid, -1, keepdims=True) > 0, resid, p_a)
    keys = jax.vmap(lambda kk, n: jax.random.fold_in(jax.random.fold_in(kk, n), _BONUS))(
        keys_B, n_B)
    bonus = jax.vmap(jax.random.categorical)(keys, jnp.log(resid)).astype(jnp.int32)
    return a, bonus


def round_step(params: Params, state: SpecState, *, spec: DecodeSpec) -> SpecState:
    """One round (draft ``k``, verify, accept, roll back, redraft) for every running row."""
    _check(spec)
    model, variables, k = spec.model, {"params": params}, spec.speculative
    active = ~state.done
    n = state.step + 1
    cache = state.cache
    # 1. The draft chain: the MTP module on its own output state and the previous draft, at
    # slots past the filled ones (scratch rows, rewritten in 5.).
    drafts, q_list, m, d = [state.draft], [state.draft_logits], state.draft_h, state.draft
    for j in range(1, k):
        m_new, cache = model.apply(variables, m[:, None], d[:, None],
                                   (state.positions + j - 1)[:, None], cache,
                                   cache.length - 1 + j, method=PipoLM.mtp_extend)
        m = m_new[:, 0]
        d, q = _draft_from(model, params, m, state.keys, n, j, spec)
        drafts.append(d)
        q_list.append(q)
    drafts_BxK = jnp.stack(drafts, axis=1)
    # 2. Verify: the last token and the drafts through the backbone, DeltaNet states kept
    # per position.
    tokens = jnp.concatenate([state.last[:, None], drafts_BxK], axis=1)  # B × (k+1)
    (logits, h, cache), kept = model.apply(variables, tokens, cache, method=PipoLM.verify,
                                           mutable=[KEPT])
    q_logits = None if spec.sampling.temperature == 0.0 else jnp.stack(q_list, axis=1)
    # 3. Accept.
    a, bonus = _accept(spec, logits, drafts_BxK, q_logits, state.keys, n)
    j = jnp.arange(k + 1)[None]
    # The verified continuation: the accepted drafts, then the AR model's token (past it:
    # unused). Position j is also the MTP layer's next token at verified position j (5.).
    verified = jnp.where(j < a[:, None], jnp.pad(drafts_BxK, ((0, 0), (0, 1))),
                         bonus[:, None])
    # Stop at the first EOS and at the budget.
    is_eos = (verified == spec.eos_id) & (j <= a[:, None])
    first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), k + 1)
    count = jnp.minimum(jnp.minimum(a + 1, first_eos + 1), spec.budget - state.n_tokens)
    count = jnp.where(active, count, 0)
    emitted = jnp.where(j < count[:, None], verified, spec.pad_id)
    current = jax.vmap(lambda o, i: jax.lax.dynamic_slice_in_dim(o, i, k + 1))(
        state.out, state.n_tokens)
    out = put_rows(state.out, jnp.where(j < count[:, None], emitted, current), state.n_tokens)
    n_tokens = state.n_tokens + count
    done = state.done | (active & ((first_eos < count) | (n_tokens >= spec.budget)))
    # 4. Roll back to the last position whose successor was emitted: the cache keeps the
    # last token and the accepted drafts (``count`` positions; fewer only where EOS or the
    # budget ended the row). DeltaNet states are taken there; later rows lie past length.
    last_i = jnp.maximum(count - 1, 0)
    cache = cache.keep_position(kept_states(spec.cfg, kept.get(KEPT, {})), last_i)
    # Finished rows keep the states they ended with (the verify pass ran them too).
    cache = cache.replace(layers=tuple(
        jax.tree.map(functools.partial(_hold, active), new, old)
        if isinstance(old, DeltaNetCache) else new
        for new, old in zip(cache.layers, state.cache.layers, strict=True)))
    # 5. The MTP layer over the verified positions, teacher-forced: (h_t, token t+1).
    positions_BxC = state.positions[:, None] + j
    m_all, cache = model.apply(variables, h, verified, positions_BxC, cache, cache.length,
                               method=PipoLM.mtp_extend)
    m_a = jnp.take_along_axis(m_all, last_i[:, None, None], axis=1)[:, 0]
    draft, q = _draft_from(model, params, m_a, state.keys, n + 1, 0, spec)
    adv = count
    keep = active[:, None]
    return state.replace(
        cache=cache.replace(length=cache.length + adv),
        last=jnp.where(active, jnp.take_along_axis(emitted, last_i[:, None], axis=1)[:, 0],
                       state.last), positions=state.positions + adv,
        draft=jnp.where(active, draft, state.draft),
        draft_h=jnp.where(keep, m_a, state.draft_h),
        draft_logits=None if q is None else jnp.where(keep, q, state.draft_logits),
        out=out, step=state.step + active, done=done, n_tokens=n_tokens,
        n_passes=state.n_passes + active, n_drafts=state.n_drafts + k * active,
        n_commits=state.n_commits + jnp.where(active, jnp.minimum(a, count), 0))


def decode_loop(params: Params, state: SpecState, *, spec: DecodeSpec) -> SpecState:
    """Rounds until every row is done (each round emits at least one token per running row,
    so at most ``budget - 1`` rounds)."""

    def body(carry: tuple[SpecState, Array]) -> tuple[SpecState, Array]:
        st, i = carry
        return round_step(params, st, spec=spec), i + 1

    def cond(carry: tuple[SpecState, Array]) -> Array:
        st, i = carry
        return (i < spec.budget - 1) & ~jnp.all(st.done)

    return jax.lax.while_loop(cond, body, (state, jnp.int32(0)))[0]


def generate(params: Params, prompt_BxP: Array, valid_BxP: Array, keys_B: Array, *,
             spec: DecodeSpec) -> SpecState:
    """``prefill`` then ``decode_loop``: a whole request batch in one traced function."""
    return decode_loop(params, prefill(params, prompt_BxP, valid_BxP, keys_B, spec=spec),
                       spec=spec)


class Decoder:
    """``prefill`` and ``decode_loop`` of one speculative ``DecodeSpec``, compiled once, with
    ``engine.Decoder``'s interface (the threshold argument is PIPO's and is not read). One
    device: the speculative decoder has no mesh programs yet."""

    def __init__(self, spec: DecodeSpec) -> None:
        _check(spec)
        self.spec = spec
        self._prefill = jax.jit(functools.partial(prefill, spec=spec))
        self._loop = jax.jit(functools.partial(decode_loop, spec=spec), donate_argnums=(1,))

    def prefill(self, params: Params, prompt_BxP: Array, valid_BxP: Array, keys_B: Array,
                threshold: Array | None = None) -> SpecState:
        return self._prefill(params, prompt_BxP, valid_BxP, keys_B)

    def loop(self, params: Params, state: SpecState,
             threshold: Array | None = None) -> SpecState:
        return self._loop(params, state)

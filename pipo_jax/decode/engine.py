"""On-device decode for PIPO and the AR baseline (SPEC §6): one code path for both.

A request batch is left-padded (by an even number of tokens for PIPO, so pairs stay aligned),
prefilled in one call, then decoded by one ``lax.while_loop`` that exits early once every row is
done; nothing returns to the host per token. Every function is pure in (params, inputs) with
one frozen ``DecodeSpec`` of statics; each backbone pass is one call of the model's own decode
method (``PipoLM.step``; PIPO adds ``PipoLM.step_mtp`` for the draft) on the explicit
``DecodeCache`` held in the loop carry. ``Decoder`` compiles prefill and loop, on a device mesh
of any size or wherever the inputs are.

Shapes: ``B`` batch, ``P`` prompt tokens, ``L0 = P/2`` prompt latents, ``S`` cache slots, ``N``
token budget (real, non-PAD tokens), ``V`` vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pipo_jax.config import DecodeConfig, ModelConfig
from pipo_jax.decode.sampling import SamplingParams, mark_seen, sample, vocab_limit
from pipo_jax.errors import PromptError
from pipo_jax.io.tokenizer import Tokenizer
from pipo_jax.model.cache import DecodeCache
from pipo_jax.model.pairs import parity_pad
from pipo_jax.model.pipo import PipoLM
from pipo_jax.model.sharding import batch_sharding, replicated

Array = jax.Array
Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """The statics of one decode program (hashable: each selects a compiled program).

    ``pipo``: PIPO (pairs) or the AR baseline (tokens) on ``cfg``. ``draft``: PIPO runs the MTP
    and confidence heads (never for AR; for PIPO not when the threshold is >= 1, which commits
    no draft: one token per pass, no MTP work and no MTP cache). ``budget``: real tokens per
    request.
    """

    cfg: ModelConfig
    pipo: bool
    sampling: SamplingParams
    budget: int
    pad_id: int
    eos_id: int
    draft: bool = False

    def __post_init__(self) -> None:
        if self.draft and not self.pipo:
            raise ValueError("an AR DecodeSpec cannot draft (draft=True needs pipo=True)")

    @classmethod
    def of(cls, cfg: ModelConfig, pipo: bool, opts: DecodeConfig,
           tokenizer: Tokenizer) -> DecodeSpec:
        """The spec of ``opts`` (a ``DecodeConfig``) for ``tokenizer``'s ids on ``cfg``."""
        sp = SamplingParams(opts.temperature, opts.top_k, opts.top_p, opts.presence_penalty,
                            vocab_limit(tokenizer, cfg.vocab_size))
        return cls(cfg, pipo, sp, opts.max_new_tokens, tokenizer.pad_id, tokenizer.eos_id,
                   draft=pipo and opts.threshold < 1.0)

    @property
    def model(self) -> PipoLM:
        return PipoLM(self.cfg, self.pipo)


@struct.dataclass
class DecodeState:
    cache: DecodeCache
    last: Array  # B × 2 (PIPO: the last emitted pair) or B × 1 (AR: the last token)
    positions: Array  # B int32: RoPE position of the next latent/token
    out: Array  # B × slots int32, PAD where nothing (or a rejected draft) was emitted
    step: Array  # int32 scalar: decode steps done after prefill
    done: Array  # B bool
    n_tokens: Array  # B int32: real tokens emitted (EOS included, PAD excluded)
    n_passes: Array  # B int32: backbone passes spent on this row (prefill included)
    n_drafts: Array  # B int32: MTP drafts that were gated (PIPO)
    n_commits: Array  # B int32: drafts committed
    seen: Array | None  # B × V bool: tokens emitted so far (only with a presence penalty)
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


def _emit_pair(state: DecodeState, token1: Array, token2: Array, slot: Array,
               spec: DecodeSpec) -> DecodeState:
    """Writes one step's (token1, token2-or-PAD) for the rows still running and updates counts."""
    active = ~state.done
    t1_eos = token1 == spec.eos_id
    n1 = state.n_tokens + active
    # A draft exists only if token1 did not end the row and the budget has room for it.
    draft_ok = active & ~t1_eos & (n1 < spec.budget)
    token2 = jnp.where(draft_ok, token2, spec.pad_id)
    committed = token2 != spec.pad_id
    token1 = jnp.where(active, token1, spec.pad_id)
    out = jax.lax.dynamic_update_slice(state.out, jnp.stack([token1, token2], axis=1), (0, slot))
    n_tokens = n1 + committed
    done = state.done | (active & (t1_eos | (committed & (token2 == spec.eos_id))
                                   | (n_tokens >= spec.budget)))
    seen = mark_seen(mark_seen(state.seen, token1, active), token2, committed)
    return state.replace(
        out=out, done=done, n_tokens=n_tokens, seen=seen,
        n_drafts=state.n_drafts + (draft_ok if spec.draft else 0),
        n_commits=state.n_commits + committed,
        last=jnp.stack([token1, token2], axis=1))


def _emit_token(state: DecodeState, token: Array, slot: Array, spec: DecodeSpec) -> DecodeState:
    active = ~state.done
    token = jnp.where(active, token, spec.pad_id)
    out = jax.lax.dynamic_update_slice(state.out, token[:, None], (0, slot))
    n_tokens = state.n_tokens + active
    done = state.done | (active & ((token == spec.eos_id) | (n_tokens >= spec.budget)))
    return state.replace(out=out, done=done, n_tokens=n_tokens,
                         seen=mark_seen(state.seen, token, active), last=token[:, None])


def _draft(spec: DecodeSpec, logits_BxV: Array, conf_logit_B: Array, keys_B: Array,
           seen_BxV: Array | None, step: Array, threshold: Array) -> Array:
    """The gated second token of a pair: sampled from the MTP logits, kept or PAD."""
    draft = sample(logits_BxV, keys_B, seen_BxV, spec.sampling, None, step, 1)
    return accept_pair(jax.nn.sigmoid(conf_logit_B), draft, threshold, spec.pad_id)


# ------------------------------------------------------------------------------------ decode


def prefill(params: Params, prompt_BxP: Array, valid_BxP: Array, keys_B: Array,
            threshold: Array, *, spec: DecodeSpec) -> DecodeState:
    """The prompt through the model, and the first output: one pair (PIPO) or token (AR).

    Unlike the reference implementation (which always emits PAD here), PIPO emits the
    prefill's drafted ``token2``, gated as at every decode step. ``threshold`` (a scalar or one
    per row) is read only by PIPO with drafts.
    """
    b, p = prompt_BxP.shape
    model, sp, variables = spec.model, spec.sampling, {"params": params}
    slots = (p // 2 if spec.pipo else p) + spec.budget
    logits, h_all, cache, positions = model.apply(
        variables, prompt_BxP, valid_BxP, slots, spec.draft, method=PipoLM.prefill)
    seen = jnp.zeros((b, spec.cfg.vocab_size), bool) if sp.presence_penalty else None
    step0 = jnp.int32(0)
    token1 = sample(logits, keys_B, seen, sp, spec.pad_id, step0, 0)
    zeros = jnp.zeros((b,), jnp.int32)
    state = DecodeState(
        cache=cache, last=jnp.zeros((b, 2 if spec.pipo else 1), jnp.int32),
        positions=positions,
        out=jnp.full((b, 2 * spec.budget if spec.pipo else spec.budget), spec.pad_id, jnp.int32),
        step=step0, done=jnp.zeros((b,), bool), n_tokens=zeros, n_passes=zeros + 1,
        n_drafts=zeros, n_commits=zeros, seen=seen, keys=keys_B)
    if not spec.pipo:
        return _emit_token(state, token1, step0, spec)
    token2 = jnp.full((b,), spec.pad_id, jnp.int32)
    if spec.draft:
        tok1_seq = jnp.concatenate([prompt_BxP[:, 2::2], token1[:, None]], axis=1)
        draft_logits, conf_logit, cache = model.apply(
            variables, h_all, tok1_seq, valid_BxP, cache, method=PipoLM.prefill_mtp)
        seen1 = mark_seen(seen, token1, jnp.ones((b,), bool))
        token2 = _draft(spec, draft_logits, conf_logit, keys_B, seen1, step0, threshold)
        state = state.replace(cache=cache)
    return _emit_pair(state, token1, token2, step0, spec)


def step(params: Params, state: DecodeState, threshold: Array, *,
         spec: DecodeSpec) -> DecodeState:
    """One decode step: one backbone pass emits one pair (PIPO, SPEC §6) or one token (AR)."""
    model, sp, variables = spec.model, spec.sampling, {"params": params}
    active = ~state.done
    n = state.step + 1
    logits, h, cache = model.apply(variables, state.last, state.positions, state.cache,
                                   method=PipoLM.step)
    token1 = sample(logits, state.keys, state.seen, sp, spec.pad_id, n, 0)
    token2 = jnp.full_like(token1, spec.pad_id)
    if spec.draft:
        draft_logits, conf_logit, cache = model.apply(
            variables, h, token1, state.positions, cache, method=PipoLM.step_mtp)
        seen1 = mark_seen(state.seen, token1, active)
        token2 = _draft(spec, draft_logits, conf_logit, state.keys, seen1, n, threshold)
    state = state.replace(cache=cache.next_slot(active), positions=state.positions + 1, step=n,
                          n_passes=state.n_passes + active)
    if not spec.pipo:
        return _emit_token(state, token1, n, spec)
    return _emit_pair(state, token1, token2, 2 * n, spec)


def decode_loop(params: Params, state: DecodeState, threshold: Array, *,
                spec: DecodeSpec) -> DecodeState:
    """Steps until every row is done or has spent its budget (at most ``budget - 1`` steps)."""
    body = functools.partial(step, params, threshold=threshold, spec=spec)
    return jax.lax.while_loop(lambda s: (s.step < spec.budget - 1) & ~jnp.all(s.done), body,
                              state)


def generate(params: Params, prompt_BxP: Array, valid_BxP: Array, keys_B: Array,
             threshold: Array, *, spec: DecodeSpec) -> DecodeState:
    """``prefill`` then ``decode_loop``: a whole request batch in one traced function."""
    state = prefill(params, prompt_BxP, valid_BxP, keys_B, threshold, spec=spec)
    return decode_loop(params, state, threshold, spec=spec)


# ------------------------------------------------------------------------------------ compile


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


class Decoder:
    """``prefill`` and ``decode_loop`` of one ``DecodeSpec``, compiled once.

    With a ``mesh`` (any size) the programs have explicit shardings: parameters as
    ``params_sh``, prompts, keys and the decode state split over the batch axes (``data ×
    fsdp``; the batch must divide evenly), the threshold replicated. Without one they run
    wherever their inputs are.
    """

    def __init__(self, spec: DecodeSpec, mesh: Mesh | None = None,
                 params_sh: Any = None) -> None:
        self.spec, self.mesh, self.params_sh = spec, mesh, params_sh
        self._prefill_fn = functools.partial(prefill, spec=spec)
        self._loop_fn = functools.partial(decode_loop, spec=spec)
        self._programs: tuple[Any, Any] | None = None

    def _compile(self, params: Params, args: tuple[Any, ...]) -> tuple[Any, Any]:
        # The state's shardings depend on its tree (the model's layer pattern), not on the
        # batch or prompt length, so one pair of jitted programs serves every shape.
        if self._programs is None:
            if self.mesh is None:
                self._programs = (jax.jit(self._prefill_fn),
                                  jax.jit(self._loop_fn, donate_argnums=(1,)))
            else:
                batch, rep = batch_sharding(self.mesh), replicated(self.mesh)
                state_sh = decode_state_shardings(
                    jax.eval_shape(self._prefill_fn, params, *args), self.mesh)
                self._programs = (
                    jax.jit(self._prefill_fn,
                            in_shardings=(self.params_sh, batch, batch, batch, rep),
                            out_shardings=state_sh),
                    jax.jit(self._loop_fn, in_shardings=(self.params_sh, state_sh, rep),
                            out_shardings=state_sh, donate_argnums=(1,)))
        return self._programs

    def prefill(self, params: Params, prompt_BxP: Array, valid_BxP: Array, keys_B: Array,
                threshold: Array) -> DecodeState:
        args = (prompt_BxP, valid_BxP, keys_B, threshold)
        if self.mesh is None:
            return self._compile(params, args)[0](params, *args)
        with jax.set_mesh(self.mesh):
            return self._compile(params, args)[0](params, *args)

    def loop(self, params: Params, state: DecodeState, threshold: Array) -> DecodeState:
        """``decode_loop`` on a state from ``prefill``."""
        if self._programs is None:
            raise RuntimeError("Decoder.loop needs a state from Decoder.prefill")
        if self.mesh is None:
            return self._programs[1](params, state, threshold)
        with jax.set_mesh(self.mesh):
            return self._programs[1](params, state, threshold)

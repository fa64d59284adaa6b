"""On-device decode for PIPO and the AR baseline (SPEC §6): one code path for both.

A request batch is left-padded (by an even number of tokens for PIPO, so pairs stay aligned),
prefilled chunk by chunk (``fill``: ``PipoLM.extend`` per chunk of ``prefill_chunk`` tokens, so
memory follows the chunk, not the prompt), its first output sampled (``first_emit``), then
decoded by one ``lax.while_loop`` that exits early once every row is done; nothing returns to
the host per token. Every function is pure in (params, inputs) with one frozen ``DecodeSpec``
of statics; each backbone pass is one call of the model's own decode method (``PipoLM.step``;
PIPO adds ``PipoLM.step_mtp`` for the draft) on the explicit ``DecodeCache`` held in the loop
carry. Every row has its own cache length, step and output position, so rows need not be in
step: ``pipo_jax.decode.batching`` refills finished rows while the others run. ``Decoder``
compiles prefill and loop of a static batch, on a device mesh of any size or wherever the
inputs are.

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
from pipo_jax.errors import ConfigError, PromptError
from pipo_jax.io.tokenizer import Tokenizer
from pipo_jax.model.attention import CacheAttention
from pipo_jax.model.cache import DecodeCache, put_rows
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
    request. ``attention``: how steps attend to the cache (``blocked``: the filled blocks only).
    ``prefill_chunk``: prompts are consumed this many tokens at a time (even).
    ``speculative``: ``k`` drafts per round of the AR model's MTP drafter (0: plain AR; with
    ``k`` the spec is ``pipo_jax.decode.speculative``'s, and ``draft`` keeps the MTP cache).
    """

    cfg: ModelConfig
    pipo: bool
    sampling: SamplingParams
    budget: int
    pad_id: int
    eos_id: int
    draft: bool = False
    attention: CacheAttention = CacheAttention()
    prefill_chunk: int = 2048
    speculative: int = 0

    def __post_init__(self) -> None:
        if self.speculative and (self.pipo or not self.draft):
            raise ValueError("speculative decoding is the AR model's (pipo=False, draft=True)")
        if self.draft and not self.pipo and not self.speculative:
            raise ValueError("an AR DecodeSpec drafts only speculatively (draft=True needs "
                             "pipo=True or speculative=k)")
        if self.prefill_chunk <= 0 or self.prefill_chunk % 2:
            raise ValueError(f"prefill_chunk must be a positive even number of tokens, got "
                             f"{self.prefill_chunk}")

    @classmethod
    def of(cls, cfg: ModelConfig, pipo: bool, opts: DecodeConfig, tokenizer: Tokenizer,
           speculative: bool = False) -> DecodeSpec:
        """The spec of ``opts`` (a ``DecodeConfig``) for ``tokenizer``'s ids on ``cfg``; with
        ``speculative`` (AR only) the MTP-speculative decoder's, ``opts.speculative_k``
        drafts per round."""
        if opts.attention == "cudnn" and jax.default_backend() != "gpu":
            raise ConfigError(f"decode.attention 'cudnn' needs a GPU backend, this one is "
                              f"{jax.default_backend()!r}: use 'blocked' (or 'xla') here")
        sp = SamplingParams(opts.temperature, opts.top_k, opts.top_p, opts.presence_penalty,
                            vocab_limit(tokenizer, cfg.vocab_size))
        if speculative and (pipo or opts.presence_penalty):
            raise ConfigError("speculative decoding is the AR model's, without a presence "
                              "penalty (set decode.presence_penalty=0)")
        return cls(cfg, pipo, sp, opts.max_new_tokens, tokenizer.pad_id, tokenizer.eos_id,
                   draft=speculative or (pipo and opts.threshold < 1.0),
                   attention=CacheAttention(opts.attention, opts.kv_block),
                   prefill_chunk=opts.prefill_chunk,
                   speculative=opts.speculative_k if speculative else 0)

    @property
    def model(self) -> PipoLM:
        return PipoLM(self.cfg, self.pipo, cache_attention=self.attention,
                      drafter=bool(self.speculative))

    @property
    def chunk(self) -> int:
        """Prompt positions (PIPO: latents; AR: tokens) per prefill chunk."""
        return self.prefill_chunk // 2 if self.pipo else self.prefill_chunk

    @property
    def out_width(self) -> int:
        """Output slots per row: a pair per pass (PIPO) or a token per pass (AR; a speculative
        round may write up to ``k`` past the budget, masked)."""
        return 2 * self.budget if self.pipo else self.budget + self.speculative

    def slots(self, prompt_positions: int) -> int:
        """Cache slots for a prompt of ``prompt_positions`` latents (AR: tokens) and the budget
        (a pass per real token in the worst case; a speculative verify writes ``k`` past it),
        in whole attention blocks."""
        need = prompt_positions + self.budget + self.speculative
        block = self.attention.block
        return need if need <= block else -(-need // block) * block


@struct.dataclass
class DecodeState:
    cache: DecodeCache
    last: Array  # B × 2 (PIPO: the last emitted pair) or B × 1 (AR: the last token)
    positions: Array  # B int32: RoPE position of the next latent/token
    out: Array  # B × out_width int32, PAD where nothing (or a rejected draft) was emitted
    step: Array  # B int32: decode steps this row has done after its prefill
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


def _write_out(out_BxW: Array, values_BxN: Array, at_B: Array, active_B: Array) -> Array:
    """Each running row's ``values`` into its output at ``at``; finished rows keep theirs."""
    n = values_BxN.shape[1]
    current = jax.vmap(lambda o, i: jax.lax.dynamic_slice_in_dim(o, i, n))(out_BxW, at_B)
    return put_rows(out_BxW, jnp.where(active_B[:, None], values_BxN, current), at_B)


def _emit_pair(state: DecodeState, token1: Array, token2: Array,
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
    pair = jnp.stack([token1, token2], axis=1)
    out = _write_out(state.out, pair, 2 * state.step, active)
    n_tokens = n1 + committed
    done = state.done | (active & (t1_eos | (committed & (token2 == spec.eos_id))
                                   | (n_tokens >= spec.budget)))
    seen = mark_seen(mark_seen(state.seen, token1, active), token2, committed)
    return state.replace(
        out=out, done=done, n_tokens=n_tokens, seen=seen,
        n_drafts=state.n_drafts + (draft_ok if spec.draft else 0),
        n_commits=state.n_commits + committed,
        last=jnp.where(active[:, None], pair, state.last))


def _emit_token(state: DecodeState, token: Array, spec: DecodeSpec) -> DecodeState:
    active = ~state.done
    token = jnp.where(active, token, spec.pad_id)
    out = _write_out(state.out, token[:, None], state.step, active)
    n_tokens = state.n_tokens + active
    done = state.done | (active & ((token == spec.eos_id) | (n_tokens >= spec.budget)))
    return state.replace(out=out, done=done, n_tokens=n_tokens,
                         seen=mark_seen(state.seen, token, active),
                         last=jnp.where(active[:, None], token[:, None], state.last))


def _draft(spec: DecodeSpec, logits_BxV: Array, conf_logit_B: Array, keys_B: Array,
           seen_BxV: Array | None, step_B: Array, threshold: Array) -> Array:
    """The gated second token of a pair: sampled from the MTP logits, kept or PAD."""
    draft = sample(logits_BxV, keys_B, seen_BxV, spec.sampling, None, step_B, 1)
    return accept_pair(jax.nn.sigmoid(conf_logit_B), draft, threshold, spec.pad_id)


# ------------------------------------------------------------------------------------ decode


@struct.dataclass
class Prefilled:
    """A prompt batch consumed into the cache, before anything is sampled: what ``first_emit``
    needs, and what the samples of one prompt share (``pipo_jax.decode.batching``)."""

    cache: DecodeCache
    logits: Array  # B × V: the next token (PIPO: token1 of the first pair)
    h_last: Array  # B × H: the backbone state at the prompt's last position (PIPO's MTP input)
    positions: Array  # B int32: RoPE position of the next latent/token


def fill(params: Params, prompt_BxP: Array, valid_BxP: Array, *, spec: DecodeSpec,
         slots: int | None = None) -> Prefilled:
    """The left-padded prompt into a fresh cache of ``slots`` (default ``spec.slots``), chunk by
    chunk (``spec.chunk`` positions, one ``PipoLM.extend`` each, DeltaNet states carried).

    A prompt longer than one chunk is left-padded further to whole chunks, so activations and
    attention scores are bounded by the chunk, not the prompt. PIPO with drafts also runs the
    MTP layer over every prompt position (teacher-forced with the next pair's first token); the
    last position's, whose token1 is not sampled yet, is redone by ``first_emit``.
    """
    model, variables = spec.model, {"params": params}
    b, p = prompt_BxP.shape
    if spec.pipo and p % 2:
        raise ValueError(f"a PIPO prompt batch must have an even width, got {p}")
    width = p // 2 if spec.pipo else p
    chunk = min(spec.chunk, width)
    extra = -width % chunk
    tok_pad = 2 * extra if spec.pipo else extra
    prompt = jnp.pad(prompt_BxP, ((0, 0), (tok_pad, 0)), constant_values=spec.pad_id)
    valid = jnp.pad(valid_BxP, ((0, 0), (tok_pad, 0)))
    width += extra
    slots = spec.slots(width) if slots is None else slots
    if slots < width + 1:
        raise ValueError(f"{slots} cache slots cannot hold a prompt of {width} positions")
    real = valid[:, 0::2] if spec.pipo else valid
    dtype = jnp.dtype(spec.cfg.dtype)
    cache = DecodeCache.empty(spec.cfg, b, slots, spec.draft, dtype)
    cache = cache.replace(start=width - jnp.sum(real, axis=1, dtype=jnp.int32))
    # The MTP layer's token at each position: the first token of the next pair (PIPO) or the
    # next token (the AR drafter); the last one's is not known yet.
    tok1 = (jnp.pad(prompt[:, 2::2] if spec.pipo else prompt[:, 1:], ((0, 0), (0, 1)),
                    constant_values=spec.pad_id) if spec.draft else None)
    tokens_per_chunk = 2 * chunk if spec.pipo else chunk

    def one(i: Array | int, cache: DecodeCache) -> tuple[Array, DecodeCache]:
        tokens = jax.lax.dynamic_slice_in_dim(prompt, i * tokens_per_chunk, tokens_per_chunk, 1)
        t1 = None if tok1 is None else jax.lax.dynamic_slice_in_dim(tok1, i * chunk, chunk, 1)
        h, cache = model.apply(variables, tokens, cache, t1, method=PipoLM.extend)
        return h[:, -1], cache

    n_chunks = width // chunk
    if n_chunks == 1:
        h_last, cache = one(0, cache)
    else:
        h0 = jnp.zeros((b, spec.cfg.d_model), dtype)
        h_last, cache = jax.lax.fori_loop(
            0, n_chunks, lambda i, c: one(i, c[1]), (h0, cache))
    logits = model.apply(variables, h_last, method=PipoLM.logits)
    positions = width - cache.start
    return Prefilled(cache, logits, h_last, positions)


def first_emit(params: Params, pre: Prefilled, keys_B: Array, threshold: Array, *,
               spec: DecodeSpec) -> DecodeState:
    """The first output of a prefilled batch: one pair (PIPO) or token (AR), sampled with each
    row's own key, in a fresh ``DecodeState``.

    Unlike the reference implementation (which always emits PAD here), PIPO emits the
    prefill's drafted ``token2``, gated as at every decode step: the MTP layer redoes the
    prompt's last position with the sampled token1. ``threshold`` (a scalar or one per row) is
    read only by PIPO with drafts.
    """
    assert not spec.speculative, "a speculative spec decodes with pipo_jax.decode.speculative"
    model, sp, variables = spec.model, spec.sampling, {"params": params}
    b = pre.logits.shape[0]
    seen = jnp.zeros((b, spec.cfg.vocab_size), bool) if sp.presence_penalty else None
    zeros = jnp.zeros((b,), jnp.int32)
    token1 = sample(pre.logits, keys_B, seen, sp, spec.pad_id, zeros, 0)
    cache = pre.cache
    state = DecodeState(
        cache=cache, last=jnp.zeros((b, 2 if spec.pipo else 1), jnp.int32),
        positions=pre.positions,
        out=jnp.full((b, spec.out_width), spec.pad_id, jnp.int32),
        step=zeros, done=jnp.zeros((b,), bool), n_tokens=zeros, n_passes=zeros + 1,
        n_drafts=zeros, n_commits=zeros, seen=seen, keys=keys_B)
    if not spec.pipo:
        return _emit_token(state, token1, spec)
    token2 = jnp.full((b,), spec.pad_id, jnp.int32)
    if spec.draft:
        draft_logits, conf_logit, cache = model.apply(
            variables, pre.h_last, token1, pre.positions - 1, cache, cache.length - 1,
            method=PipoLM.step_mtp)
        seen1 = mark_seen(seen, token1, jnp.ones((b,), bool))
        token2 = _draft(spec, draft_logits, conf_logit, keys_B, seen1, zeros, threshold)
        state = state.replace(cache=cache)
    return _emit_pair(state, token1, token2, spec)


def prefill(params: Params, prompt_BxP: Array, valid_BxP: Array, keys_B: Array,
            threshold: Array, *, spec: DecodeSpec) -> DecodeState:
    """``fill`` then ``first_emit``: the prompt through the model, and the first output."""
    return first_emit(params, fill(params, prompt_BxP, valid_BxP, spec=spec), keys_B,
                      threshold, spec=spec)


def step(params: Params, state: DecodeState, threshold: Array, *,
         spec: DecodeSpec) -> DecodeState:
    """One decode step: one backbone pass emits one pair (PIPO, SPEC §6) or one token (AR)
    for every running row, each at its own cache length, position and step."""
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
    state = state.replace(cache=cache.next_slot(active), positions=state.positions + active,
                          step=state.step + active, n_passes=state.n_passes + active)
    if not spec.pipo:
        return _emit_token(state, token1, spec)
    return _emit_pair(state, token1, token2, spec)


def decode_loop(params: Params, state: DecodeState, threshold: Array, *,
                spec: DecodeSpec) -> DecodeState:
    """Steps until every row is done or has spent its budget (at most ``budget - 1`` steps)."""

    def body(carry: tuple[DecodeState, Array]) -> tuple[DecodeState, Array]:
        st, i = carry
        return step(params, st, threshold, spec=spec), i + 1

    def cond(carry: tuple[DecodeState, Array]) -> Array:
        st, i = carry
        return (i < spec.budget - 1) & ~jnp.all(st.done)

    return jax.lax.while_loop(cond, body, (state, jnp.int32(0)))[0]


def generate(params: Params, prompt_BxP: Array, valid_BxP: Array, keys_B: Array,
             threshold: Array, *, spec: DecodeSpec) -> DecodeState:
    """``prefill`` then ``decode_loop``: a whole request batch in one traced function."""
    state = prefill(params, prompt_BxP, valid_BxP, keys_B, threshold, spec=spec)
    return decode_loop(params, state, threshold, spec=spec)


# ------------------------------------------------------------------------------------ compile


def is_stacked(path: tuple[Any, ...]) -> bool:
    """Whether the ``DecodeState`` leaf at ``path`` is a backbone cache stacked over blocks,
    whose batch axis is the second (after ``n_blocks``), not the first."""
    return any(getattr(k, "name", None) == "layers" for k in path)


def decode_state_shardings(state: DecodeState, mesh: Mesh) -> DecodeState:
    """Shardings of a (possibly abstract) ``DecodeState`` on ``mesh``: every batch-major leaf
    split over the batch axes (the cache's stacked layers on their second axis, after
    ``n_blocks``), scalars replicated."""
    batch_axes = batch_sharding(mesh).spec[0]

    def one(path: tuple[Any, ...], leaf: Any) -> NamedSharding:
        if not leaf.shape:
            return replicated(mesh)
        return NamedSharding(mesh, PartitionSpec(None, batch_axes) if is_stacked(path)
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

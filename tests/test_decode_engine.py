"""The decode engine for real workloads (issue #15): attention over the filled cache only,
chunked prefill, continuous batching and shared prompts, each against the plain path it
accelerates."""

from __future__ import annotations

import dataclasses

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipo_jax.config import DecodeConfig, ModelConfig
from pipo_jax.decode import batching, engine
from pipo_jax.decode.sampling import SamplingParams, request_keys
from pipo_jax.errors import ConfigError
from pipo_jax.model import attention
from pipo_jax.model.attention import CacheAttention
from pipo_jax.model.cache import AttentionCache
from pipo_jax.model.pipo import PipoLM

PAD, EOS = 0, 1
BUDGET = 14
ATTN, HYBRID = helpers.DECODE_ATTN, helpers.DECODE_HYBRID
CONFIGS = {"attention": ATTN, "hybrid": HYBRID}


@pytest.fixture(scope="module")
def params():
    return {name: {pipo: helpers.random_params(cfg, pipo, seed=3 + pipo)
                   for pipo in (True, False)} for name, cfg in CONFIGS.items()}


# ------------------------------------------------------------------ filled-only attention


@pytest.mark.parametrize("c", [1, 5])
@pytest.mark.parametrize("block", [4, 8])
@pytest.mark.parametrize("stacked", [False, True])
def test_blocked_attention_equals_masked(c, block, stacked):
    """Random per-row fills (left padding: ``start > 0``; rows at different lengths; a chunk
    starting inside a row's left pad), GQA, a stacked (per-layer) cache or a plain one: the
    online-softmax block loop equals the masked softmax over every slot wherever a query has
    something to attend to."""
    rng = np.random.default_rng(c * 10 + block)
    b, s, k, g, d = 4, 24, 2, 3, 8
    q = jnp.asarray(rng.normal(size=(b, c, k, g, d)), jnp.float32)
    shape = (3, b, s, k, d) if stacked else (b, s, k, d)
    ck, cv = (jnp.asarray(rng.normal(size=shape), jnp.float32) for _ in range(2))
    layer = jnp.int32(1) if stacked else None
    start = jnp.asarray([0, 3, 9, 14], jnp.int32)
    length = jnp.asarray([5, 17, 12, 12], jnp.int32)  # row 3: the chunk begins in its pad
    got = attention.attend(q, ck, cv, layer, start, length, CacheAttention("blocked", block))
    want = attention.attend(q, ck, cv, layer, start, length, CacheAttention("masked"))
    slot = np.asarray(length)[:, None] + np.arange(c)[None]
    real = slot >= np.asarray(start)[:, None]
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5,
                               atol=1e-6)
    # A query with nothing to attend to gets zeros, not NaN.
    assert np.all(np.asarray(got)[~real] == 0)


@pytest.mark.parametrize("c", [1, 5])
def test_library_attention_equals_masked(c):
    """The library form (``jax.nn.dot_product_attention``, here its ``xla`` implementation;
    ``cudnn`` is the same call on a GPU) over a stacked cache with left pads, GQA and a chunk
    that begins inside a pad equals the masked reference, zeros where nothing is attended."""
    rng = np.random.default_rng(c)
    b, s, k, g, d = 4, 24, 2, 3, 8
    q = jnp.asarray(rng.normal(size=(b, c, k, g, d)), jnp.float32)
    ck, cv = (jnp.asarray(rng.normal(size=(3, b, s, k, d)), jnp.float32) for _ in range(2))
    start = jnp.asarray([0, 3, 9, 14], jnp.int32)
    length = jnp.asarray([5, 17, 12, 12], jnp.int32)
    got = attention.attend(q, ck, cv, jnp.int32(2), start, length, CacheAttention("xla"))
    want = attention.attend(q, ck, cv, jnp.int32(2), start, length, CacheAttention("masked"))
    real = (np.asarray(length)[:, None] + np.arange(c)[None]) >= np.asarray(start)[:, None]
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5,
                               atol=1e-6)
    assert np.all(np.asarray(got)[~real] == 0)


def test_cudnn_attention_is_refused_off_gpu():
    """``decode.attention=cudnn`` on a CPU (or TPU) backend is a one-line config error before
    any compile, naming the portable choice."""
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU backend runs cudnn")
    with pytest.raises(ConfigError, match="needs a GPU backend.*use 'blocked'"):
        engine.DecodeSpec.of(ATTN, True, DecodeConfig(attention="cudnn"), None)


def test_blocked_attention_ignores_slots_past_the_fill():
    """Whatever lies in slots past a row's new positions (stale rows of a finished request,
    other rows' longer fills) changes nothing, bit for bit: cost and result follow the fill."""
    rng = np.random.default_rng(0)
    b, s, k, g, d = 2, 32, 2, 2, 8
    q = jnp.asarray(rng.normal(size=(b, 1, k, g, d)), jnp.float32)
    ck, cv = (rng.normal(size=(b, s, k, d)).astype(np.float32) for _ in range(2))
    start, length = jnp.asarray([0, 0]), jnp.asarray([6, 29])
    spec = CacheAttention("blocked", 4)
    a = attention.attend(q, jnp.asarray(ck), jnp.asarray(cv), None, start, length, spec)
    ck[0, 7:], cv[0, 7:] = 1e3, -1e3
    b_ = attention.attend(q, jnp.asarray(ck), jnp.asarray(cv), None, start, length, spec)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b_))


def test_blocked_attention_needs_whole_blocks():
    z = jnp.zeros((1, 1, 1, 1, 4))
    cache = jnp.zeros((1, 10, 1, 4))
    with pytest.raises(ValueError, match="multiple of the attention block"):
        attention.attend(z, cache, cache, None, jnp.zeros(1, int), jnp.ones(1, int),
                         CacheAttention("blocked", 4))


# ------------------------------------------------------------------------ chunked prefill


def _prompt_batch(pipo: bool, lengths: tuple[int, ...], seed: int = 0):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(2, 40, size=n)) for n in lengths]
    return engine.prepare_prompts(prompts, pipo, PAD, 2, BUDGET, 96)


def _spec(cfg: ModelConfig, pipo: bool, chunk: int = 2048, impl: str = "blocked",
          block: int = 8, sampling: SamplingParams | None = None,
          budget: int = BUDGET) -> engine.DecodeSpec:
    return engine.DecodeSpec(cfg, pipo, sampling or SamplingParams(), budget, PAD, EOS, draft=pipo,
                             attention=CacheAttention(impl, block), prefill_chunk=chunk)


@pytest.mark.parametrize("name,pipo,chunk", [("hybrid", True, 4), ("hybrid", False, 6),
                                             ("attention", True, 6), ("attention", False, 8)])
def test_chunked_prefill_equals_one_shot(params, name, pipo, chunk):
    """``engine.fill`` chunk by chunk (DeltaNet states carried, the MTP layer chunked too)
    equals the one-shot ``PipoLM.prefill`` (+ ``prefill_mtp``): logits, the last hidden
    state, every filled key/value row and the DeltaNet states; rows left-padded, chunk
    boundaries inside a row's padding, inside its prompt and at its edges."""
    cfg, p = CONFIGS[name], params[name][pipo]
    tokens, valid = _prompt_batch(pipo, (19, 11))
    spec = _spec(cfg, pipo, chunk)
    pre = jax.jit(lambda p, t, v: engine.fill(p, t, v, spec=spec))(p, tokens, valid)
    model = PipoLM(cfg, pipo)
    width = pre.cache.length[0]
    extra = int(width) - (tokens.shape[1] // 2 if pipo else tokens.shape[1])
    tp = 2 * extra if pipo else extra
    t_full = np.pad(tokens, ((0, 0), (tp, 0)), constant_values=PAD)
    v_full = np.pad(valid, ((0, 0), (tp, 0)))
    logits, h_all, cache, pos = model.apply({"params": p}, t_full, v_full,
                                            pre.cache.slots, pipo, method=PipoLM.prefill)
    tol = dict(rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(pre.logits, logits, **tol)
    np.testing.assert_allclose(pre.h_last, h_all[:, -1], **tol)
    np.testing.assert_array_equal(pre.positions, pos)
    np.testing.assert_array_equal(pre.cache.start, cache.start)
    np.testing.assert_array_equal(pre.cache.length, cache.length)
    filled = (np.arange(pre.cache.slots)[None] >= np.asarray(cache.start)[:, None]) & \
             (np.arange(pre.cache.slots)[None] < np.asarray(cache.length)[:, None])
    for got, want in zip(jax.tree.leaves(pre.cache.layers), jax.tree.leaves(cache.layers),
                         strict=True):
        if got.ndim == 5 and got.shape[2] == pre.cache.slots:  # n_blocks × B × S × K × D
            np.testing.assert_allclose(np.asarray(got)[:, filled], np.asarray(want)[:, filled],
                                       **tol)
        else:  # DeltaNet conv window and recurrent state
            np.testing.assert_allclose(got, want, **tol)
    if pipo:
        tok1 = np.pad(t_full[:, 2::2], ((0, 0), (0, 1)), constant_values=PAD)
        _, _, cache = model.apply({"params": p}, h_all, tok1, v_full, cache,
                                  method=PipoLM.prefill_mtp)
        for got, want in zip((pre.cache.mtp.k, pre.cache.mtp.v), (cache.mtp.k, cache.mtp.v),
                             strict=True):
            np.testing.assert_allclose(np.asarray(got)[filled], np.asarray(want)[filled], **tol)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("pipo", [True, False])
def test_engine_blocked_chunked_equals_masked_one_shot(params, name, pipo):
    """The whole decode (prefill, draft gating, every step) with blocked attention and a
    chunked prefill gives the tokens and stats of the masked, one-shot reference."""
    cfg, p = CONFIGS[name], params[name][pipo]
    tokens, valid = _prompt_batch(pipo, (17, 6, 12))
    keys, thr = request_keys([0, 1, 2]), jnp.float32(0.5)
    outs = []
    specs = [_spec(cfg, pipo, 6, "blocked", 4), _spec(cfg, pipo, 2048, "masked")]
    if name == "attention" and pipo:  # the library kernel, through the same whole decode
        specs.append(_spec(cfg, pipo, 6, "xla", 4))
    for spec in specs:
        state = jax.jit(lambda p, *a, s=spec: engine.generate(p, *a, spec=s))(
            p, tokens, valid, keys, thr)
        outs.append(jax.device_get(state))
    a = outs[0]
    for b in outs[1:]:
        np.testing.assert_array_equal(a.out, b.out)
        for f in batching.STAT_FIELDS:
            np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    if pipo:
        assert 0 < int(a.n_commits.sum()) < int(a.n_drafts.sum())  # both gate branches ran


# --------------------------------------------------------------------- continuous batching


def _solo(decoder, p, prompt, seed):
    return decoder.run(p, [prompt], [seed], 0.5, bucket=16, max_context=96)[0]


def _same(a: batching.RowResult, b: batching.RowResult) -> None:
    np.testing.assert_array_equal(a.out, b.out)
    assert [getattr(a, f) for f in batching.STAT_FIELDS] == \
           [getattr(b, f) for f in batching.STAT_FIELDS]


@pytest.mark.parametrize("pipo", [True, False])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_continuous_batching_gives_each_request_its_solo_output(params, pipo, temperature):
    """Eight requests of mixed lengths (EOS can end them early) through 3 slots, with a prompt
    repeated (its samples share one prefill): each request's output and counts equal that
    request decoded alone, greedy and sampled with its own seed."""
    cfg, p = HYBRID, params["hybrid"][pipo]
    sp = SamplingParams(temperature=temperature)
    # A likely EOS (a common token) so that rows end at different steps.
    decoder = batching.ContinuousDecoder(
        dataclasses.replace(_spec(cfg, pipo, 6, sampling=sp), eos_id=7), slots=3, sync_steps=3)
    rng = np.random.default_rng(1)
    prompts = [list(rng.integers(2, 40, size=n)) for n in (9, 4, 15, 7, 12, 5)]
    prompts = [prompts[0], prompts[0], *prompts[1:4], prompts[0], *prompts[4:]]
    seeds = [11, 12, 13, 14, 15, 16, 17, 18]
    finished = []
    got = decoder.run(p, prompts, seeds, 0.5, bucket=16, max_context=96,
                      on_done=lambda i, r: finished.append(i))
    assert sorted(finished) == list(range(8))
    for i, (prompt, seed) in enumerate(zip(prompts, seeds, strict=True)):
        _same(got[i], _solo(decoder, p, prompt, seed))
    lengths = {r.n_tokens for r in got}
    assert len(lengths) > 1, "rows should end at different lengths"
    if temperature > 0:  # the shared prompt's samples differ by their seeds
        assert not np.array_equal(got[0].out, got[1].out)


def test_continuous_batching_matches_static_batching(params):
    """Greedy: continuous batching (1 slot, 2 slots) yields the static batch's tokens."""
    cfg, p = ATTN, params["attention"][True]
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(2, 40, size=n)) for n in (9, 4, 12)]
    spec = _spec(cfg, True, 2048)
    tokens, valid = engine.prepare_prompts(prompts, True, PAD, 2, BUDGET, 96)
    static = jax.device_get(jax.jit(lambda p, *a: engine.generate(p, *a, spec=spec))(
        p, tokens, valid, request_keys([0, 1, 2]), jnp.float32(0.5)))
    for slots in (1, 2):
        got = batching.ContinuousDecoder(spec, slots).run(p, prompts, [0, 1, 2], 0.5, bucket=16,
                                                          max_context=96)
        for i, r in enumerate(got):
            real = [t for t in r.out if t != PAD]
            assert real == [t for t in static.out[i] if t != PAD]
            assert r.n_passes == static.n_passes[i]


def test_bad_requests_are_refused_alone(params):
    """An empty request and one longer than the context are refused with a one-line error;
    the rest of the queue completes as if they were not there."""
    cfg, p = ATTN, params["attention"][True]
    decoder = batching.ContinuousDecoder(_spec(cfg, True), slots=2)
    good = [5, 6, 7, 8, 9]
    got = decoder.run(p, [good, [], list(range(2, 90)), good], [0, 1, 2, 3], 0.5, bucket=16,
                      max_context=96)
    assert got[1].error and "empty" in got[1].error and "\n" not in got[1].error
    assert got[2].error and "exceeds the model's context" in got[2].error
    assert got[0].error is None and got[3].error is None
    _same(got[0], _solo(decoder, p, good, 0))
    _same(got[3], _solo(decoder, p, good, 3))


def test_insert_and_take_row_round_trip(params):
    """A one-row state written into a slot reads back unchanged, other slots untouched."""
    cfg, p = HYBRID, params["hybrid"][True]
    spec = _spec(cfg, True)
    tokens, valid = _prompt_batch(True, (9,))
    row = jax.jit(lambda p, t, v: engine.prefill(p, t, v, request_keys([4]), jnp.float32(0.5),
                                                 spec=spec))(p, tokens, valid)
    state = batching.empty_state(jax.eval_shape(lambda r: r, row), 3)
    state = batching.insert_row(state, row, jnp.int32(1))
    chex.assert_trees_all_equal(batching.take_row(state, 1), batching.take_row(row, 0))
    assert list(np.asarray(state.done)) == [True, False, True]
    released = batching.release_row(state, jnp.int32(1))
    assert int(released.cache.length[1]) == 0 and bool(released.done[1])
    assert isinstance(state.cache.mtp, AttentionCache)

"""``pipo_jax.decode.sampling.sample`` (SPEC §6): greedy, temperature, top-k, top-p, presence
penalty, forbidden token, per-request reproducible keys; and per-request reproducibility through
the decoder."""

from __future__ import annotations

import functools

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipo_jax.config import ModelConfig
from pipo_jax.decode import engine as dec
from pipo_jax.decode import sampling

V = 12
N_DRAWS = 4000

_sample = jax.jit(sampling.sample, static_argnames=("sp", "forbid"))


def _draw(logits_v, sp, forbid=None, seen_v=None, n=N_DRAWS, seed=0) -> np.ndarray:
    """``n`` samples of one logits row, each with its own request key."""
    logits = jnp.broadcast_to(jnp.asarray(logits_v, jnp.float32), (n, len(logits_v)))
    seen = jnp.zeros((n, len(logits_v)), bool) if seen_v is None else \
        jnp.broadcast_to(jnp.asarray(seen_v), (n, len(logits_v)))
    keys = sampling.request_keys(np.arange(n) + seed * n)
    out = _sample(logits, keys, seen, sp, forbid)
    chex.assert_shape(out, (n,))
    chex.assert_type(out, jnp.int32)
    return np.asarray(out)


def _random_logits(seed, b=16):
    return np.random.default_rng(seed).normal(size=(b, V)).astype(np.float32) * 2


def test_greedy_is_argmax():
    logits = _random_logits(0)
    keys = sampling.request_keys(range(len(logits)))
    seen = jnp.zeros(logits.shape, bool)
    got = _sample(jnp.asarray(logits), keys, seen, sampling.SamplingParams(), None)
    np.testing.assert_array_equal(got, logits.argmax(-1))


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0])
def test_top_k_one_is_argmax_at_any_temperature(temperature):
    logits = _random_logits(1)
    sp = sampling.SamplingParams(temperature=temperature, top_k=1)
    for seed in range(3):
        keys = sampling.request_keys(np.arange(len(logits)) + 100 * seed)
        got = _sample(jnp.asarray(logits), keys, jnp.zeros(logits.shape, bool), sp, None)
        np.testing.assert_array_equal(got, logits.argmax(-1))


def test_temperature_sampling_matches_softmax_frequencies():
    logits = np.log(np.array([0.4, 0.3, 0.2, 0.1] + [1e-9] * (V - 4), np.float32))
    draws = _draw(logits, sampling.SamplingParams(temperature=1.0))
    freq = np.bincount(draws, minlength=V) / N_DRAWS
    np.testing.assert_allclose(freq[:4], [0.4, 0.3, 0.2, 0.1], atol=0.03)
    # Temperature 0.5 squares and renormalises the probabilities.
    draws = _draw(logits, sampling.SamplingParams(temperature=0.5), seed=1)
    p = np.array([0.4, 0.3, 0.2, 0.1]) ** 2
    np.testing.assert_allclose(np.bincount(draws, minlength=V)[:4] / N_DRAWS, p / p.sum(),
                               atol=0.03)


def test_top_k_restricts_support():
    logits = np.random.default_rng(2).normal(size=V).astype(np.float32) * 0.5
    top3 = set(np.argsort(-logits)[:3].tolist())
    draws = _draw(logits, sampling.SamplingParams(temperature=1.0, top_k=3))
    assert set(draws.tolist()) == top3
    # Renormalised over the top 3.
    p = np.exp(logits[sorted(top3)])
    freq = np.bincount(draws, minlength=V)[sorted(top3)] / N_DRAWS
    np.testing.assert_allclose(freq, p / p.sum(), atol=0.03)
    # Without top_k every token shows up.
    assert len(set(_draw(logits, sampling.SamplingParams(temperature=1.0)).tolist())) == V


# probs 0.5, 0.2, 0.15, 0.1, 0.05 on shuffled ids; the rest (if any) get ~0.
_PROBS = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
_IDS = np.array([7, 2, 9, 0, 4])


@pytest.mark.parametrize(("top_p", "n_keep"), [(0.45, 1), (0.69, 2), (0.71, 3), (0.9, 4),
                                               (1.0, 5)])
def test_top_p_keeps_smallest_nucleus(top_p, n_keep):
    logits = np.full(V, -1e9, np.float32)
    logits[_IDS] = np.log(_PROBS)
    draws = _draw(logits, sampling.SamplingParams(temperature=1.0, top_p=top_p))
    assert set(draws.tolist()) == set(_IDS[:n_keep].tolist())
    kept = _PROBS[:n_keep] / _PROBS[:n_keep].sum()
    np.testing.assert_allclose(np.bincount(draws, minlength=V)[_IDS[:n_keep]] / N_DRAWS, kept,
                               atol=0.03)


def test_presence_penalty_subtracts_from_seen_tokens():
    logits = _random_logits(3, b=64)
    seen = np.random.default_rng(4).random(logits.shape) < 0.4
    keys = sampling.request_keys(range(len(logits)))
    for pen in (0.5, 1.5, 4.0):
        sp = sampling.SamplingParams(presence_penalty=pen)
        got = _sample(jnp.asarray(logits), keys, jnp.asarray(seen), sp, None)
        want = (logits - pen * seen).argmax(-1)
        np.testing.assert_array_equal(got, want)
        assert (want != logits.argmax(-1)).any()  # the penalty mattered for some rows
    # Sampled: a seen token loses exactly exp(-penalty) of its odds.
    two = np.array([0.0, 0.0] + [-1e9] * (V - 2), np.float32)
    seen_v = np.zeros(V, bool)
    seen_v[0] = True
    draws = _draw(two, sampling.SamplingParams(temperature=1.0, presence_penalty=1.0),
                  seen_v=seen_v)
    np.testing.assert_allclose((draws == 0).mean(), 1 / (1 + np.e), atol=0.03)


@pytest.mark.parametrize("sp", [sampling.SamplingParams(), sampling.SamplingParams(temperature=1.0),
                                sampling.SamplingParams(temperature=2.0, top_k=1),
                                sampling.SamplingParams(temperature=1.0, top_k=2),
                                sampling.SamplingParams(temperature=1.0, top_p=0.3)])
def test_forbidden_token_never_drawn(sp):
    logits = np.zeros(V, np.float32)
    logits[5] = 20.0  # the forbidden token would win almost surely
    logits[3] = 3.0  # p = 0.67 among the rest: alone in a 0.3 nucleus
    draws = _draw(logits, sp, forbid=5)
    assert not (draws == 5).any()
    if sp.temperature == 0 or sp.top_k == 1 or sp.top_p < 1:
        assert (draws == 3).all()
    assert (_draw(logits, sp, n=8) == 5).all()  # non-vacuous: without forbid it wins


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_ids_past_the_vocab_limit_are_never_drawn(temperature):
    """The embedding's padding rows (ids past the tokenizer's vocabulary) are never sampled."""
    logits = np.zeros(V, np.float32)
    logits[V - 2:] = 20.0  # padding rows would win almost surely
    logits[3] = 2.0
    sp = sampling.SamplingParams(temperature=temperature, vocab_limit=V - 2)
    draws = _draw(logits, sp)
    assert (draws < V - 2).all()
    if temperature == 0:
        assert (draws == 3).all()
    assert (_draw(logits, sampling.SamplingParams(temperature=temperature), n=8) >= V - 2).all()


def test_request_keys_reproducible_regardless_of_batch():
    """A request's sample depends on its seed alone, not on its batch position or batch-mates."""
    rng = np.random.default_rng(5)
    row = rng.normal(size=V).astype(np.float32) * 0.3  # near-flat: the key decides
    sp = sampling.SamplingParams(temperature=1.0)
    alone = {s: int(_sample(jnp.asarray(row[None]), sampling.request_keys([s]),
                            jnp.zeros((1, V), bool), sp, None)[0]) for s in range(40)}
    assert len(set(alone.values())) > 5  # different seeds really give different samples
    for trial in range(3):
        seeds = rng.permutation(40)[:8]
        mates = rng.normal(size=(8, V)).astype(np.float32)
        mates[trial] = row  # our request sits at a different position each trial
        got = _sample(jnp.asarray(mates), sampling.request_keys(seeds), jnp.zeros((8, V), bool), sp,
                      None)
        assert int(got[trial]) == alone[int(seeds[trial])]
    # Same seeds twice → identical samples.
    keys = sampling.request_keys([3, 3, 9])
    logits = jnp.broadcast_to(jnp.asarray(row), (3, V))
    a = _sample(logits, keys, jnp.zeros((3, V), bool), sp, None)
    b = _sample(logits, sampling.request_keys([3, 3, 9]), jnp.zeros((3, V), bool), sp, None)
    np.testing.assert_array_equal(a, b)
    assert a[0] == a[1]


# ------------------------------------------------------------------ through the whole decoder

PAD = 0
CFG = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  mlp_dim=64, max_context=64)


def _random_params(seed: int) -> dict:
    return helpers.random_params(CFG, True, seed, std=0.1)


@functools.lru_cache(maxsize=1)
def _decode_fns():
    sp = sampling.SamplingParams(temperature=1.0, top_p=0.95, top_k=20, presence_penalty=1.5)
    decoder = dec.Decoder(dec.DecodeSpec(CFG, True, sp, 10, PAD, CFG.vocab_size, draft=True))
    return decoder.prefill, decoder.loop


def _sampled_decode(params, prompts, seeds):
    prefill, loop = _decode_fns()
    tokens, valid = dec.prepare_prompts(prompts, True, PAD, 2, 10, CFG.max_context)
    thr = jnp.float32(0.5)
    state = prefill(params, tokens, valid, sampling.request_keys(seeds), thr)
    return np.asarray(loop(params, state, thr).out)


def test_decoder_sampling_is_per_request_reproducible():
    """Swapping two requests (prompt and seed together) in a sampled batch swaps their outputs;
    a different seed gives a different output."""
    params = _random_params(0)
    prompts = [[5, 6, 7, 8], [9, 10, 11, 12]]  # same length: no left-padding difference
    a = _sampled_decode(params, prompts, [21, 22])
    b = _sampled_decode(params, prompts[::-1], [22, 21])
    np.testing.assert_array_equal(a, b[::-1])
    c = _sampled_decode(params, prompts, [21, 23])
    np.testing.assert_array_equal(a[0], c[0])
    assert (a[1] != c[1]).any()

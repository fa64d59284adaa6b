"""SPEC §6 invariant: incremental decode with forced tokens equals the teacher-forced forward.

Checked in float32 for the backbone, MTP and confidence logits (PIPO, pairs with and without PAD)
and for the AR baseline, on a randomly initialised micro model with every PIPO module non-trivial.
Every step function is jitted once per module (eager flax applies are very slow on CPU).
"""

import functools

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipo_jax import decoding as dec
from pipo_jax.config import ModelConfig
from pipo_jax.model import PipoLM

PAD = 0
CFG = ModelConfig(vocab_size=40, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                  mlp_dim=64, max_context=64, compressor_init="random", init_std=0.2)


def _random_params(pipo, seed):
    """Random parameters, norm scales and biases included, so no module is the identity."""
    return helpers.random_params(CFG, pipo, seed, std=CFG.init_std)


@pytest.fixture(scope="module")
def params():
    return {pipo: _random_params(pipo, seed) for seed, pipo in enumerate((True, False))}


# Jitted step functions (one compilation per shape for the whole module).
_forward = {pipo: jax.jit(lambda p, t, pipo=pipo: PipoLM(CFG, pipo).apply({"params": p}, t))
            for pipo in (True, False)}
_logits = jax.jit(functools.partial(dec.lm_logits, CFG))
_embed = jax.jit(functools.partial(dec.embed, CFG))
_compress = jax.jit(lambda p, x: dec.compress(CFG, p, x))
_prefill_backbone = jax.jit(functools.partial(dec.prefill_backbone, CFG),
                            static_argnames=("slots", "pipo"))
_prefill_mtp = jax.jit(functools.partial(dec.prefill_mtp, CFG))
_backbone_step = jax.jit(functools.partial(dec.backbone_step, CFG))
_mtp_step = jax.jit(functools.partial(dec.mtp_step, CFG))
_advance = jax.jit(dec.advance)


def _tokens(with_pad: bool, left_pad: int = 0):
    rng = np.random.default_rng(3)
    t = rng.integers(1, CFG.vocab_size, size=24).astype(np.int32)
    if with_pad:
        t[[7, 11, 13, 19]] = PAD  # odd positions only: rejected drafts / parity PADs
    return t


@pytest.mark.parametrize("with_pad", [False, True])
@pytest.mark.parametrize("left_pad", [0, 4])
def test_pipo_forced_decode_matches_teacher_forced(params, with_pad, left_pad):
    p = params[True]
    t = _tokens(with_pad)
    ref = _forward[True](p, jnp.asarray(t)[None])
    ref_bb = np.asarray(_logits(p, ref["h"]))[0]
    ref_mtp = np.asarray(_logits(p, ref["m"]))[0]
    ref_conf = np.asarray(ref["conf_logits"])[0]

    prompt_len = 8  # 4 prompt latents; the rest is decoded pair by pair with forced tokens
    prompt = np.concatenate([np.full(left_pad, PAD, np.int32), t[:prompt_len]])[None]
    valid = np.concatenate([np.zeros(left_pad, bool), np.ones(prompt_len, bool)])[None]
    latents = _compress(p, jnp.asarray(prompt))
    lv = jnp.asarray(valid[:, 0::2])
    h_all, cache, pos = _prefill_backbone(p, latents, lv, slots=32, pipo=True)
    l0 = prompt_len // 2
    tok1_seq = jnp.concatenate([prompt[:, 2::2], t[None, prompt_len:prompt_len + 1]], axis=1)
    m_last, conf, cache = _prefill_mtp(p, cache, h_all, tok1_seq, lv)
    tol = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_logits(p, h_all[0, left_pad // 2:]), ref_bb[:l0], **tol)
    np.testing.assert_allclose(_logits(p, m_last)[0], ref_mtp[l0 - 1], **tol)
    np.testing.assert_allclose(conf[0], ref_conf[l0 - 1], **tol)
    for i in range(l0, len(t) // 2 - 1):
        pair = jnp.asarray(t[None, 2 * i: 2 * i + 2])
        latent = _compress(p, pair)
        h, cache = _backbone_step(p, cache, latent, pos)
        m, conf, cache = _mtp_step(p, cache, h, jnp.asarray(t[None, 2 * i + 2]), pos)
        cache = _advance(cache, jnp.ones((1,), bool))
        pos = pos + 1
        np.testing.assert_allclose(_logits(p, h)[0], ref_bb[i], **tol)
        np.testing.assert_allclose(_logits(p, m)[0], ref_mtp[i], **tol)
        np.testing.assert_allclose(conf[0], ref_conf[i], **tol)


@pytest.mark.parametrize("left_pad", [0, 3])
def test_ar_forced_decode_matches_teacher_forced(params, left_pad):
    p = params[False]
    t = _tokens(False)
    ref = np.asarray(_logits(p, _forward[False](p, jnp.asarray(t)[None])["h"]))[0]
    prompt_len = 5
    prompt = np.concatenate([np.full(left_pad, PAD, np.int32), t[:prompt_len]])[None]
    valid = np.concatenate([np.zeros(left_pad, bool), np.ones(prompt_len, bool)])[None]
    x = _embed(p, jnp.asarray(prompt))
    h_all, cache, pos = _prefill_backbone(p, x, jnp.asarray(valid), slots=40, pipo=False)
    tol = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(_logits(p, h_all[0, left_pad:]), ref[:prompt_len], **tol)
    for j in range(prompt_len, len(t) - 1):
        h, cache = _backbone_step(p, cache, _embed(p, jnp.asarray(t[None, j:j + 1])), pos)
        cache = _advance(cache, jnp.ones((1,), bool))
        pos = pos + 1
        np.testing.assert_allclose(_logits(p, h)[0], ref[j], **tol)

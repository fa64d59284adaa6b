"""SPEC §6 invariant: incremental decode with forced tokens equals the teacher-forced forward.

Checked in float32 for the backbone, MTP and confidence logits (PIPO, pairs with and without PAD)
and for the AR baseline, on a randomly initialised micro model with every PIPO module non-trivial.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from pipo_jax import decoding as dec
from pipo_jax.config import ModelConfig
from pipo_jax.model import PipoLM, init_params

PAD = 0
CFG = ModelConfig(vocab_size=40, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                  mlp_dim=64, max_context=64, compressor_init="random", init_std=0.2)


def _perturb(params, key):
    """Random norm scales too, so that no module is the identity by accident."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in
                                     zip(leaves, keys)])


@pytest.fixture(scope="module")
def params():
    return {pipo: _perturb(nn.unbox(init_params(CFG, pipo, jax.random.key(0))), jax.random.key(1))
            for pipo in (True, False)}


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
    model = PipoLM(CFG, True)
    ref = model.apply({"params": p}, jnp.asarray(t)[None])
    ref_bb = np.asarray(model.apply({"params": p}, ref["h"], method=PipoLM.logits))[0]
    ref_mtp = np.asarray(model.apply({"params": p}, ref["m"], method=PipoLM.logits))[0]
    ref_conf = np.asarray(ref["conf_logits"])[0]

    prompt_len = 8  # 4 prompt latents; the rest is decoded pair by pair with forced tokens
    prompt = np.concatenate([np.full(left_pad, PAD, np.int32), t[:prompt_len]])[None]
    valid = np.concatenate([np.zeros(left_pad, bool), np.ones(prompt_len, bool)])[None]
    latents = dec._apply(CFG, p, lambda m, x: m.compress(x), jnp.asarray(prompt))
    lv = jnp.asarray(valid[:, 0::2])
    h_all, cache, pos = dec.prefill_backbone(CFG, p, latents, lv, 32, True)
    l0 = prompt_len // 2
    tok1_seq = jnp.concatenate([prompt[:, 2::2], t[None, prompt_len:prompt_len + 1]], axis=1)
    m_last, conf, cache = dec.prefill_mtp(CFG, p, cache, h_all, tok1_seq, lv)
    tol = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dec.lm_logits(CFG, p, h_all[0, left_pad // 2:]), ref_bb[:l0], **tol)
    np.testing.assert_allclose(dec.lm_logits(CFG, p, m_last)[0], ref_mtp[l0 - 1], **tol)
    np.testing.assert_allclose(conf[0], ref_conf[l0 - 1], **tol)
    for i in range(l0, len(t) // 2 - 1):
        pair = jnp.asarray(t[None, 2 * i: 2 * i + 2])
        latent = dec._apply(CFG, p, lambda m, x: m.compress(x), pair)
        h, cache = dec.backbone_step(CFG, p, cache, latent, pos)
        m, conf, cache = dec.mtp_step(CFG, p, cache, h, jnp.asarray(t[None, 2 * i + 2]), pos)
        cache = dec.advance(cache, jnp.ones((1,), bool))
        pos = pos + 1
        np.testing.assert_allclose(dec.lm_logits(CFG, p, h)[0], ref_bb[i], **tol)
        np.testing.assert_allclose(dec.lm_logits(CFG, p, m)[0], ref_mtp[i], **tol)
        np.testing.assert_allclose(conf[0], ref_conf[i], **tol)


@pytest.mark.parametrize("left_pad", [0, 3])
def test_ar_forced_decode_matches_teacher_forced(params, left_pad):
    p = params[False]
    t = _tokens(False)
    model = PipoLM(CFG, False)
    ref = np.asarray(model.apply({"params": p}, model.apply({"params": p}, jnp.asarray(t)[None])["h"],
                                 method=PipoLM.logits))[0]
    prompt_len = 5
    prompt = np.concatenate([np.full(left_pad, PAD, np.int32), t[:prompt_len]])[None]
    valid = np.concatenate([np.zeros(left_pad, bool), np.ones(prompt_len, bool)])[None]
    x = dec.embed(CFG, p, jnp.asarray(prompt))
    h_all, cache, pos = dec.prefill_backbone(CFG, p, x, jnp.asarray(valid), 40, False)
    tol = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dec.lm_logits(CFG, p, h_all[0, left_pad:]), ref[:prompt_len], **tol)
    for j in range(prompt_len, len(t) - 1):
        h, cache = dec.backbone_step(CFG, p, cache, dec.embed(CFG, p, jnp.asarray(t[None, j:j + 1])),
                                     pos)
        cache = dec.advance(cache, jnp.ones((1,), bool))
        pos = pos + 1
        np.testing.assert_allclose(dec.lm_logits(CFG, p, h)[0], ref[j], **tol)

"""SPEC §6 invariant: incremental decode with forced tokens equals the teacher-forced forward.

Checked in float32 for the backbone, MTP and confidence logits (PIPO, pairs with and without PAD)
and for the AR baseline, on randomly initialised micro models with every PIPO module non-trivial:
a Qwen3-style all-attention stack and a Qwen3.5-style hybrid (Gated DeltaNet prefill in the
chunked form, decode in the recurrent form).
Every step function is jitted once per module (eager flax applies are very slow on CPU).
"""

import functools

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipo_jax.config import ModelConfig
from pipo_jax.model.pipo import PipoLM

PAD = 0
CONFIGS = {
    # Qwen3-style: all full attention, plain norms, tied head.
    "qwen3": ModelConfig(vocab_size=40, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2,
                         head_dim=8, mlp_dim=64, max_context=64, compressor_init="random",
                         init_std=0.2),
    # Qwen3.5-style hybrid: DeltaNet + gated attention, (1 + w) norms, partial RoPE, untied
    # head, and a DeltaNet chunk of 4 so that the 12-latent prefill spans several chunks.
    "qwen3_5": ModelConfig(vocab_size=40, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2,
                           head_dim=8, mlp_dim=64, max_context=64, compressor_init="random",
                           init_std=0.2, family="qwen3_5",
                           layer_types=("linear_attention", "full_attention") * 2,
                           partial_rotary_factor=0.5, tie_embeddings=False,
                           linear_n_key_heads=2, linear_n_value_heads=4, linear_key_head_dim=8,
                           linear_value_head_dim=4, linear_chunk=4),
}


class _Model:
    """Random parameters (norm scales and biases included, so no module is the identity) and
    the jitted step functions of one config (one compilation per shape)."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.params = {pipo: helpers.random_params(cfg, pipo, seed, std=cfg.init_std)
                       for seed, pipo in enumerate((True, False))}
        self.forward = {pipo: jax.jit(lambda p, t, pipo=pipo: PipoLM(cfg, pipo).apply(
            {"params": p}, t)) for pipo in (True, False)}
        self.logits = jax.jit(lambda p, h: PipoLM(cfg, False).apply(
            {"params": p}, h, method=PipoLM.logits))
        # The model's own decode methods, as the decoder calls them.
        self.prefill = {pipo: jax.jit(functools.partial(_method, cfg, pipo, PipoLM.prefill),
                                      static_argnums=(3, 4)) for pipo in (True, False)}
        self.step = {pipo: jax.jit(functools.partial(_method, cfg, pipo, PipoLM.step))
                     for pipo in (True, False)}
        self.prefill_mtp = jax.jit(functools.partial(_method, cfg, True, PipoLM.prefill_mtp))
        self.step_mtp = jax.jit(functools.partial(_method, cfg, True, PipoLM.step_mtp))
        self.next_slot = jax.jit(lambda cache, active: cache.next_slot(active))


def _method(cfg: ModelConfig, pipo: bool, method, params, *args):
    return PipoLM(cfg, pipo).apply({"params": params}, *args, method=method)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    return _Model(CONFIGS[request.param])


def _tokens(with_pad: bool, left_pad: int = 0):
    rng = np.random.default_rng(3)
    t = rng.integers(1, 40, size=36).astype(np.int32)
    if with_pad:
        t[[7, 11, 13, 19, 27]] = PAD  # odd positions only: rejected drafts / parity PADs
    return t


@pytest.mark.parametrize("with_pad", [False, True])
@pytest.mark.parametrize("left_pad", [0, 4])
def test_pipo_forced_decode_matches_teacher_forced(model, with_pad, left_pad):
    m_ = model
    p = m_.params[True]
    t = _tokens(with_pad)
    ref = m_.forward[True](p, jnp.asarray(t)[None])
    ref_bb = np.asarray(m_.logits(p, ref["h"]))[0]
    ref_mtp = np.asarray(m_.logits(p, ref["m"]))[0]
    ref_conf = np.asarray(ref["conf_logits"])[0]

    # 4 prompt latents (10 for the hybrid: 3 DeltaNet chunks); then pair by pair, forced.
    prompt_len = 20 if m_.cfg.family == "qwen3_5" else 8
    prompt = np.concatenate([np.full(left_pad, PAD, np.int32), t[:prompt_len]])[None]
    valid = np.concatenate([np.zeros(left_pad, bool), np.ones(prompt_len, bool)])[None]
    _, h_all, cache, pos = m_.prefill[True](p, jnp.asarray(prompt), jnp.asarray(valid), 32,
                                            True)
    l0 = prompt_len // 2
    tok1_seq = jnp.concatenate([prompt[:, 2::2], t[None, prompt_len:prompt_len + 1]], axis=1)
    mtp_logits, conf, cache = m_.prefill_mtp(p, h_all, tok1_seq, jnp.asarray(valid), cache)
    tol = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(m_.logits(p, h_all[0, left_pad // 2:]), ref_bb[:l0], **tol)
    np.testing.assert_allclose(mtp_logits[0], ref_mtp[l0 - 1], **tol)
    np.testing.assert_allclose(conf[0], ref_conf[l0 - 1], **tol)
    for i in range(l0, len(t) // 2 - 1):
        pair = jnp.asarray(t[None, 2 * i: 2 * i + 2])
        logits, h, cache = m_.step[True](p, pair, pos, cache)
        mtp_logits, conf, cache = m_.step_mtp(p, h, jnp.asarray(t[None, 2 * i + 2]), pos, cache)
        cache = m_.next_slot(cache, jnp.ones((1,), bool))
        pos = pos + 1
        np.testing.assert_allclose(logits[0], ref_bb[i], **tol)
        np.testing.assert_allclose(mtp_logits[0], ref_mtp[i], **tol)
        np.testing.assert_allclose(conf[0], ref_conf[i], **tol)


@pytest.mark.parametrize("left_pad", [0, 3])
def test_ar_forced_decode_matches_teacher_forced(model, left_pad):
    m_ = model
    p = m_.params[False]
    t = _tokens(False)
    ref = np.asarray(m_.logits(p, m_.forward[False](p, jnp.asarray(t)[None])["h"]))[0]
    prompt_len = 13 if m_.cfg.family == "qwen3_5" else 5
    prompt = np.concatenate([np.full(left_pad, PAD, np.int32), t[:prompt_len]])[None]
    valid = np.concatenate([np.zeros(left_pad, bool), np.ones(prompt_len, bool)])[None]
    _, h_all, cache, pos = m_.prefill[False](p, jnp.asarray(prompt), jnp.asarray(valid), 40,
                                             False)
    tol = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(m_.logits(p, h_all[0, left_pad:]), ref[:prompt_len], **tol)
    for j in range(prompt_len, len(t) - 1):
        logits, _, cache = m_.step[False](p, jnp.asarray(t[None, j:j + 1]), pos, cache)
        cache = m_.next_slot(cache, jnp.ones((1,), bool))
        pos = pos + 1
        np.testing.assert_allclose(logits[0], ref[j], **tol)

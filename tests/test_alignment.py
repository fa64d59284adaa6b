"""SPEC §2 alignment of the teacher-forced forward and the SFT / AR losses.

Backbone latent ``i`` (over pairs ``0..i``) is scored against ``t_{2i+2}``, the MTP position ``i``
against ``t_{2i+3}``, the AR hidden ``h_j`` against ``t_{j+1}``. The expectations are computed by a
brute-force Python loop over full-vocabulary log-softmaxes of ``PipoLM.logits``, with the SPEC's
indices written out literally, so an off-by-one in ``losses`` cannot hide in both places.
"""

from __future__ import annotations

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipo_jax.config import ArConfig, ModelConfig, SftConfig
from pipo_jax.model import pairs
from pipo_jax.model.pipo import PipoLM
from pipo_jax.train import losses

PAD = 0
CFG = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  mlp_dim=64, max_context=64)
H = CFG.d_model


def random_params(pipo: bool, seed: int) -> dict:
    return helpers.random_params(CFG, pipo, seed)


@pytest.fixture(scope="module")
def params():
    return {True: random_params(True, 0), False: random_params(False, 1)}


_forward = {pipo: jax.jit(lambda p, t, pipo=pipo: PipoLM(CFG, pipo).apply({"params": p}, t))
            for pipo in (True, False)}
_logits = jax.jit(lambda p, h: PipoLM(CFG, False).apply({"params": p}, h, method=PipoLM.logits))


@jax.jit
def _sft(p, tokens, mask):
    out = PipoLM(CFG, True).apply({"params": p}, tokens)
    tc = SftConfig(w_mtp=0.7, w_conf=0.3, loss_chunk=7)
    return losses.sft_loss(out, p["embedder"]["embedding"], tokens, mask, tc)


@jax.jit
def _ar(p, tokens, mask):
    out = PipoLM(CFG, False).apply({"params": p}, tokens)
    return losses.ar_loss(out, p["embedder"]["embedding"], tokens, mask, ArConfig(loss_chunk=6))


def _log_softmax64(logits) -> np.ndarray:
    x = np.asarray(logits, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def _sft_batch() -> tuple[np.ndarray, np.ndarray]:
    """Two sequences of 20 tokens with an odd prompt (parity PAD), PAD-split pairs, a parity PAD
    at the end and right padding: every kind of ignored label occurs at a label position."""
    rng = np.random.default_rng(7)
    rows = []
    for prompt_len, resp_len in ((5, 8), (4, 13)):
        prompt = rng.integers(1, CFG.vocab_size, prompt_len).tolist()
        resp = rng.integers(1, CFG.vocab_size, resp_len).tolist()
        t, m = pairs.build_pair_sequence(prompt, resp, PAD)
        t, m = pairs.random_pad_augment(t, m, 0.3, rng, PAD, "mix")
        rows.append(pairs.fit_to_length(t, m, 20, PAD))
    tokens = np.stack([r[0] for r in rows])
    mask = np.stack([r[1] for r in rows])
    return tokens, mask


def test_sft_batch_exercises_every_mask_kind():
    tokens, mask = _sft_batch()
    # Some label positions (>= 2) are prompt tokens, some PADs, some real targets.
    assert (~mask[:, 2:] & (tokens[:, 2:] != PAD)).any()  # prompt labels
    assert (tokens[:, 3::2] == PAD).any() and (tokens[:, 2::2] == PAD).any()  # PAD labels
    assert mask[:, 2::2].sum() >= 4 and mask[:, 3::2].sum() >= 4
    assert not mask[tokens == PAD].any()


def _brute_force_sft(p, tokens, mask):
    out = _forward[True](p, jnp.asarray(tokens))
    logp_h = _log_softmax64(_logits(p, out["h"]))
    logp_m = _log_softmax64(_logits(p, out["m"]))
    z = np.asarray(out["conf_logits"], np.float64)
    b, t = tokens.shape
    n_lat = t // 2
    ce_bb, n_bb, hit_bb = 0.0, 0, 0
    ce_mtp, n_mtp, hit_mtp, bce, target_sum, commit = 0.0, 0, 0, 0.0, 0.0, 0
    for r in range(b):
        for i in range(n_lat - 1):
            j = 2 * i + 2  # backbone latent i predicts t_{2i+2}
            if mask[r, j]:
                ce_bb -= logp_h[r, i, tokens[r, j]]
                hit_bb += int(np.argmax(logp_h[r, i]) == tokens[r, j])
                n_bb += 1
            j = 2 * i + 3  # MTP position i predicts t_{2i+3}
            if mask[r, j]:
                lp = logp_m[r, i, tokens[r, j]]
                ce_mtp -= lp
                hit_mtp += int(np.argmax(logp_m[r, i]) == tokens[r, j])
                n_mtp += 1
                target = np.exp(lp)
                s = 1.0 / (1.0 + np.exp(-z[r, i]))
                bce -= target * np.log(s) + (1 - target) * np.log(1 - s)
                target_sum += target
                commit += int(s >= 0.5)
    return {"loss_backbone": ce_bb / n_bb, "loss_mtp": ce_mtp / n_mtp,
            "loss_confidence": bce / n_mtp, "accuracy_backbone": hit_bb / n_bb,
            "accuracy_mtp": hit_mtp / n_mtp, "confidence_target_mean": target_sum / n_mtp,
            "commit_rate@0.5": commit / n_mtp, "target_tokens": n_bb + n_mtp}


def test_sft_loss_matches_brute_force_alignment(params):
    p = params[True]
    tokens, mask = _sft_batch()
    loss, metrics = _sft(p, jnp.asarray(tokens), jnp.asarray(mask))
    want = _brute_force_sft(p, tokens, mask)
    for k, v in want.items():
        np.testing.assert_allclose(float(metrics[k]), v, rtol=1e-5, atol=1e-6, err_msg=k)
    total = want["loss_backbone"] + 0.7 * want["loss_mtp"] + 0.3 * want["loss_confidence"]
    np.testing.assert_allclose(float(loss), total, rtol=1e-5)
    chex.assert_shape(loss, ())
    chex.assert_type(loss, jnp.float32)


def test_sft_brute_force_discriminates_shifted_alignment(params):
    """The check above would notice an off-by-one: a one-token shift of either target changes
    the CE well beyond the tolerance."""
    p = params[True]
    tokens, mask = _sft_batch()
    out = _forward[True](p, jnp.asarray(tokens))
    _, metrics = _sft(p, jnp.asarray(tokens), jnp.asarray(mask))
    for name, key, start in (("h", "loss_backbone", 1), ("m", "loss_mtp", 2)):
        logp = _log_softmax64(_logits(p, out[name]))
        n = logp.shape[1]
        lab, msk = tokens[:, start::2][:, :n], mask[:, start::2][:, :n]
        shifted = -(np.take_along_axis(logp, lab[..., None], -1)[..., 0] * msk).sum() / msk.sum()
        assert abs(shifted - float(metrics[key])) > 0.05, key


def test_ar_loss_matches_brute_force(params):
    p = params[False]
    rng = np.random.default_rng(11)
    tokens = rng.integers(1, CFG.vocab_size, (2, 15)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    mask[0, :5] = False  # prompt
    mask[1, :3] = False
    mask[1, 12:] = False  # right padding
    tokens[1, 12:] = PAD
    loss, metrics = _ar(p, jnp.asarray(tokens), jnp.asarray(mask))
    out = _forward[False](p, jnp.asarray(tokens))
    chex.assert_shape(out["h"], (2, 14, H))
    logp = _log_softmax64(_logits(p, out["h"]))
    ce, n, hit = 0.0, 0, 0
    for r in range(2):
        for j in range(14):  # h_j predicts t_{j+1}
            if mask[r, j + 1]:
                ce -= logp[r, j, tokens[r, j + 1]]
                hit += int(np.argmax(logp[r, j]) == tokens[r, j + 1])
                n += 1
    np.testing.assert_allclose(float(loss), ce / n, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["accuracy_backbone"]), hit / n, atol=1e-6)
    assert int(metrics["target_tokens"]) == n


def test_forward_shapes_and_dtypes(params):
    b, t = 3, 12
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, CFG.vocab_size, (b, t)), jnp.int32)
    out = _forward[True](params[True], tokens)
    assert set(out) == {"h", "m", "conf_logits"}
    chex.assert_shape([out["h"], out["m"]], (b, t // 2 - 1, H))
    chex.assert_shape(out["conf_logits"], (b, t // 2 - 1))
    chex.assert_type([out["h"], out["m"], out["conf_logits"]], jnp.float32)
    ar = _forward[False](params[False], tokens)
    assert set(ar) == {"h"}
    chex.assert_shape(ar["h"], (b, t - 1, H))
    chex.assert_type(ar["h"], jnp.float32)
    chex.assert_shape(_logits(params[True], out["m"]), (b, t // 2 - 1, CFG.vocab_size))


def test_odd_length_pipo_sequence_rejected(params):
    with pytest.raises(ValueError, match="even length"):
        PipoLM(CFG, True).apply({"params": params[True]}, jnp.ones((1, 7), jnp.int32))


def test_causality(params):
    """Backbone latent ``i`` sees tokens up to ``t_{2i+1}``; MTP (and confidence) position ``i``
    sees tokens up to ``t_{2i+2}``. Each row of the batch perturbs one token ``t_k``; outputs
    before the dependency frontier must be unchanged, the first one at the frontier must move."""
    t = 16
    n = t // 2 - 1
    rng = np.random.default_rng(5)
    base = rng.integers(1, CFG.vocab_size, t).astype(np.int32)
    batch = np.repeat(base[None], t + 1, axis=0)
    for k in range(t):
        batch[k + 1, k] = 1 + (base[k] + rng.integers(0, CFG.vocab_size - 2)) % (CFG.vocab_size - 1)
        assert batch[k + 1, k] != base[k]
    out = jax.tree.map(np.asarray, _forward[True](params[True], jnp.asarray(batch)))
    ref = {key: v[0] for key, v in out.items()}
    for k in range(t):
        got = {key: v[k + 1] for key, v in out.items()}
        h_dep = [i for i in range(n) if 2 * i + 1 >= k]  # latent i depends on t_0..t_{2i+1}
        m_dep = [i for i in range(n) if 2 * i + 2 >= k]  # MTP i depends on t_0..t_{2i+2}
        for key, dep in (("h", h_dep), ("m", m_dep), ("conf_logits", m_dep)):
            first = dep[0] if dep else n
            chex.assert_trees_all_close(got[key][:first], ref[key][:first], atol=1e-6, rtol=0)
            if dep:
                diff = np.abs(got[key][first] - ref[key][first]).max()
                assert diff > 1e-4, (key, k, first, diff)
    # The very last token has no target and feeds no output.
    assert not any(np.abs(out[key][t] - ref[key]).max() > 1e-6 for key in out)

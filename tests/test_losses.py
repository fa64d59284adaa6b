"""Chunked vocabulary cross-entropy (SPEC §4) and the confidence BCE's gradient isolation."""

from __future__ import annotations

import functools

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipo_jax.config import ModelConfig, SftConfig
from pipo_jax.model.pipo import PipoLM
from pipo_jax.train import losses

N, HD, V = 13, 16, 37


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(N, HD)).astype(np.float32)
    e = (rng.normal(size=(V, HD)) * 0.5).astype(np.float32)
    y = rng.integers(0, V, N).astype(np.int32)
    w = rng.normal(size=N).astype(np.float32)  # random cotangent for the gradient check
    return h, e, y, w


def _reference64(h, e, y, w):
    """log p(y) by the full log-softmax, and the analytic gradient of ``Σ w·log p(y)``."""
    h, e = np.asarray(h, np.float64), np.asarray(e, np.float64)
    logits = h @ e.T
    logits -= logits.max(axis=-1, keepdims=True)
    p = np.exp(logits) / np.exp(logits).sum(axis=-1, keepdims=True)
    logp = np.log(p[np.arange(len(y)), y])
    onehot = np.eye(e.shape[0])[y]
    d_logits = w[:, None] * (onehot - p)  # N × V
    return logp, np.argmax(logits, axis=-1) == y, d_logits @ e, d_logits.T @ h


@pytest.mark.parametrize("chunk", [1, 4, 5, 13, 64])  # 4, 5 do not divide 13; 64 > N
def test_chunked_logprobs_value_and_grad_match_unchunked(chunk):
    h, e, y, w = _problem()
    fn = functools.partial(losses.chunked_token_logprobs, chunk=chunk)

    @jax.jit
    def run(h, e, y, w):
        (logp, correct), vjp = jax.vjp(lambda h_, e_: fn(h_, e_, y), h, e)
        gh, ge = vjp((w, np.zeros(N, jax.dtypes.float0)))
        return logp, correct, gh, ge

    logp, correct, gh, ge = run(h, e, y, w)
    want_logp, want_correct, want_gh, want_ge = _reference64(h, e, y, w)
    chex.assert_shape(logp, (N,))
    chex.assert_type(logp, jnp.float32)
    chex.assert_type(correct, jnp.bool_)
    np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(correct, want_correct)
    chex.assert_shape(gh, (N, HD))
    chex.assert_shape(ge, (V, HD))
    np.testing.assert_allclose(gh, want_gh, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ge, want_ge, rtol=1e-4, atol=1e-5)


def test_chunked_equals_unchunked_jax():
    """Chunked (chunk 5, padded last chunk) and single-chunk paths agree with each other too,
    in value and in the gradient of a loss through both arguments."""
    h, e, y, w = _problem(1)

    def loss(h_, e_, chunk):
        return jnp.sum(w * losses.chunked_token_logprobs(h_, e_, y, chunk)[0])

    g5 = jax.jit(jax.value_and_grad(functools.partial(loss, chunk=5), argnums=(0, 1)))(h, e)
    g_all = jax.jit(jax.value_and_grad(functools.partial(loss, chunk=N), argnums=(0, 1)))(h, e)
    chex.assert_trees_all_close(g5, g_all, rtol=1e-5, atol=1e-6)


def test_cross_entropy_masked_mean_and_accuracy():
    rng = np.random.default_rng(2)
    b, n = 2, 7
    h = rng.normal(size=(b, n, HD)).astype(np.float32)
    e = (rng.normal(size=(V, HD)) * 0.5).astype(np.float32)
    y = rng.integers(0, V, (b, n)).astype(np.int32)
    mask = rng.random((b, n)) < 0.6
    mask[0, 0] = True
    mask[1, -1] = False

    @jax.jit
    def run(h):
        def f(h_):
            loss, logp, acc = losses.cross_entropy(h_, e, y, mask, 3)  # 3 does not divide 14
            return loss, (logp, acc)
        return jax.value_and_grad(f, has_aux=True)(h)

    (loss, (logp, acc)), gh = run(h)
    want_logp, want_correct, _, _ = _reference64(h.reshape(-1, HD), e, y.reshape(-1),
                                                 np.ones(b * n))
    want_logp, want_correct = want_logp.reshape(b, n), want_correct.reshape(b, n)
    chex.assert_shape(logp, (b, n))
    np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, -want_logp[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(acc, want_correct[mask].mean(), atol=1e-6)
    # Masked targets get exactly no gradient; kept ones do.
    assert np.all(np.asarray(gh)[~mask] == 0)
    assert np.all(np.abs(np.asarray(gh)[mask]).sum(-1) > 0)


def test_cross_entropy_all_masked_is_zero_not_nan():
    h, e, y, _ = _problem()
    loss, _, acc = jax.jit(lambda h_: losses.cross_entropy(
        h_[None], e, y[None], jnp.zeros((1, N), bool), 4))(h)
    assert float(loss) == 0.0 and float(acc) == 0.0


# ------------------------------------------------------------------------- confidence BCE

PAD = 0
CFG = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  mlp_dim=64, max_context=64)


def _random_params(seed: int) -> dict:
    return helpers.random_params(CFG, True, seed, std=0.2, bias_std=0.2)


def _batch():
    rng = np.random.default_rng(4)
    tokens = rng.integers(1, CFG.vocab_size, (2, 16)).astype(np.int32)
    tokens[0, [7, 11]] = PAD
    mask = tokens != PAD
    mask[:, :4] = False  # prompt
    return jnp.asarray(tokens), jnp.asarray(mask)


TC = SftConfig(loss_chunk=5)


def _bce_of(params, tokens, mask, detach):
    out = PipoLM(CFG, True).apply({"params": params}, tokens, detach_confidence_inputs=detach)
    _, metrics = losses.sft_loss(out, params["embedder"]["embedding"], tokens, mask, TC)
    return metrics["loss_confidence"], (out, metrics)


def _manual_bce(params, tokens, mask, stop_target):
    """BCE written out from the SPEC: target ``p_mtp(t_{2i+3})`` from the full log-softmax."""
    model = PipoLM(CFG, True)
    out = model.apply({"params": params}, tokens, detach_confidence_inputs=False)
    logp = jax.nn.log_softmax(model.apply({"params": params}, out["m"], method=PipoLM.logits))
    gold = jnp.take_along_axis(logp, tokens[:, 3::2, None], axis=-1)[..., 0]
    target = jnp.exp(gold)
    if stop_target:
        target = jax.lax.stop_gradient(target)
    z = out["conf_logits"]
    per = -(target * jax.nn.log_sigmoid(z) + (1 - target) * jax.nn.log_sigmoid(-z))
    m = mask[:, 3::2].astype(jnp.float32)
    return jnp.sum(per * m) / jnp.sum(m), target


def _nonzero(tree) -> bool:
    return any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(tree))


def test_confidence_bce_target_and_detached_gradient():
    params, (tokens, mask) = _random_params(0), _batch()

    @jax.jit
    def run(p):
        (bce, (_, metrics)), g = jax.value_and_grad(_bce_of, has_aux=True)(p, tokens, mask, True)
        manual, target = _manual_bce(p, tokens, mask, True)
        return bce, metrics, g, manual, target

    bce, metrics, grads, manual, target = run(params)
    m = np.asarray(mask[:, 3::2])
    np.testing.assert_allclose(bce, manual, rtol=1e-5)
    np.testing.assert_allclose(metrics["confidence_target_mean"], np.asarray(target)[m].mean(),
                               rtol=1e-5)
    assert 0 < float(bce) < 10
    # With detached inputs (the default) and a stop-gradient'ed target, the BCE trains only the
    # confidence head: exactly zero gradient everywhere else, the MTP head included.
    for name in ("mtp_head", "embedder", "backbone", "compressor"):
        chex.assert_trees_all_equal(grads[name], jax.tree.map(jnp.zeros_like, grads[name]))
    assert _nonzero(grads["confidence_head"])


def test_confidence_target_is_stop_gradient_when_inputs_attached():
    """With ``detach_confidence_inputs=False`` the MTP head gets gradient through the logit ``z``
    only: equal to the hand-written BCE with a stop-gradient'ed target, different from the one
    whose target is differentiated (so the comparison can tell them apart)."""
    params, (tokens, mask) = _random_params(1), _batch()
    heads = ("mtp_head", "confidence_head")

    @jax.jit
    def run(p):
        def grad_heads(fn):  # gradient w.r.t. the two heads only (a smaller backward pass)
            return jax.grad(lambda sub: fn({**p, **sub}))({k: p[k] for k in heads})

        g = grad_heads(lambda q: _bce_of(q, tokens, mask, False)[0])
        g_sg = grad_heads(lambda q: _manual_bce(q, tokens, mask, True)[0])
        g_no_sg = grad_heads(lambda q: _manual_bce(q, tokens, mask, False)[0])
        return g, g_sg, g_no_sg

    g, g_sg, g_no_sg = run(params)
    assert _nonzero(g["mtp_head"])  # attached inputs: the MTP head does get gradient
    chex.assert_trees_all_close(g, g_sg, rtol=1e-4, atol=1e-6)
    diff = max(float(jnp.abs(a - b).max())
               for a, b in zip(jax.tree.leaves(g["mtp_head"]), jax.tree.leaves(g_no_sg["mtp_head"]),
                               strict=True))
    assert diff > 1e-4

"""The gated delta rule (``pipo_jax.model.deltanet``) and the Gated DeltaNet mixer
(``GatedDeltaNet``).

* ``chunked`` == ``scan`` == chained ``recurrent_step``: outputs, final states and gradients,
  with and without an initial state, for T below, at and not at a multiple of the chunk;
* strong decay stays finite;
* the mixer's whole-sequence form equals its token-by-token decode from zero states (conv and
  recurrent), and left padding leaves the valid part and the states unchanged.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from pipo_jax.config import ModelConfig
from pipo_jax.model import deltanet
from pipo_jax.model.cache import DeltaNetCache
from pipo_jax.model.layers import GatedDeltaNet

B, N, DK, DV = 2, 3, 8, 6
TOL = dict(rtol=1e-5, atol=1e-5)

_chunked = jax.jit(deltanet.chunked, static_argnames=("chunk",))
_scan = jax.jit(deltanet.scan)
_step = jax.jit(deltanet.recurrent_step)


def _inputs(t, seed=0, initial_state=False, g_scale=1.0):
    """q, k (L2-normed, q scaled by dk^-½, as the mixer makes them), v, g ≤ 0, β ∈ (0, 1), s0."""
    rng = np.random.default_rng(seed)

    def l2(x):
        return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + 1e-6)

    q = l2(rng.normal(size=(B, t, N, DK))) * DK ** -0.5
    k = l2(rng.normal(size=(B, t, N, DK)))
    v = rng.normal(size=(B, t, N, DV))
    g = -g_scale * np.exp(0.5 * rng.normal(size=(B, t, N))) * np.log1p(
        np.exp(rng.normal(size=(B, t, N))))
    beta = 1 / (1 + np.exp(-rng.normal(size=(B, t, N))))
    s0 = rng.normal(size=(B, N, DK, DV)) if initial_state else None
    return tuple(None if x is None else jnp.asarray(x, jnp.float32)
                 for x in (q, k, v, g, beta, s0))


# T below the chunk, spanning 3 chunks with a partial last one, and exactly 3 chunks; the shapes
# are shared with the tests below so that each jitted function compiles few times.
@pytest.mark.parametrize("t,chunk,initial_state", [
    (5, 16, True), (37, 16, False), (37, 16, True), (48, 16, False)],
    ids=["T<chunk-s0", "3-chunks-ragged", "3-chunks-ragged-s0", "3-chunks-exact"])
def test_chunked_matches_scan(t, chunk, initial_state):
    q, k, v, g, beta, s0 = _inputs(t, seed=t, initial_state=initial_state)
    o_ref, s_ref = _scan(q, k, v, g, beta, s0)
    o, s = _chunked(q, k, v, g, beta, s0, chunk=chunk)
    chex.assert_shape(o, (B, t, N, DV))
    chex.assert_shape(s, (B, N, DK, DV))
    chex.assert_type([o, s, o_ref, s_ref], jnp.float32)
    np.testing.assert_allclose(o, o_ref, **TOL)
    np.testing.assert_allclose(s, s_ref, **TOL)


def test_recurrent_steps_match_scan():
    t = 37
    q, k, v, g, beta, s = _inputs(t, seed=1, initial_state=True)
    o_ref, s_ref = _scan(q, k, v, g, beta, s)
    outs = []
    for i in range(t):
        o, s = _step(q[:, i], k[:, i], v[:, i], g[:, i], beta[:, i], s)
        chex.assert_shape(o, (B, N, DV))
        outs.append(o)
    np.testing.assert_allclose(jnp.stack(outs, axis=1), o_ref, **TOL)
    np.testing.assert_allclose(s, s_ref, **TOL)


def _loss(fn, q, k, v, g, beta, s0, w_o, w_s):
    o, s = fn(q, k, v, g, beta, s0)
    return jnp.sum(o * w_o) + jnp.sum(s * w_s)


_grads = {name: jax.jit(jax.grad(functools.partial(_loss, fn), argnums=tuple(range(6))))
          for name, fn in (("scan", deltanet.scan),
                           ("chunked", functools.partial(deltanet.chunked, chunk=16)))}


def _weights(t, seed=5):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(B, t, N, DV)), jnp.float32),
            jnp.asarray(rng.normal(size=(B, N, DK, DV)), jnp.float32))


def test_chunked_gradients_match_scan():
    t = 37
    args = _inputs(t, seed=2, initial_state=True) + _weights(t)
    ref = _grads["scan"](*args)
    got = _grads["chunked"](*args)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "s0"), got, ref, strict=True):
        assert bool(jnp.all(jnp.isfinite(a))), name
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


# (decay at every third token, tolerance on outputs, tolerance on gradients). The chunked form
# takes Γ_ij = exp(γ_i − γ_j) from the chunk's running sum γ = cumsum(g): with resets of -1e4,
# |γ| reaches ~6e4 within a chunk, where the float32 spacing is ~4e-3, so Γ between two nearby
# tokens after a reset carries a relative error of that size (the reference implementation's
# chunked form has the same cancellation). Measured max |Δ| vs scan: 3.7e-4 on outputs, 2.8e-3
# on gradients at -1e4; 3.4e-5 / 1.9e-4 at -1e3; below 1e-5 / 6e-6 at -30.
@pytest.mark.parametrize("g_value,tol,grad_tol", [(-30.0, 1e-5, 1e-4), (-1e4, 2e-3, 1e-2)],
                         ids=["reset-30", "reset-1e4"])
def test_strong_decay_stays_finite(g_value, tol, grad_tol):
    """Strong decay at some positions (state resets): within a chunk ``exp(γ)`` underflows and
    ``exp(γ_i − γ_j)`` above the diagonal would overflow; outputs and gradients stay finite and
    close to the scan's."""
    t = 37
    q, k, v, g, beta, s0 = _inputs(t, seed=3, initial_state=True)
    g = g.at[:, ::3].set(g_value)
    o, s = _chunked(q, k, v, g, beta, s0, chunk=16)
    o_ref, s_ref = _scan(q, k, v, g, beta, s0)
    assert bool(jnp.all(jnp.isfinite(o))) and bool(jnp.all(jnp.isfinite(s)))
    np.testing.assert_allclose(o, o_ref, rtol=tol, atol=tol)
    np.testing.assert_allclose(s, s_ref, rtol=tol, atol=tol)
    args = (q, k, v, g, beta, s0) + _weights(t)
    got, ref = _grads["chunked"](*args), _grads["scan"](*args)
    for name, a, b in zip(("q", "k", "v", "g", "beta", "s0"), got, ref, strict=True):
        assert bool(jnp.all(jnp.isfinite(a))), name
        np.testing.assert_allclose(a, b, rtol=grad_tol, atol=grad_tol, err_msg=name)


# ------------------------------------------------------------------------------ GatedDeltaNet

CFG = ModelConfig(family="qwen3_5", vocab_size=32, d_model=32, n_layers=2,
                  layer_types=("linear_attention", "full_attention"), n_heads=2, n_kv_heads=1,
                  head_dim=16, mlp_dim=48, partial_rotary_factor=0.25, linear_n_key_heads=2,
                  linear_n_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=6,
                  linear_conv_kernel=4, linear_chunk=8)
KC = CFG.linear_conv_kernel - 1  # conv-state columns
MIXER = GatedDeltaNet(CFG)


@pytest.fixture(scope="module")
def mixer_params():
    """Every parameter random: kernels 0.3·N, conv 0.5·N, A_log = log U(0.01, 2),
    dt_bias 0.5·N, gated-norm scale 1 + 0.3·N."""
    shapes = jax.eval_shape(lambda k: nn.unbox(MIXER.init(k, jnp.zeros((1, 3, CFG.d_model))))[
        "params"], jax.random.key(0))
    rng = np.random.default_rng(11)

    def leaf(path, s):
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        if name == "A_log":
            x = np.log(rng.uniform(0.01, 2.0, s.shape))
        elif name == "dt_bias":
            x = 0.5 * rng.normal(size=s.shape)
        elif name == "conv1d":
            x = 0.5 * rng.normal(size=s.shape)
        elif name.endswith("scale"):
            x = 1 + 0.3 * rng.normal(size=s.shape)
        else:
            x = 0.3 * rng.normal(size=s.shape)
        return jnp.asarray(x, jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.partial(jax.jit, static_argnames=("use_scan",))
def _mixer(p, x, key_valid=None, use_scan=False):
    out, cache = MIXER.apply({"params": p}, x, key_valid, use_scan)
    return out, (cache.conv, cache.state)


@jax.jit
def _mixer_decode(p, x, conv, state):
    out, cache = MIXER.apply({"params": p}, x, DeltaNetCache(conv, state),
                             method=GatedDeltaNet.extend)
    return out, (cache.conv, cache.state)


def _x(t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(B, t, CFG.d_model)), jnp.float32)


@pytest.mark.parametrize("t", [2, 19], ids=["T<kernel", "3-chunks"])
def test_mixer_prefill_equals_token_by_token_decode(mixer_params, t):
    x = _x(t, seed=t)
    out, (conv, state) = _mixer(mixer_params, x)
    chex.assert_shape(out, (B, t, CFG.d_model))
    chex.assert_shape(conv, (B, KC, CFG.linear_conv_dim))
    chex.assert_shape(state, (B, CFG.linear_n_value_heads, CFG.linear_key_head_dim,
                              CFG.linear_value_head_dim))
    chex.assert_type([out, conv, state], jnp.float32)

    if t > CFG.linear_chunk:  # the chunked form (default) equals the token scan
        out_scan, (conv_scan, state_scan) = _mixer(mixer_params, x, use_scan=True)
        np.testing.assert_allclose(out, out_scan, **TOL)
        np.testing.assert_allclose(state, state_scan, **TOL)

    c = jnp.zeros_like(conv)
    s = jnp.zeros_like(state)
    outs = []
    for i in range(t):
        o, (c, s) = _mixer_decode(mixer_params, x[:, i:i + 1], c, s)
        chex.assert_shape(o, (B, 1, CFG.d_model))
        outs.append(o[:, 0])
    np.testing.assert_allclose(jnp.stack(outs, axis=1), out, **TOL)
    np.testing.assert_allclose(c, conv, **TOL)
    np.testing.assert_allclose(s, state, **TOL)


def test_mixer_left_padding_leaves_valid_part_and_states_unchanged(mixer_params):
    t, pad = 19, 5
    x = _x(t, seed=4)
    garbage = 3.0 * _x(pad, seed=9)  # the padded positions carry non-zero inputs
    valid = jnp.concatenate([jnp.zeros((B, pad), bool), jnp.ones((B, t), bool)], axis=1)
    out, (conv, state) = _mixer(mixer_params, x)
    out_p, (conv_p, state_p) = _mixer(mixer_params, jnp.concatenate([garbage, x], axis=1), valid)
    np.testing.assert_allclose(out_p[:, pad:], out, **TOL)
    np.testing.assert_allclose(conv_p, conv, **TOL)
    np.testing.assert_allclose(state_p, state, **TOL)

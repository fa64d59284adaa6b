"""SPEC §3 compressor variants and initialisation, and ``pipo_from_ar`` (the SFT stage's start)."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from pipo_jax.config import ModelConfig
from pipo_jax.model.pipo import Compressor, PipoLM, init_params, pipo_from_ar

CFG = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  mlp_dim=64, max_context=64)
H = CFG.d_model


def _cfg(**kw) -> ModelConfig:
    return dataclasses.replace(CFG, **kw)


@functools.partial(jax.jit, static_argnums=0)
def _compressor_init_apply(cfg, key, e_a, e_b):
    module = Compressor(cfg)
    params = nn.unbox(module.init(key, e_a, e_b))["params"]
    return params, module.apply({"params": params}, e_a, e_b)


def _embeddings(seed=0):
    rng = np.random.default_rng(seed)
    # Large enough that SiLU is far from linear and that e_a + e_b differs from silu sums.
    e_a = jnp.asarray(rng.normal(size=(2, 5, H)) * 2.0, jnp.float32)
    e_b = jnp.asarray(rng.normal(size=(2, 5, H)) * 2.0, jnp.float32)
    return e_a, e_b


def _silu64(x):
    x = np.asarray(x, np.float64)
    return x / (1.0 + np.exp(-x))


def test_linear_identity_init_is_exact_sum():
    e_a, e_b = _embeddings()
    params, out = _compressor_init_apply(_cfg(compressor_type="linear"), jax.random.key(0),
                                         e_a, e_b)
    chex.assert_shape(out, (2, 5, H))
    chex.assert_type(out, jnp.float32)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(e_a + e_b))
    assert set(params) == {"fc"}
    chex.assert_shape(params["fc"]["kernel"], (2 * H, H))
    chex.assert_shape(params["fc"]["bias"], (H,))
    eye = np.eye(H, dtype=np.float32)
    np.testing.assert_array_equal(params["fc"]["kernel"], np.concatenate([eye, eye], axis=0))
    np.testing.assert_array_equal(params["fc"]["bias"], np.zeros(H, np.float32))


def test_mlp_identity_init_is_sum_of_silus():
    """The documented start of the ``mlp`` compressor: ``silu(e_a) + silu(e_b)``, not the sum."""
    e_a, e_b = _embeddings()
    params, out = _compressor_init_apply(_cfg(compressor_type="mlp"), jax.random.key(0), e_a, e_b)
    chex.assert_shape(out, (2, 5, H))
    want = _silu64(e_a) + _silu64(e_b)
    # Equal to float32 rounding (about 1 ulp: XLA's fused SiLU differs from a separate one).
    np.testing.assert_allclose(np.asarray(out, np.float64), want, rtol=1e-6, atol=1e-6)
    assert np.abs(np.asarray(out) - np.asarray(e_a + e_b)).max() > 0.5  # really not the plain sum
    assert set(params) == {"fc1", "fc2"}
    chex.assert_shape(params["fc1"]["kernel"], (2 * H, 2 * H))
    chex.assert_shape(params["fc1"]["bias"], (2 * H,))
    chex.assert_shape(params["fc2"]["kernel"], (2 * H, H))
    chex.assert_shape(params["fc2"]["bias"], (H,))
    eye = np.eye(H, dtype=np.float32)
    np.testing.assert_array_equal(params["fc1"]["kernel"], np.eye(2 * H, dtype=np.float32))
    np.testing.assert_array_equal(params["fc2"]["kernel"], np.concatenate([eye, eye], axis=0))
    np.testing.assert_array_equal(params["fc1"]["bias"], np.zeros(2 * H, np.float32))
    np.testing.assert_array_equal(params["fc2"]["bias"], np.zeros(H, np.float32))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_random_init_is_not_the_identity_sum(kind):
    e_a, e_b = _embeddings()
    params, out = _compressor_init_apply(_cfg(compressor_type=kind, compressor_init="random"),
                                         jax.random.key(0), e_a, e_b)
    out = np.asarray(out, np.float64)
    for ident in (np.asarray(e_a + e_b), _silu64(e_a) + _silu64(e_b)):
        assert np.abs(out - ident).max() > 0.5
    # Same shapes as the identity variant, with normal(init_std) kernels.
    names = {"linear": {"fc"}, "mlp": {"fc1", "fc2"}}[kind]
    assert set(params) == names
    for name in names:
        k = np.asarray(params[name]["kernel"])
        assert 0.5 * CFG.init_std < k.std() < 2 * CFG.init_std


# ------------------------------------------------------------------------------ pipo_from_ar


def _random_ar_params(cfg: ModelConfig, seed: int) -> dict:
    """AR parameters with every leaf random (norm scales too), built in numpy."""
    shapes = jax.eval_shape(lambda k: nn.unbox(init_params(cfg, False, k)), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def leaf(path, s):
        x = rng.normal(size=s.shape) * 0.3
        return jnp.asarray(x + (1.0 if path[-1].key == "scale" else 0.0), jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


@functools.partial(jax.jit, static_argnums=0)
def _from_ar_and_fresh(cfg, ar, key):
    return pipo_from_ar(cfg, ar, key), nn.unbox(init_params(cfg, True, key))


def test_pipo_from_ar_last_layer():
    ar = _random_ar_params(CFG, 0)
    key = jax.random.key(3)
    pipo, fresh = _from_ar_and_fresh(CFG, ar, key)
    # Same tree structure as a freshly initialised PIPO model.
    chex.assert_trees_all_equal_shapes_and_dtypes(pipo, fresh)
    # Embedder and backbone copied bit-exactly.
    chex.assert_trees_all_equal(pipo["embedder"], ar["embedder"])
    chex.assert_trees_all_equal(pipo["backbone"], ar["backbone"])
    # MTP layer = the last backbone layer; its final norm = the backbone's final norm.
    last = jax.tree.map(lambda x: x[-1], ar["backbone"]["layers"]["layer_0"])
    chex.assert_trees_all_equal(pipo["mtp_head"]["layer"], last)
    first = jax.tree.map(lambda x: x[0], ar["backbone"]["layers"]["layer_0"])
    assert not np.array_equal(pipo["mtp_head"]["layer"]["attn"]["q_proj"]["kernel"],
                              first["attn"]["q_proj"]["kernel"])
    chex.assert_trees_all_equal(pipo["mtp_head"]["final_norm"], ar["backbone"]["final_norm"])
    # MTP fc = [I; I] (no bias): the layer first sees norm(e(token1)) + norm(h).
    eye = np.eye(H, dtype=np.float32)
    assert set(pipo["mtp_head"]["fc"]) == {"kernel"}
    np.testing.assert_array_equal(pipo["mtp_head"]["fc"]["kernel"],
                                  np.concatenate([eye, eye], axis=0))
    # The MTP input norms, compressor and confidence head are fresh.
    for name in ("norm_emb", "norm_hidden"):
        chex.assert_trees_all_equal(pipo["mtp_head"][name], fresh["mtp_head"][name])
        np.testing.assert_array_equal(pipo["mtp_head"][name]["scale"], np.ones(H, np.float32))
    chex.assert_trees_all_equal(pipo["compressor"], fresh["compressor"])
    chex.assert_trees_all_equal(pipo["confidence_head"], fresh["confidence_head"])
    ck = np.asarray(pipo["confidence_head"]["fc1"]["kernel"])
    chex.assert_shape(ck, (2 * H, H))
    assert 0.5 * CFG.init_std < ck.std() < 2 * CFG.init_std


def test_pipo_from_ar_model_compresses_to_silu_sum():
    """End to end through ``PipoLM.compress`` with the SFT-start parameters (default ``mlp``)."""
    ar = _random_ar_params(CFG, 1)
    pipo, _ = _from_ar_and_fresh(CFG, ar, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 8)), jnp.int32)
    c = jax.jit(lambda p, t: PipoLM(CFG, True).apply({"params": p}, t, method=PipoLM.compress))(
        pipo, tokens)
    e = np.asarray(ar["embedder"]["embedding"], np.float64)[np.asarray(tokens)]
    chex.assert_shape(c, (2, 4, H))
    np.testing.assert_allclose(np.asarray(c), _silu64(e[:, 0::2]) + _silu64(e[:, 1::2]),
                               rtol=1e-6, atol=1e-6)


def test_pipo_from_ar_random_mtp():
    cfg = _cfg(mtp_init="random")
    ar = _random_ar_params(cfg, 2)
    pipo, fresh = _from_ar_and_fresh(cfg, ar, jax.random.key(4))
    chex.assert_trees_all_equal(pipo["embedder"], ar["embedder"])
    chex.assert_trees_all_equal(pipo["backbone"], ar["backbone"])
    chex.assert_trees_all_equal(pipo["mtp_head"], fresh["mtp_head"])
    last = jax.tree.map(lambda x: x[-1], ar["backbone"]["layers"]["layer_0"])
    assert not np.array_equal(pipo["mtp_head"]["layer"]["attn"]["q_proj"]["kernel"],
                              last["attn"]["q_proj"]["kernel"])

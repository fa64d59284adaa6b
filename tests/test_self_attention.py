"""The whole-sequence causal attention forms (``model.attention_impl``, issue #17): each form
that runs on CPU equals the materialised reference in values and gradients (float32, random
left pads, GQA, lengths that are not a multiple of the block); the full model's losses and
gradients do not depend on the switch; the blockwise form's compiled memory is linear in the
length; forms a platform lacks are one-line errors."""

from __future__ import annotations

import dataclasses
import functools

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from pipo_jax.config import ConfigError, ModelConfig
from pipo_jax.model import self_attention as sa
from pipo_jax.model.pipo import PipoLM, init_params, lm_head
from pipo_jax.train.losses import sft_loss

B, N, K, D = 3, 4, 2, 16


def _qkv(length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, length, N, D)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, length, K, D)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, length, K, D)), jnp.float32)
    pads = rng.integers(0, length // 3, size=B)
    pads[0] = 0
    valid = jnp.asarray(np.arange(length)[None] >= pads[:, None])
    return q, k, v, valid


def _value_and_grads(form, q, k, v, valid):
    """The output at real queries and the gradients of a fixed projection of it."""
    def loss(q, k, v):
        out = form(q, k, v, valid)
        w = jnp.sin(jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape))
        return jnp.sum(jnp.where(valid[:, :, None, None], out * w, 0.0)), out
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return jnp.where(valid[:, :, None, None], out, 0.0), grads


FORMS = {
    "blockwise-16": functools.partial(sa.causal_attention, impl="blockwise", block=16),
    "blockwise-64": functools.partial(sa.causal_attention, impl="blockwise", block=64),
    # Pallas splash attention in interpret mode: the TPU kernel's own code, run on CPU.
    "splash-interpret": functools.partial(sa._splash, interpret=True),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_forms_equal_the_materialised_reference(form: str):
    q, k, v, valid = _qkv(100)  # 100: not a multiple of either block, nor of splash's 128
    ref = _value_and_grads(functools.partial(sa.causal_attention, impl="xla"), q, k, v, valid)
    got = _value_and_grads(FORMS[form], q, k, v, valid)
    chex.assert_trees_all_close(got, ref, rtol=1e-5, atol=2e-6)
    assert float(jnp.max(jnp.abs(ref[0]))) > 0.1


def test_model_losses_and_gradients_do_not_depend_on_the_form():
    """PIPO's SFT loss and its gradients (backbone attention and the MTP layer's) with the
    blockwise form equal those of the materialised one."""
    cfg = dataclasses.replace(helpers.DECODE_HYBRID, vocab_size=64, max_context=256,
                              attention_impl="xla")
    params = helpers.random_params(cfg, True, seed=4)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(1, 64, size=(2, 80)), jnp.int32)
    mask = jnp.asarray(np.arange(80)[None] >= np.array([[6], [30]]))

    def loss(mcfg: ModelConfig, p):
        from pipo_jax.config import SftConfig
        out = PipoLM(mcfg, True).apply({"params": p}, tokens)
        return sft_loss(out, lm_head(p), tokens, mask, SftConfig())[0]

    want = jax.jit(jax.value_and_grad(functools.partial(loss, cfg)))(params)
    block = dataclasses.replace(cfg, attention_impl="blockwise", attention_block=16)
    got = jax.jit(jax.value_and_grad(functools.partial(loss, block)))(params)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    # Gradients of O(1) through four random layers: float32 sums in another order.
    chex.assert_trees_all_close(got[1], want[1], rtol=1e-4, atol=2e-5)


def _temp_bytes(impl: str, length: int) -> int:
    q, k, v, valid = _qkv(length)

    def loss(q, k, v):
        return jnp.sum(sa.causal_attention(q, k, v, None, impl, block=128) ** 2)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def test_blockwise_memory_is_linear_in_the_length():
    """Compiled temporaries of the forward + backward pass (XLA's memory analysis): 4× the
    length costs the materialised form ~16× (its B·N·L² scores), the blockwise form ~4×."""
    xla = [_temp_bytes("xla", n) for n in (256, 1024)]
    block = [_temp_bytes("blockwise", n) for n in (256, 1024)]
    assert xla[1] / xla[0] > 10, xla
    assert block[1] / block[0] < 6, block
    assert block[1] < xla[1] / 4, (block, xla)


def test_auto_and_unavailable_forms():
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert sa.resolve_impl("auto", 512, f32, "cpu") == "xla"
    assert sa.resolve_impl("auto", sa.AUTO_BLOCKWISE_FROM, f32, "cpu") == "blockwise"
    assert sa.resolve_impl("auto", 512, bf16, "gpu") == "cudnn"
    assert sa.resolve_impl("auto", 512, f32, "gpu") == "xla"
    assert sa.resolve_impl("auto", 512, bf16, "tpu") == "splash"
    with pytest.raises(ConfigError, match=r"cudnn does not run on this cpu backend; choose one "
                                          r"of auto, xla, blockwise$"):
        sa.resolve_impl("cudnn", 512, bf16, "cpu")
    with pytest.raises(ConfigError, match="splash does not run on this gpu backend.*cudnn"):
        sa.resolve_impl("splash", 512, bf16, "gpu")
    with pytest.raises(ConfigError, match="cudnn needs model.dtype bfloat16"):
        sa.resolve_impl("cudnn", 512, f32, "gpu")
    assert sa.resolve_impl("cudnn", 512, f32, "cpu", check=False) == "cudnn"  # the planner
    with pytest.raises(ConfigError, match="model.attention_impl must be one of"):
        ModelConfig(attention_impl="flash")
    # In a model on CPU, the error surfaces when the forward is traced.
    params = helpers.random_params(helpers.DECODE_ATTN, False, seed=0)
    cfg = dataclasses.replace(helpers.DECODE_ATTN, attention_impl="cudnn")
    with pytest.raises(ConfigError, match="cudnn does not run on this cpu backend"):
        PipoLM(cfg, False).apply({"params": params}, jnp.ones((1, 8), jnp.int32))


def test_a_stage_refuses_an_unavailable_form_before_building_anything(tmp_path):
    from pathlib import Path

    from pipo_jax.config import load_config
    from pipo_jax.train.supervised import train_stage

    micro = Path(__file__).resolve().parents[1] / "configs" / "micro.yaml"
    cfg = load_config(micro, [f"run_dir={tmp_path / 'run'}", f"data.data_dir={tmp_path / 'd'}",
                              "model.attention_impl=splash"])
    with pytest.raises(ConfigError, match="splash does not run on this cpu backend"):
        train_stage(cfg, "ar", progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "d").exists()


def test_remat_policies_give_the_same_loss_and_gradients_and_layer_remat_peaks_lower():
    """``model.remat_policy`` only changes what the backward pass recomputes: PIPO's SFT loss
    and gradients (with LoRA dropout drawing its masks inside the rematerialised layers) are
    the same under ``none``, ``full`` (a block of the layer pattern) and ``layer`` (each
    decoder layer); and rematerialising layer by layer holds fewer temporaries than a block."""
    from pipo_jax.config import LoraConfig, SftConfig

    lora = LoraConfig(rank=4, alpha=8, dropout=0.25, targets=("q_proj", "down_proj"))
    cfg = dataclasses.replace(helpers.DECODE_HYBRID, vocab_size=64, max_context=256, n_layers=2,
                              layer_types=("linear_attention", "full_attention"))
    params = nn.unbox(init_params(cfg, True, jax.random.key(3), lora))
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(1, 64, size=(2, 96)), jnp.int32)
    mask = jnp.asarray(np.arange(96)[None] >= np.array([[4], [20]]))

    def loss(mcfg: ModelConfig, p):
        out = PipoLM(mcfg, True, lora).apply({"params": p}, tokens,
                                             rngs={"dropout": jax.random.key(7)})
        return sft_loss(out, lm_head(p), tokens, mask, SftConfig())[0]

    steps = {policy: jax.jit(jax.value_and_grad(functools.partial(
        loss, dataclasses.replace(cfg, remat_policy=policy)))).lower(params).compile()
        for policy in ("none", "full", "layer")}
    want = steps["none"](params)
    for policy in ("full", "layer"):
        got = steps[policy](params)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
        # Recomputed, not stored: the same float32 arithmetic, fused in another order.
        chex.assert_trees_all_close(got[1], want[1], rtol=1e-4, atol=1e-5)
    temp = {k: c.memory_analysis().temp_size_in_bytes for k, c in steps.items()}
    assert temp["layer"] < temp["full"] < temp["none"], temp

"""bfloat16 compute (the accelerator configs) runs end to end on a micro model."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from pipo_jax.config import ModelConfig, SftConfig, load_config
from pipo_jax.decode import engine as dec
from pipo_jax.decode import sampling
from pipo_jax.model.pipo import PipoLM, init_params
from pipo_jax.train.losses import sft_loss
from pipo_jax.train.state import TrainState, make_optimizer
from pipo_jax.train.supervised import train_step

CFG = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  mlp_dim=64, max_context=64, dtype="bfloat16")


def test_accelerator_config_uses_bfloat16_compute():
    cfg = load_config("configs/accelerator.yaml")
    assert cfg.model.dtype == "bfloat16" and cfg.model.param_dtype == "float32"


def test_bf16_train_step_and_decode():
    params = nn.unbox(init_params(CFG, True, jax.random.key(0)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 1, CFG.vocab_size)
    out = PipoLM(CFG, True).apply({"params": params}, tokens)
    assert out["h"].dtype == jnp.bfloat16 and out["conf_logits"].dtype == jnp.float32
    tc = SftConfig(steps=4, loss_chunk=8)
    tx = make_optimizer(tc)
    st = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
    batch = {"tokens": tokens, "loss_mask": jnp.ones_like(tokens, bool)}
    step = jax.jit(lambda s, b: train_step(s, b, mcfg=CFG, tc=tc, pipo=True, tx=tx))
    losses = []
    for _ in range(3):
        st, metrics = step(st, batch)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(st.params))
    loss, _ = sft_loss(out, params["embedder"]["embedding"], tokens,
                       jnp.ones_like(tokens, bool), tc)
    assert np.isfinite(float(loss))

    prompts, valid = dec.prepare_prompts([[3, 4, 5], [6, 7]], True, 0, 8, 8, CFG.max_context)
    decoder = dec.Decoder(dec.DecodeSpec(CFG, True, sampling.SamplingParams(), 8, 0, 1,
                                         draft=True))
    thr = np.float32(-1.0)
    state = decoder.prefill(st.params, prompts, valid, sampling.request_keys([0, 1]), thr)
    state = decoder.loop(st.params, state, thr)
    assert state.cache.layers[0].k.dtype == jnp.bfloat16
    assert np.all(np.asarray(state.n_tokens) == 8)

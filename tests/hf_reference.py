"""Tiny, fully randomised Hugging Face reference models for parity tests (torch on CPU).

Import only after ``pytest.importorskip("torch")`` and ``("transformers")``. Nothing here touches
the network: every model is built from a config object and randomised in place, so that a port
which confuses the ``w`` and ``1 + w`` norm conventions cannot pass by matching the HF init
(QWEN3_5.md §5).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import torch
from flax import linen as nn
from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig, Qwen3Config, Qwen3ForCausalLM
from transformers.modeling_layers import MtpModel

from pipo_jax.config import ModelConfig
from pipo_jax.model.pipo import init_params

# MtpModel parameter names → Qwen3.5 checkpoint names (QWEN3_5.md §2.6).
MTP_RENAMES = (("layers.0.enorm.", "mtp.pre_fc_norm_embedding."),
               ("layers.0.hnorm.", "mtp.pre_fc_norm_hidden."),
               ("layers.0.eh_proj.", "mtp.fc."),
               ("layers.0.mtp_block.", "mtp.layers.0."),
               ("layers.0.post_norm.", "mtp.norm."))


def qwen3_5_config(tie: bool) -> Qwen3_5TextConfig:
    """8 layers, ``[linear ×3, full] × 2``; partial RoPE (8 of 32 dims); GQA in both mixers."""
    return Qwen3_5TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=8,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
        linear_conv_kernel_dim=4, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        rope_parameters={"rope_type": "default", "rope_theta": 2e4,
                         "partial_rotary_factor": 0.25})


def qwen3_config(tie: bool) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": 1e6})


def randomize_(module: torch.nn.Module, seed: int, plain_norms: bool,
               skip: tuple[str, ...] = ()) -> None:
    """Overwrites every parameter (except names starting with ``skip``) in place.

    Norm weights ``0.3·N`` (``1 + 0.3·N`` with ``plain_norms``: Qwen3's ``w·x̂``), ``A_log =
    log U(0.01, 2)``, ``dt_bias = 0.5·N``, everything else ``0.15·N``. A tied head is one tensor,
    randomised once.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith(skip):
                continue
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 1.99 + 0.01))
            elif name.endswith("dt_bias"):
                p.copy_(noise * 0.5)
            elif "norm" in name:
                p.copy_(noise * 0.3 + (1.0 if plain_norms else 0.0))
            else:
                p.copy_(noise * 0.15)


def build(family: str, tie: bool, seed: int = 1) -> torch.nn.Module:
    """A randomised ``Qwen3_5ForCausalLM`` / ``Qwen3ForCausalLM`` in eval mode, float32."""
    if family == "qwen3_5":
        model = Qwen3_5ForCausalLM(qwen3_5_config(tie))
    else:
        model = Qwen3ForCausalLM(qwen3_config(tie))
    model = model.eval().float()
    randomize_(model, seed, plain_norms=family == "qwen3")
    return model


def checkpoint(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The tensors ``save_pretrained`` writes: the state_dict as numpy, without the tied head."""
    out = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        out.pop("lm_head.weight")
    return out


def build_mtp(main: torch.nn.Module, seed: int = 7) -> MtpModel:
    """HF's generic one-layer MTP module on ``main`` (shared embedding and head), randomised."""
    main.config.num_mtp_layers = 1
    main.config.mtp_layer_types = ["full_attention"]
    mtp = MtpModel(main, 1).eval().float()
    randomize_(mtp, seed, plain_norms=False, skip=("embed_tokens.", "shared_head."))
    return mtp


def mtp_checkpoint(mtp: MtpModel) -> dict[str, np.ndarray]:
    """``mtp``'s own parameters under Qwen3.5's checkpoint names ``mtp.*``."""
    out = {}
    for name, p in mtp.named_parameters():
        if name.startswith(("embed_tokens.", "shared_head.")):
            continue
        for ours, theirs in MTP_RENAMES:
            if name.startswith(ours):
                out[theirs + name[len(ours):]] = p.detach().cpu().numpy().copy()
                break
        else:
            raise AssertionError(f"unexpected MtpModel parameter {name}")
    return out


@functools.cache
def _shapes(cfg: ModelConfig, pipo: bool) -> dict:
    return jax.eval_shape(lambda k: nn.unbox(init_params(cfg, pipo, k)), jax.random.key(0))


def empty_tree(cfg: ModelConfig, pipo: bool) -> dict:
    """A fresh mutable numpy tree of ``init_params``' shapes, all NaN (traced once per config,
    never compiled).

    NaN makes any parameter that a loader forgets to write poison the output.
    """
    return jax.tree.map(lambda s: np.full(s.shape, np.nan, s.dtype), _shapes(cfg, pipo))

"""Helpers shared by the test modules (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from pipo_jax.config import LoraConfig, ModelConfig
from pipo_jax.model.pipo import init_params


def random_params(cfg: ModelConfig, pipo: bool, seed: int, std: float = 0.2,
                  bias_std: float = 0.1, scale_std: float = 0.1,
                  lora: LoraConfig | None = None, drafter: bool = False) -> dict:
    """Random parameters of ``init_params``' shapes, built in numpy (no XLA compile for init).

    Kernels and embeddings ``N(0, std²)``, norm scales ``1 + scale_std·N``, biases
    ``bias_std·N``: every module, compressor and norms included, is far from the identity.
    With ``lora``, the adapters are random too (``B`` non-zero), so they change the model.
    ``drafter``: the AR model with its MTP drafter (``PipoLM(pipo=False, drafter=True)``).
    """
    shapes = jax.eval_shape(lambda k: nn.unbox(init_params(cfg, pipo, k, lora, drafter)),
                            jax.random.key(0))
    rng = np.random.default_rng(seed)

    def leaf(path: tuple, s: jax.ShapeDtypeStruct) -> jax.Array:
        x = rng.normal(size=s.shape)
        name = path[-1].key
        x = 1.0 + scale_std * x if name == "scale" else (bias_std if name == "bias" else std) * x
        return jnp.asarray(x, jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, shapes)


# The two small shapes the decode-engine and speculative tests run on: all full attention (GQA),
# and the Qwen3.5 hybrid (Gated DeltaNet and gated attention, alternating; partial RoPE).
DECODE_ATTN = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                          head_dim=8, mlp_dim=64, max_context=96, compressor_init="random",
                          init_std=0.2)
DECODE_HYBRID = ModelConfig(vocab_size=40, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2,
                            head_dim=8, mlp_dim=64, max_context=96, compressor_init="random",
                            init_std=0.2, family="qwen3_5",
                            layer_types=("linear_attention", "full_attention") * 2,
                            partial_rotary_factor=0.5, tie_embeddings=False,
                            linear_n_key_heads=2, linear_n_value_heads=4,
                            linear_key_head_dim=8, linear_value_head_dim=4, linear_chunk=4)


# ----------------------------------------------------------------- subprocesses and mounts


@dataclasses.dataclass
class Proc:
    """A finished command: its exit status and its output."""

    returncode: int
    stdout: str
    stderr: str


def describe(p: Proc) -> str:
    return f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"


def mount_tmpfs(path: Path, size: int) -> str | None:
    """Mounts a tmpfs of ``size`` bytes at ``path``; the reason when this machine cannot."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cannot run mount: {e}"
    return None if p.returncode == 0 else f"cannot mount a tmpfs: {p.stderr.strip()}"

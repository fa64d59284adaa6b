"""Reading a run directory's stages for use: which stage a checkpoint holds (its metadata), the
architecture and adapters it was saved with, and its parameters with adapters merged.

Inference loading (``pipo_jax.load``, the converters) comes through here and imports no
training, data-building or metrics code.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jax
from flax import linen as nn
from jax.sharding import Mesh

from pipo_jax.config import (
    DRAFTER_STAGES,
    PIPO_STAGES,
    STAGES,
    Config,
    LoraConfig,
    MeshConfig,
    ModelConfig,
    to_dict,
)
from pipo_jax.errors import CheckpointError
from pipo_jax.io import checkpoint as ckpt
from pipo_jax.model import lora as lora_lib
from pipo_jax.model import sharding
from pipo_jax.model.pipo import init_params

# Model settings that change how the step computes, not what the parameters are: a run may
# resume (or an imported model start) with other values, e.g. bf16 compute and remat on an
# accelerator for a checkpoint converted in float32.
COMPUTE_ONLY_FIELDS = frozenset({"dtype", "remat_policy", "max_context", "linear_chunk",
                                 "attention_impl", "attention_block"})


def model_diff(saved: ModelConfig, now: ModelConfig) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved, now)}`` of the fields that differ, compute-only fields left out."""
    was, is_ = to_dict(saved), to_dict(now)
    return {k: (v, is_[k]) for k, v in was.items()
            if is_[k] != v and k not in COMPUTE_ONLY_FIELDS}


def stage_of(stage_dir: str | Path, pipo: bool, step: int | None = None) -> str:
    """The stage (one of ``STAGES``) whose checkpoint ``step`` (default: the latest) is in
    ``stage_dir``, as its metadata records it; ``pipo`` says which kind the caller expects.

    Checkpoints written before the metadata existed record nothing: for them the directory's
    name is the stage when it is one (``train.py`` named every stage directory so), else
    ``sft`` for a PIPO and ``ar`` for an AR model. Raises ``CheckpointError`` when the recorded
    stage is not of the expected kind (an AR teacher where PIPO is expected, or the reverse).
    """
    stage_dir = Path(stage_dir)
    stage = ckpt.saved_stage(stage_dir, step)
    if stage is None:  # a legacy checkpoint
        stage = stage_dir.name if stage_dir.name in STAGES else ("sft" if pipo else "ar")
    if (stage in PIPO_STAGES) != pipo:
        want, got = ("a PIPO", "an AR") if pipo else ("an AR", "a PIPO")
        raise CheckpointError(f"{stage_dir} holds {got} model (stage {stage}), where {want} "
                              f"model is expected")
    return stage


def abstract_params(mcfg: ModelConfig, pipo: bool, mesh: Mesh,
                    lora: LoraConfig | None = None, drafter: bool = False) -> Any:
    """Abstract (unboxed) parameters that carry their mesh shardings: a restore target
    (``drafter``: the AR model with its MTP drafter, an ``mtp`` stage's)."""
    boxed = jax.eval_shape(lambda: init_params(mcfg, pipo, jax.random.key(0), lora, drafter))
    abstract, shardings = nn.unbox(boxed), sharding.logical_shardings(boxed, mesh)
    sharding.check_divisible(abstract, shardings)
    return ckpt.abstract_target(abstract, shardings)


def checkpoint_adapters(stage_dir: str | Path, pipo: bool,
                        step: int | None = None) -> tuple[LoraConfig | None, Config]:
    """The LoRA settings of a stage checkpoint's parameters (None: the plain layout), and the
    config saved with it. Params-only checkpoints (imported or merged) are always plain."""
    stage_dir = Path(stage_dir)
    saved = ckpt.restore_config(stage_dir, step)
    lora = getattr(saved, stage_of(stage_dir, pipo, step)).adapters
    if lora is not None and "opt_state" not in ckpt.saved_keys(stage_dir, step):
        lora = None
    return lora, saved


def restore_stage_params(stage_dir: str | Path, pipo: bool, mesh: Mesh,
                         step: int | None = None) -> tuple[Any, Config]:
    """A stage's parameters with any LoRA adapters merged (the plain model layout), sharded on
    ``mesh``, and the config saved with them. The adapter settings are the checkpoint's own; the
    architecture is the saved config's ``model_of(stage)`` (``teacher_model`` for a teacher)."""
    lora, saved = checkpoint_adapters(stage_dir, pipo, step)
    stage = stage_of(stage_dir, pipo, step)
    mcfg = saved.model_of(stage)
    params, saved = ckpt.restore_params(
        stage_dir, abstract_params(mcfg, pipo, mesh, lora, stage in DRAFTER_STAGES), step)
    if lora is not None:
        plain = abstract_params(mcfg, pipo, mesh)
        params = jax.jit(functools.partial(lora_lib.merge, lora=lora),
                         out_shardings=jax.tree.map(lambda a: a.sharding, plain))(params)
    return params, saved


def load_params(stage_dir: str | Path, pipo: bool, step: int | None = None,
                mesh: Mesh | None = None) -> tuple[Any, Config]:
    """Parameters (and the config saved with them) of one training stage, on ``mesh`` (default:
    one device); LoRA adapters are merged into their kernels, so decoding runs the plain model
    at full speed."""
    mesh = mesh or sharding.build_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    return restore_stage_params(stage_dir, pipo, mesh, step)


def latest_pipo_stage(run_dir: str | Path) -> str:
    """The PIPO stage a run is used from by default: ``opd`` once it has a checkpoint, else
    ``sft``."""
    return "opd" if ckpt.latest_step(Path(run_dir) / "opd") is not None else "sft"

"""The whole recipe: the configured stages in order (``teacher``, ``ar``, ``sft``, ``opd``).

Layout of a run directory::

    <run_dir>/config.json            resolved config of the latest invocation
    <run_dir>/ar/checkpoints/<step>   orbax checkpoints (state + config; the stage in metadata)
    <run_dir>/ar/metrics.jsonl, events.*   metrics (JSONL and TensorBoard)
    <run_dir>/sft/...                 the same for the PIPO model
    <run_dir>/teacher/..., opd/...    the larger AR teacher; PIPO after OPD
"""

from __future__ import annotations

from pathlib import Path

from jax.sharding import Mesh

from pipo_jax.config import Config
from pipo_jax.io import diskerrors
from pipo_jax.io.tokenizer import Tokenizer
from pipo_jax.model import sharding
from pipo_jax.train import opd, supervised
from pipo_jax.train.loop import StageResult


def train_stage(cfg: Config, stage: str, tokenizer: Tokenizer | None = None,
                mesh: Mesh | None = None, progress: bool = True) -> StageResult:
    """Trains one stage to ``cfg.<stage>.steps``, resuming from its latest checkpoint."""
    if stage == "opd":
        return opd.train_opd(cfg, tokenizer, mesh, progress)
    return supervised.train_stage(cfg, stage, tokenizer, mesh, progress)


def train(cfg: Config, progress: bool = True) -> list[StageResult]:
    """Runs the configured stages in order (``teacher``, ``ar``, ``sft``, ``opd``)."""
    with diskerrors.reporting(cfg.run_dir, "create the run directory",
                              "set run_dir elsewhere"):
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    mesh = sharding.build_mesh(cfg.mesh)
    return [train_stage(cfg, stage, mesh=mesh, progress=progress) for stage in cfg.stages]

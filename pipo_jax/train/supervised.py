"""The teacher-forced stages: ``teacher`` and ``ar`` (the AR objective), ``mtp`` (the MTP
drafter on the frozen AR model) and ``sft`` (PIPO, SPEC §4): the jitted step and the stage's
run."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from pipo_jax.config import PIPO_STAGES, Config, ModelConfig, TrainConfig
from pipo_jax.data.loader import make_train_dataset
from pipo_jax.io.tokenizer import Tokenizer
from pipo_jax.model import sharding
from pipo_jax.model.pipo import PipoLM, lm_head
from pipo_jax.model.self_attention import check_impl
from pipo_jax.train.loop import StageResult, run_steps
from pipo_jax.train.losses import ar_loss, mtp_loss, sft_loss, term_totals
from pipo_jax.train.state import (
    TrainState,
    apply_accumulated_update,
    apply_update,
    check_same_model,
    check_tokenizer,
    make_optimizer,
    setup_state,
)


def objective_name(tc: TrainConfig, pipo: bool) -> str:
    """``sft`` (PIPO), ``mtp`` (the drafter: ``tc.tuner == "mtp"``) or ``ar``."""
    return "sft" if pipo else ("mtp" if tc.tuner == "mtp" else "ar")


def stage_loss(params: Any, rngs: dict[str, jax.Array], *, batch: dict[str, jax.Array],
               mcfg: ModelConfig, tc: TrainConfig, pipo: bool,
               totals: dict[str, jax.Array] | None = None
               ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The ``ar``/``teacher`` (``pipo=False``), ``mtp`` (``tc.tuner == "mtp"``: the drafter)
    or ``sft`` objective of one batch: ``(params, rngs) → (loss, metrics)``; ``batch`` as in
    ``train_step``; ``totals``: the whole batch's denominators when ``batch`` is a micro-batch
    of it (``losses.term_totals``)."""
    name = objective_name(tc, pipo)
    model = PipoLM(mcfg, pipo, tc.adapters, drafter=name == "mtp")
    objective = {"sft": sft_loss, "mtp": mtp_loss, "ar": ar_loss}[name]
    kwargs = {"detach_confidence_inputs": tc.detach_confidence_inputs} if pipo else {}
    out = model.apply({"params": params}, batch["tokens"], rngs=rngs, **kwargs)
    return objective(out, lm_head(params), batch["tokens"], batch["loss_mask"], tc, totals)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, mcfg: ModelConfig,
               tc: TrainConfig, pipo: bool,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step of the ``ar``/``teacher``/``sft`` objective:
    ``(state, batch) → (state, metrics)``.

    ``batch`` holds ``tokens`` B×T int32 and ``loss_mask`` B×T bool. PAD augmentation happens
    on the host, seeded by the step; the only randomness in the step is LoRA dropout. With
    ``tc.grad_accum`` > 1 the batch runs as that many scanned micro-batches, each loss taken
    with the whole batch's denominators, so the step is the big batch's.
    """
    loss = functools.partial(stage_loss, mcfg=mcfg, tc=tc, pipo=pipo)
    if tc.grad_accum == 1:
        return apply_update(state, tc, tx, functools.partial(loss, batch=batch))
    totals = term_totals(objective_name(tc, pipo), batch["loss_mask"], tc.loss_average)
    return apply_accumulated_update(
        state, tc, tx, lambda p, r, mb: loss(p, r, batch=mb, totals=totals), batch)


def train_stage(cfg: Config, stage: str, tokenizer: Tokenizer | None = None,
                mesh: Mesh | None = None, progress: bool = True) -> StageResult:
    """Trains one stage to ``cfg.<stage>.steps``, resuming from its latest checkpoint."""
    if stage not in ("teacher", "ar", "mtp", "sft"):
        raise ValueError(f"{stage} is not a teacher-forced stage (train_stage: teacher, ar, "
                         f"mtp, sft)")
    tc: TrainConfig = getattr(cfg, stage)
    check_impl(cfg.model_of(stage))
    tokenizer = check_tokenizer(cfg, tokenizer)
    mesh = mesh or sharding.build_mesh(cfg.mesh)
    sharding.check_batch(mesh, tc.batch_size, f"{stage}.batch_size")
    stage_dir = Path(cfg.run_dir) / stage
    check_same_model(stage_dir, cfg, stage)
    # Before any model work: a bad data file fails in seconds, not after a large restore.
    data = make_train_dataset(cfg, tokenizer, stage)
    tx = make_optimizer(tc)
    # Programs traced in the mesh context place the model's activation constraints on it.
    with jax.set_mesh(mesh):
        state, start, shardings = setup_state(cfg, stage, mesh, tx)
        if start >= tc.steps:
            return StageResult(stage_dir, start, {}, 0.0)
        step_fn = jit_train_step(cfg, stage, tx, mesh, shardings)

        def advance(state: TrainState, step: int) -> tuple[TrainState, dict[str, jax.Array],
                                                            float]:
            b = data[step]
            batch = sharding.global_batch({k: b[k] for k in ("tokens", "loss_mask")}, mesh)
            state, metrics = step_fn(state, batch)
            return state, metrics, float(b["pad_ratio"])

        return run_steps(cfg, stage, state, start, advance,
                         lambda step, host, pad_ratio: {"pad_ratio": pad_ratio}, progress)


def jit_train_step(cfg: Config, stage: str, tx: optax.GradientTransformation, mesh: Mesh,
                   shardings: Any) -> Callable[[TrainState, dict[str, jax.Array]],
                                               tuple[TrainState, dict[str, jax.Array]]]:
    """``train_step`` of ``stage`` compiled for ``mesh``: the state in and out with its
    ``shardings`` (donated), the batch split over the batch axes, metrics replicated."""
    batch_sh = sharding.batch_sharding(mesh)
    return jax.jit(
        functools.partial(train_step, mcfg=cfg.model_of(stage), tc=getattr(cfg, stage),
                          pipo=stage in PIPO_STAGES, tx=tx),
        in_shardings=(shardings, {"tokens": batch_sh, "loss_mask": batch_sh}),
        out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))


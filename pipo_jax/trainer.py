"""Training stages ``teacher``, ``ar`` and ``sft`` (SPEC §4), and the loop ``opd`` shares
(``distill.py``): sharded jitted step, checkpoints, metrics.

Layout of a run directory::

    <run_dir>/config.json            resolved config of the latest invocation
    <run_dir>/ar/checkpoints/<step>   orbax checkpoints (state + config)
    <run_dir>/ar/metrics.jsonl, events.*   metrics (JSONL and TensorBoard)
    <run_dir>/sft/...                 the same for the PIPO model
    <run_dir>/teacher/..., opd/...    the larger AR teacher; PIPO after OPD
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh
from tqdm.auto import tqdm

from pipo_jax import checkpoint as ckpt
from pipo_jax import lora as lora_lib
from pipo_jax import sharding
from pipo_jax.config import (
    PIPO_STAGES,
    STAGES,
    Config,
    LoraConfig,
    ModelConfig,
    TrainConfig,
    save_config,
    to_dict,
)
from pipo_jax.data import make_train_dataset
from pipo_jax.losses import ar_loss, sft_loss
from pipo_jax.metrics import MetricWriter
from pipo_jax.model import PipoLM, init_params, lm_head, pipo_from_ar
from pipo_jax.tokenizer import Tokenizer, run_tokenizer


class TrainingError(RuntimeError):
    """Training cannot go on (NaN loss, missing prerequisite stage, config mismatch)."""


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


def make_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup over ``warmup_frac`` of the steps, then cosine decay to ``end_lr_frac``."""
    warmup = int(tc.warmup_frac * tc.steps)
    return optax.warmup_cosine_decay_schedule(
        0.0, tc.learning_rate, max(warmup, 1), max(tc.steps, warmup + 1),
        end_value=tc.learning_rate * tc.end_lr_frac)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """AdamW on ``make_schedule`` with global-norm clipping; weight decay skips vectors (norm
    scales, biases)."""
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(make_schedule(tc), b1=tc.b1, b2=tc.b2, weight_decay=tc.weight_decay,
                    mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)))


# Salt that keeps the LoRA dropout stream apart from parameter initialisation.
_DROPOUT_SALT = 0xD120


def state_shardings(mcfg: ModelConfig, pipo: bool, tx: optax.GradientTransformation,
                    mesh: Mesh, tuner: str = "full",
                    lora: LoraConfig | None = None) -> tuple[Any, Any]:
    """(abstract unboxed state, its shardings) derived from the logical axis names.

    The optimizer state covers only the parameters ``tuner`` trains (``lora.partition``).
    """
    boxed = jax.eval_shape(lambda: init_params(mcfg, pipo, jax.random.key(0), lora))
    boxed_opt = jax.eval_shape(tx.init, lora_lib.partition(boxed, tuner)[0])
    boxed_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=boxed,
                             opt_state=boxed_opt)
    shardings = sharding.logical_shardings(boxed_state, mesh)
    abstract = nn.unbox(boxed_state)
    sharding.check_divisible(abstract, shardings, "train state leaf")
    return abstract, shardings


def abstract_params(mcfg: ModelConfig, pipo: bool, mesh: Mesh,
                    lora: LoraConfig | None = None) -> Any:
    """Abstract (unboxed) parameters that carry their mesh shardings: a restore target."""
    boxed = jax.eval_shape(lambda: init_params(mcfg, pipo, jax.random.key(0), lora))
    abstract, shardings = nn.unbox(boxed), sharding.logical_shardings(boxed, mesh)
    sharding.check_divisible(abstract, shardings)
    return ckpt.abstract_target(abstract, shardings)


def dropout_rngs(tc: TrainConfig, step: jax.Array) -> dict[str, jax.Array]:
    """LoRA dropout keys for ``step``, drawn from ``(tc.seed, step)`` so that a resumed run draws
    the same masks; empty when the stage has no adapter dropout."""
    lora = tc.adapters
    if lora is None or lora.dropout <= 0:
        return {}
    return {"dropout": jax.random.fold_in(
        jax.random.fold_in(jax.random.key(tc.seed), _DROPOUT_SALT), step)}


def apply_update(state: TrainState, tc: TrainConfig, tx: optax.GradientTransformation,
                 loss_fn: Callable[[Any, dict[str, jax.Array]],
                                   tuple[jax.Array, dict[str, jax.Array]]],
                 ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on ``loss_fn(params, rngs) → (loss, metrics)``.

    Gradients, clipping and optimizer state cover only the parameters ``tc.tuner`` trains; the
    frozen ones are passed through unchanged (and no gradient is computed for them).
    """
    train_params, frozen = lora_lib.partition(state.params, tc.tuner)
    rngs = dropout_rngs(tc, state.step)
    (_, metrics), grads = jax.value_and_grad(
        lambda tp: loss_fn(lora_lib.combine(tp, frozen), rngs), has_aux=True)(train_params)
    updates, opt_state = tx.update(grads, state.opt_state, train_params)
    params = lora_lib.combine(optax.apply_updates(train_params, updates), frozen)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                   learning_rate=make_schedule(tc)(state.step))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def stage_loss(params: Any, rngs: dict[str, jax.Array], *, batch: dict[str, jax.Array],
               mcfg: ModelConfig, tc: TrainConfig,
               pipo: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The ``ar``/``teacher`` (``pipo=False``) or ``sft`` objective of one batch:
    ``(params, rngs) → (loss, metrics)``; ``batch`` as in ``train_step``."""
    model = PipoLM(mcfg, pipo, tc.adapters)
    objective = sft_loss if pipo else ar_loss
    kwargs = {"detach_confidence_inputs": tc.detach_confidence_inputs} if pipo else {}
    out = model.apply({"params": params}, batch["tokens"], rngs=rngs, **kwargs)
    return objective(out, lm_head(params), batch["tokens"], batch["loss_mask"], tc)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, mcfg: ModelConfig,
               tc: TrainConfig, pipo: bool,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step of the ``ar``/``teacher``/``sft`` objective:
    ``(state, batch) → (state, metrics)``.

    ``batch`` holds ``tokens`` B×T int32 and ``loss_mask`` B×T bool. PAD augmentation happens
    on the host, seeded by the step; the only randomness in the step is LoRA dropout.
    """
    return apply_update(state, tc, tx, functools.partial(stage_loss, batch=batch, mcfg=mcfg,
                                                         tc=tc, pipo=pipo))


@dataclasses.dataclass
class StageResult:
    stage_dir: Path
    steps: int
    final_metrics: dict[str, float]
    seconds: float


# Model settings that change how the step computes, not what the parameters are: a run may
# resume (or an imported model start) with other values, e.g. bf16 compute and remat on an
# accelerator for a checkpoint converted in float32.
COMPUTE_ONLY_FIELDS = frozenset({"dtype", "remat_policy", "max_context", "linear_chunk"})


def model_diff(saved: ModelConfig, now: ModelConfig) -> dict[str, tuple[Any, Any]]:
    """``{field: (saved, now)}`` of the fields that differ, compute-only fields left out."""
    was, is_ = to_dict(saved), to_dict(now)
    return {k: (v, is_[k]) for k, v in was.items()
            if is_[k] != v and k not in COMPUTE_ONLY_FIELDS}


def _check_same_model(stage_dir: Path, cfg: Config, stage: str) -> None:
    """Refuses to resume a stage whose checkpoints were trained with another model config or
    another set of adapters (a params-only checkpoint, an imported model, starts any tuner)."""
    latest = ckpt.latest_step(stage_dir)
    if latest is None:
        return
    saved = ckpt.restore_config(stage_dir)
    diff = model_diff(saved.model_of(stage), cfg.model_of(stage))
    if diff:
        raise TrainingError(
            f"{stage_dir} holds checkpoints of a different model (saved vs now: {diff}); use a "
            f"new run_dir or the saved model settings")
    if "opt_state" not in ckpt.saved_keys(stage_dir, latest):
        return
    was, now_tc = getattr(saved, stage), getattr(cfg, stage)
    if (was.tuner, was.adapters) != (now_tc.tuner, now_tc.adapters):
        raise TrainingError(
            f"{stage_dir} holds a run trained with {stage}.tuner {was.tuner} (adapters "
            f"{was.adapters}), but the config now says {now_tc.tuner} ({now_tc.adapters}); "
            f"resume with the saved settings, or start a new run_dir from a merged copy "
            f"(python -m pipo_jax.convert merge-lora)")


def _stage_name(stage_dir: Path, pipo: bool) -> str:
    return stage_dir.name if stage_dir.name in STAGES else ("sft" if pipo else "ar")


def checkpoint_adapters(stage_dir: str | Path, pipo: bool,
                        step: int | None = None) -> tuple[LoraConfig | None, Config]:
    """The LoRA settings of a stage checkpoint's parameters (None: the plain layout), and the
    config saved with it. Params-only checkpoints (imported or merged) are always plain."""
    stage_dir = Path(stage_dir)
    saved = ckpt.restore_config(stage_dir, step)
    lora = getattr(saved, _stage_name(stage_dir, pipo)).adapters
    if lora is not None and "opt_state" not in ckpt.saved_keys(stage_dir, step):
        lora = None
    return lora, saved


def restore_stage_params(stage_dir: str | Path, pipo: bool, mesh: Mesh,
                         step: int | None = None) -> tuple[Any, Config]:
    """A stage's parameters with any LoRA adapters merged (the plain model layout), sharded on
    ``mesh``, and the config saved with them. The adapter settings are the checkpoint's own; the
    architecture is the saved config's ``model_of(stage)`` (``teacher_model`` for a teacher)."""
    lora, saved = checkpoint_adapters(stage_dir, pipo, step)
    mcfg = saved.model_of(_stage_name(Path(stage_dir), pipo))
    params, saved = ckpt.restore_params(stage_dir, abstract_params(mcfg, pipo, mesh, lora), step)
    if lora is not None:
        plain = abstract_params(mcfg, pipo, mesh)
        params = jax.jit(functools.partial(lora_lib.merge, lora=lora),
                         out_shardings=jax.tree.map(lambda a: a.sharding, plain))(params)
    return params, saved


def restore_prerequisite(stage_dir: Path, pipo: bool, mesh: Mesh, needed_by: str,
                         remedy: str) -> tuple[Any, Config]:
    """``restore_stage_params`` of a stage another one starts from; an unusable checkpoint is a
    ``TrainingError`` that says which stage needs it (``needed_by``) and what to do."""
    try:
        return restore_stage_params(stage_dir, pipo, mesh)
    except ckpt.CheckpointError as e:
        raise TrainingError(f"{needed_by} in {stage_dir}, which is not usable; {remedy}. "
                            f"Details: {e}") from e


def attach_adapters(mcfg: ModelConfig, pipo: bool, lora: LoraConfig | None, base: Any,
                     rng: jax.Array) -> Any:
    """``base`` (plain layout) plus freshly initialised adapters (A random, B zero)."""
    if lora is None:
        return base
    fresh = nn.unbox(init_params(mcfg, pipo, rng, lora))  # only its adapters survive (DCE)
    return lora_lib.with_adapters(base, fresh)


def _init_state(cfg: Config, stage: str, tx: optax.GradientTransformation, shardings: Any,
                mesh: Mesh, base: Any = None, start: int = 0) -> TrainState:
    """A fresh state: from ``base`` parameters (plain layout) when given, else from scratch
    (``teacher``, ``ar``) or from the AR stage of the run (``sft``). Adapters are added and the
    optimizer initialised for the parameters ``tuner`` trains. (``opd`` always has a ``base``:
    the student's SFT parameters.)"""
    tc: TrainConfig = getattr(cfg, stage)
    lora = tc.adapters
    pipo = stage in PIPO_STAGES
    mcfg = cfg.model_of(stage)
    rng, adapter_rng = jax.random.split(jax.random.key(tc.seed))
    attach = functools.partial(attach_adapters, mcfg, pipo, lora)
    if base is not None:
        params = jax.jit(attach, out_shardings=shardings.params)(base, adapter_rng)
    elif not pipo:
        params = jax.jit(lambda r: nn.unbox(init_params(mcfg, False, r, lora)),
                         out_shardings=shardings.params)(rng)
    elif stage == "sft":
        ar_params, _ = restore_prerequisite(
            Path(cfg.run_dir) / "ar", False, mesh, "the sft stage starts from the AR model",
            "train the ar stage first (stages=[ar, sft])")
        params = jax.jit(lambda a, r, ra: attach(pipo_from_ar(mcfg, a, r), ra),
                         out_shardings=shardings.params)(ar_params, rng, adapter_rng)
    else:
        raise ValueError(f"stage {stage} needs base parameters")
    opt_state = jax.jit(lambda p: tx.init(lora_lib.partition(p, tc.tuner)[0]),
                        out_shardings=shardings.opt_state)(params)
    return TrainState(step=jnp.int32(start), params=params, opt_state=opt_state)


def _fmt(x: float) -> str:
    return f"{x:.3f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def check_tokenizer(cfg: Config, tokenizer: Tokenizer | None) -> Tokenizer:
    tokenizer = tokenizer or run_tokenizer(cfg.tokenizer, cfg.run_dir, cfg.model.vocab_size)
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise TrainingError(f"model.vocab_size is {cfg.model.vocab_size} but the tokenizer has "
                            f"{tokenizer.vocab_size} tokens")
    return tokenizer


def setup_state(cfg: Config, stage: str, mesh: Mesh, tx: optax.GradientTransformation,
                base: Callable[[], Any] | None = None) -> tuple[TrainState, int, Any]:
    """The stage's state: resumed from its latest checkpoint, else fresh (``_init_state``;
    ``base()`` gives starting parameters when the stage has them). Returns the state, its step
    and the state shardings."""
    tc: TrainConfig = getattr(cfg, stage)
    pipo = stage in PIPO_STAGES
    stage_dir = Path(cfg.run_dir) / stage
    abstract, shardings = state_shardings(cfg.model_of(stage), pipo, tx, mesh, tc.tuner,
                                          tc.adapters)
    start = ckpt.latest_step(stage_dir)
    if start is not None and "opt_state" not in ckpt.saved_keys(stage_dir, start):
        # A params-only checkpoint (an imported or merged model): train from its weights with
        # fresh adapters and a fresh optimizer.
        params, _ = restore_stage_params(stage_dir, pipo, mesh, start)
        return _init_state(cfg, stage, tx, shardings, mesh, base=params, start=start), start, \
            shardings
    if start is not None:
        state, _ = ckpt.restore(stage_dir, ckpt.abstract_target(abstract, shardings))
        return state, int(state.step), shardings
    return _init_state(cfg, stage, tx, shardings, mesh, base=base() if base else None), 0, \
        shardings


# ``advance(state, step) → (state, device metrics, host info)``: one optimiser step.
Advance = Callable[[TrainState, int], tuple[TrainState, dict[str, jax.Array], Any]]
# ``summarise(step, host metrics, host info) → extra scalars``, run one step late on the host.
Summarise = Callable[[int, dict[str, Any], Any], dict[str, float]]


def run_steps(cfg: Config, stage: str, state: TrainState, start: int, advance: Advance,
              summarise: Summarise | None = None, progress: bool = True) -> StageResult:
    """The training loop shared by every stage: steps ``start … steps-1``, metrics (JSONL and
    TensorBoard), progress bar, NaN guard and checkpoints every ``ckpt_every`` steps.

    The host side of a step (reading its metrics) runs one step late, so that the device never
    waits on the host. Non-scalar metrics (e.g. OPD's rollout tokens) are for ``summarise`` only.
    Checkpoints are written asynchronously; the loop waits for a save only when it is stopped
    and at the end (closing the manager), where a failed write raises.

    SIGTERM or SIGINT (``ckpt.StopSignals``; in a multi-process job, JAX's preemption sync point)
    stops the loop after the current step: that step's metrics are checked (NaN guard) and
    logged, its state is saved and committed, the files are closed, the previous signal
    handlers restored, and ``ckpt.Preempted`` is raised. Running the stage again resumes from
    that step and reproduces the uninterrupted run exactly: batches and dropout keys are
    functions of the step, and the saved state is the whole training state.

    In a multi-process job every process runs this loop (and every save; orbax coordinates
    them); only process 0 writes metrics and shows the progress bar.
    """
    tc: TrainConfig = getattr(cfg, stage)
    stage_dir = Path(cfg.run_dir) / stage
    lead = jax.process_index() == 0
    final: dict[str, float] = {}
    t0 = time.time()
    tokens_seen = 0
    pending: tuple[int, dict[str, jax.Array], Any] | None = None
    stopped: tuple[int, int] | None = None  # (signal, step saved)
    # Context managers close the metric files, the bar and the checkpoint manager (waiting for
    # an in-flight save) also when a step raises. StopSignals is outermost so that a signal
    # during the final save or close is still only recorded, not fatal.
    with ckpt.StopSignals() as signals, \
            MetricWriter(stage_dir, prefix=stage) as writer, \
            tqdm(total=tc.steps, initial=start, desc=stage, disable=not (progress and lead),
                 unit="step", dynamic_ncols=True) as bar, \
            ckpt.open_manager(stage_dir, tc.keep_checkpoints,
                              keep_every=tc.keep_every) as manager:
        if lead:
            save_config(cfg, Path(cfg.run_dir) / "config.json")

        def finish(step: int, metrics: dict[str, jax.Array], info: Any) -> None:
            nonlocal final, tokens_seen
            # Not jax.device_get: in a multi-process job the replicated metrics span devices of
            # other processes; to_host reads a local replica (and gathers sharded values).
            got = sharding.to_host(metrics)
            host = {k: float(v) for k, v in got.items() if getattr(v, "ndim", 0) == 0}
            if not math.isfinite(host["loss"]):
                raise TrainingError(
                    f"{stage} loss is {host['loss']} at step {step + 1}; nothing was saved after "
                    f"the last good checkpoint. Lower {stage}.learning_rate or check the data.")
            if summarise is not None:
                host.update(summarise(step, got, info))
            tokens_seen += int(host["target_tokens"])
            host["tokens_per_second"] = tokens_seen / max(time.time() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=_fmt(host["loss"]), tok_s=f"{host['tokens_per_second']:.0f}")
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
                writer.write_scalars(step + 1, host)
            final = host

        for step in range(start, tc.steps):
            state, metrics, info = advance(state, step)
            if pending is not None:
                finish(*pending)
            pending = (step, metrics, info)
            # Polled every step on every process: in a multi-process job it is a sync point.
            signum = signals.requested(manager, step + 1)
            if signum is not None or (step + 1) % tc.ckpt_every == 0 or step + 1 == tc.steps:
                finish(*pending)  # the loss must be known finite before its state is saved
                pending = None
                # A stopping process is about to exit: wait until the step is committed.
                ckpt.save(manager, step + 1, state, cfg, force=True, wait=signum is not None)
            if signum is not None:
                stopped = (signum, step + 1)
                break
        if pending is not None:
            finish(*pending)
    if stopped is None and signals.signum is not None:
        # The signal came after the last step's check: that step is saved (the final step
        # always is, and closing the manager committed it), so stop before any next stage.
        stopped = (signals.signum, tc.steps)
    if stopped is not None:
        signum, step = stopped
        raise ckpt.Preempted(
            f"{stage} stopped by {ckpt.signal_name(signum)} after step {step} of {tc.steps}; "
            f"checkpoint {step} is saved in {ckpt.checkpoint_dir(stage_dir)}; run the same "
            f"command again to resume", signum, step)
    return StageResult(stage_dir, tc.steps, final, time.time() - t0)


def train_stage(cfg: Config, stage: str, tokenizer: Tokenizer | None = None,
                mesh: Mesh | None = None, progress: bool = True) -> StageResult:
    """Trains one stage to ``cfg.<stage>.steps``, resuming from its latest checkpoint."""
    if stage == "opd":
        from pipo_jax.distill import train_opd  # distill builds on this module

        return train_opd(cfg, tokenizer, mesh, progress)
    tc: TrainConfig = getattr(cfg, stage)
    tokenizer = check_tokenizer(cfg, tokenizer)
    mesh = mesh or sharding.build_mesh(cfg.mesh)
    sharding.check_batch(mesh, tc.batch_size, f"{stage}.batch_size")
    stage_dir = Path(cfg.run_dir) / stage
    _check_same_model(stage_dir, cfg, stage)
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


def train(cfg: Config, progress: bool = True) -> list[StageResult]:
    """Runs the configured stages in order (``teacher``, ``ar``, ``sft``, ``opd``)."""
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    mesh = sharding.build_mesh(cfg.mesh)
    return [train_stage(cfg, stage, mesh=mesh, progress=progress) for stage in cfg.stages]

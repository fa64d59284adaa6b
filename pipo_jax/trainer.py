"""Training stages ``ar`` and ``sft`` (SPEC §4): sharded jitted step, checkpoints, metrics.

Layout of a run directory::

    <run_dir>/config.json            resolved config of the latest invocation
    <run_dir>/ar/checkpoints/<step>   orbax checkpoints (state + config)
    <run_dir>/ar/metrics.jsonl, events.*   metrics (JSONL and TensorBoard)
    <run_dir>/sft/...                 the same for the PIPO model
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
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
from pipo_jax import sharding
from pipo_jax.config import Config, ModelConfig, TrainConfig, save_config, to_dict
from pipo_jax.data import make_train_dataset
from pipo_jax.losses import ar_loss, sft_loss
from pipo_jax.metrics import MetricWriter
from pipo_jax.model import PipoLM, init_params, pipo_from_ar
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


def state_shardings(mcfg: ModelConfig, pipo: bool, tx: optax.GradientTransformation,
                    mesh: Mesh) -> tuple[Any, Any]:
    """(abstract unboxed state, its shardings) derived from the logical axis names."""
    boxed = jax.eval_shape(lambda: init_params(mcfg, pipo, jax.random.key(0)))
    boxed_opt = jax.eval_shape(tx.init, boxed)
    boxed_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=boxed,
                             opt_state=boxed_opt)
    shardings = sharding.logical_shardings(boxed_state, mesh)
    return nn.unbox(boxed_state), shardings


def abstract_params(mcfg: ModelConfig, pipo: bool, mesh: Mesh) -> Any:
    """Abstract (unboxed) parameters that carry their mesh shardings: a restore target."""
    boxed = jax.eval_shape(lambda: init_params(mcfg, pipo, jax.random.key(0)))
    return ckpt.abstract_target(nn.unbox(boxed), sharding.logical_shardings(boxed, mesh))


def train_step(state: TrainState, batch: dict[str, jax.Array], *, mcfg: ModelConfig,
               tc: TrainConfig, pipo: bool,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step: ``(state, batch) → (state, metrics)``.

    ``batch`` holds ``tokens`` B×T int32 and ``loss_mask`` B×T bool. There is no randomness in
    the step itself: PAD augmentation happens on the host, seeded by the step.
    """
    model = PipoLM(mcfg, pipo)
    objective = sft_loss if pipo else ar_loss

    def loss_fn(params: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        out = model.apply({"params": params}, batch["tokens"],
                          detach_confidence_inputs=tc.detach_confidence_inputs) if pipo else \
            model.apply({"params": params}, batch["tokens"])
        return objective(out, params["embedder"]["embedding"], batch["tokens"],
                         batch["loss_mask"], tc)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                   learning_rate=make_schedule(tc)(state.step))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


@dataclasses.dataclass
class StageResult:
    stage_dir: Path
    steps: int
    final_metrics: dict[str, float]
    seconds: float


def _check_same_model(stage_dir: Path, cfg: Config) -> None:
    """Refuses to resume a stage whose checkpoints were trained with another model config."""
    if ckpt.latest_step(stage_dir) is None:
        return
    saved = ckpt.restore_config(stage_dir)
    if saved.model != cfg.model:
        diff = {k: (v, getattr(cfg.model, k)) for k, v in to_dict(saved.model).items()
                if to_dict(cfg.model)[k] != v}
        raise TrainingError(
            f"{stage_dir} holds checkpoints of a different model (saved vs now: {diff}); use a "
            f"new run_dir or the saved model settings")


def _init_state(cfg: Config, stage: str, tx: optax.GradientTransformation, shardings: Any,
                mesh: Mesh) -> TrainState:
    tc: TrainConfig = getattr(cfg, stage)
    rng = jax.random.key(tc.seed)
    if stage == "ar":
        params = jax.jit(lambda r: nn.unbox(init_params(cfg.model, False, r)),
                         out_shardings=shardings.params)(rng)
    else:
        ar_dir = Path(cfg.run_dir) / "ar"
        try:
            ar_params, _ = ckpt.restore_params(ar_dir, abstract_params(cfg.model, False, mesh))
        except ckpt.CheckpointError as e:
            raise TrainingError(
                f"the sft stage starts from the AR model in {ar_dir}, which is not usable; "
                f"train the ar stage first (stages=[ar, sft]). Details: {e}") from e
        params = jax.jit(functools.partial(pipo_from_ar, cfg.model),
                         out_shardings=shardings.params)(ar_params, rng)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    return TrainState(step=jnp.int32(0), params=params, opt_state=opt_state)


def _fmt(x: float) -> str:
    return f"{x:.3f}" if abs(x) >= 1e-3 or x == 0 else f"{x:.2e}"


def train_stage(cfg: Config, stage: str, tokenizer: Tokenizer | None = None,
                mesh: Mesh | None = None, progress: bool = True) -> StageResult:
    """Trains one stage to ``cfg.<stage>.steps``, resuming from its latest checkpoint."""
    tc: TrainConfig = getattr(cfg, stage)
    pipo = stage == "sft"
    tokenizer = tokenizer or run_tokenizer(cfg.tokenizer, cfg.run_dir, cfg.model.vocab_size)
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise TrainingError(f"model.vocab_size is {cfg.model.vocab_size} but the tokenizer has "
                            f"{tokenizer.vocab_size} tokens")
    mesh = mesh or sharding.build_mesh(cfg.mesh)
    stage_dir = Path(cfg.run_dir) / stage
    _check_same_model(stage_dir, cfg)
    tx = make_optimizer(tc)
    abstract, shardings = state_shardings(cfg.model, pipo, tx, mesh)
    start = ckpt.latest_step(stage_dir)
    if start is not None and "opt_state" not in ckpt.saved_keys(stage_dir, start):
        # A params-only checkpoint (an imported model): train from its weights with a fresh
        # optimizer.
        params, _ = ckpt.restore_params(stage_dir, ckpt.abstract_target(abstract.params,
                                                                        shardings.params))
        opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
        state = TrainState(step=jnp.int32(start), params=params, opt_state=opt_state)
    elif start is not None:
        state, _ = ckpt.restore(stage_dir, ckpt.abstract_target(abstract, shardings))
        start = int(state.step)
    else:
        state, start = _init_state(cfg, stage, tx, shardings, mesh), 0
    if start >= tc.steps:
        return StageResult(stage_dir, start, {}, 0.0)

    data = make_train_dataset(cfg, tokenizer, stage)
    batch_sh = sharding.batch_sharding(mesh)
    step_fn = jax.jit(
        functools.partial(train_step, mcfg=cfg.model, tc=tc, pipo=pipo, tx=tx),
        in_shardings=(shardings, {"tokens": batch_sh, "loss_mask": batch_sh}),
        out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))

    def device_batch(step: int) -> tuple[dict[str, jax.Array], float]:
        b = data[step]
        arrays = {k: jax.device_put(b[k], batch_sh) for k in ("tokens", "loss_mask")}
        return arrays, float(b["pad_ratio"])

    final: dict[str, float] = {}
    t0 = time.time()
    tokens_seen = 0
    pending: tuple[int, dict[str, jax.Array], float] | None = None
    # Context managers close the metric files, the bar and the checkpoint manager (waiting for
    # an in-flight save) also when a step raises.
    with MetricWriter(stage_dir, prefix=stage) as writer, \
            tqdm(total=tc.steps, initial=start, desc=stage, disable=not progress, unit="step",
                 dynamic_ncols=True) as bar, \
            ckpt.open_manager(stage_dir, tc.keep_checkpoints) as manager:
        save_config(cfg, Path(cfg.run_dir) / "config.json")

        def finish(step: int, metrics: dict[str, jax.Array], pad_ratio: float) -> None:
            """Host side of a step, one step late so the device never waits on the host."""
            nonlocal final, tokens_seen
            host = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not math.isfinite(host["loss"]):
                raise TrainingError(
                    f"{stage} loss is {host['loss']} at step {step + 1}; nothing was saved after "
                    f"the last good checkpoint. Lower {stage}.learning_rate or check the data.")
            tokens_seen += int(host["target_tokens"])
            elapsed = time.time() - t0
            host["tokens_per_second"] = tokens_seen / max(elapsed, 1e-9)
            host["pad_ratio"] = pad_ratio
            bar.update(1)
            bar.set_postfix(loss=_fmt(host["loss"]), tok_s=f"{host['tokens_per_second']:.0f}")
            if (step + 1) % tc.log_every == 0 or step + 1 == tc.steps:
                writer.write_scalars(step + 1, host)
            final = host

        for step in range(start, tc.steps):
            batch, pad_ratio = device_batch(step)
            state, metrics = step_fn(state, batch)
            if pending is not None:
                finish(*pending)
            pending = (step, metrics, pad_ratio)
            if (step + 1) % tc.ckpt_every == 0 or step + 1 == tc.steps:
                finish(*pending)  # the loss must be known finite before its state is saved
                pending = None
                ckpt.save(manager, step + 1, state, cfg, force=True)
        if pending is not None:
            finish(*pending)
    return StageResult(stage_dir, tc.steps, final, time.time() - t0)


def train(cfg: Config, progress: bool = True) -> list[StageResult]:
    """Runs the configured stages in order (``ar`` then ``sft`` by default)."""
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    mesh = sharding.build_mesh(cfg.mesh)
    return [train_stage(cfg, stage, mesh=mesh, progress=progress) for stage in cfg.stages]


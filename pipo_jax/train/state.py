"""The training state and what makes, resumes and updates it: optimizer, shardings, fresh or
restored parameters, the resume guards. Shared by every stage (``supervised``, ``opd``)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh

from pipo_jax.config import (
    DRAFTER_STAGES,
    PIPO_STAGES,
    Config,
    LoraConfig,
    ModelConfig,
    TrainConfig,
)
from pipo_jax.errors import CheckpointError, TrainingError
from pipo_jax.io import checkpoint as ckpt
from pipo_jax.io.run_dir import model_diff, restore_stage_params
from pipo_jax.io.tokenizer import Tokenizer, run_tokenizer
from pipo_jax.model import lora as lora_lib
from pipo_jax.model import sharding
from pipo_jax.model.pipo import drafter_from_ar, init_params, pipo_from_ar


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
                    lora: LoraConfig | None = None, drafter: bool = False) -> tuple[Any, Any]:
    """(abstract unboxed state, its shardings) derived from the logical axis names.

    The optimizer state covers only the parameters ``tuner`` trains (``lora.partition``).
    """
    boxed = jax.eval_shape(lambda: init_params(mcfg, pipo, jax.random.key(0), lora, drafter))
    boxed_opt = jax.eval_shape(tx.init, lora_lib.partition(boxed, tuner)[0])
    boxed_state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=boxed,
                             opt_state=boxed_opt)
    shardings = sharding.logical_shardings(boxed_state, mesh)
    abstract = nn.unbox(boxed_state)
    sharding.check_divisible(abstract, shardings, "train state leaf")
    return abstract, shardings




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
    return _step(state, tc, tx, train_params, frozen, grads, metrics)


def apply_accumulated_update(
        state: TrainState, tc: TrainConfig, tx: optax.GradientTransformation,
        loss_fn: Callable[[Any, dict[str, jax.Array], dict[str, jax.Array]],
                          tuple[jax.Array, Any]],
        batch: dict[str, Any], per_row: bool = False) -> tuple[Any, ...]:
    """One optimiser step over ``tc.grad_accum`` micro-batches of ``batch`` (B × … leaves),
    scanned inside the one compiled step: ``loss_fn(params, rngs, micro_batch)`` must return
    values that add up over the micro-batches to the whole batch's (its means taken with the
    whole batch's denominators), so the summed gradients and metrics are the big batch's.
    Micro-batch ``i`` holds rows ``i, i + n, …``: a row-sharded batch splits on every device.

    With ``per_row`` the loss's aux is ``(metrics, rows)``, ``rows`` B_micro × … arrays that are
    not summed but put back in the batch's row order and returned third (for metrics that
    are not sums over rows)."""
    n = tc.grad_accum
    train_params, frozen = lora_lib.partition(state.params, tc.tuner)
    rngs = dropout_rngs(tc, state.step)
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1),
                         batch)

    def value_and_grad(i: jax.Array, mb: dict[str, Any]) -> tuple[Any, Any, Any]:
        keys = {k: jax.random.fold_in(v, i) for k, v in rngs.items()}
        (_, aux), grads = jax.value_and_grad(
            lambda tp: loss_fn(lora_lib.combine(tp, frozen), keys, mb), has_aux=True)(
                train_params)
        metrics, rows = aux if per_row else (aux, None)
        return grads, metrics, rows

    def add(carry: tuple[Any, Any], args: tuple[jax.Array, Any]) -> tuple[tuple[Any, Any], Any]:
        grads, metrics, rows = value_and_grad(*args)
        return jax.tree.map(jnp.add, carry, (grads, metrics)), rows

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(value_and_grad, jnp.int32(0), first)[:2]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (grads, metrics), rows = jax.lax.scan(add, zeros, (jnp.arange(n), micro))
    state, metrics = _step(state, tc, tx, train_params, frozen, grads, metrics)
    if not per_row:
        return state, metrics
    # n × B/n × … with micro-batch i holding rows i, i + n, …: back to B × … in row order.
    rows = jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(-1, *x.shape[2:]), rows)
    return state, metrics, rows


def _step(state: TrainState, tc: TrainConfig, tx: optax.GradientTransformation,
          train_params: Any, frozen: Any, grads: Any,
          metrics: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    updates, opt_state = tx.update(grads, state.opt_state, train_params)
    params = lora_lib.combine(optax.apply_updates(train_params, updates), frozen)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads),
                   learning_rate=make_schedule(tc)(state.step))
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def check_same_model(stage_dir: Path, cfg: Config, stage: str) -> None:
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
            f"(python -m pipo_jax.io.hf.convert merge-lora)")



def restore_prerequisite(stage_dir: Path, pipo: bool, mesh: Mesh, needed_by: str,
                         remedy: str) -> tuple[Any, Config]:
    """``restore_stage_params`` of a stage another one starts from; an unusable checkpoint is a
    ``TrainingError`` that says which stage needs it (``needed_by``) and what to do."""
    try:
        return restore_stage_params(stage_dir, pipo, mesh)
    except CheckpointError as e:
        raise TrainingError(f"{needed_by} in {stage_dir}, which is not usable; {remedy}. "
                            f"Details: {e}") from e


def attach_adapters(mcfg: ModelConfig, pipo: bool, lora: LoraConfig | None, base: Any,
                     rng: jax.Array) -> Any:
    """``base`` (plain layout) plus freshly initialised adapters (A random, B zero)."""
    if lora is None:
        return base
    fresh = nn.unbox(init_params(mcfg, pipo, rng, lora))  # only its adapters survive (DCE)
    return lora_lib.with_adapters(base, fresh)


def init_state(cfg: Config, stage: str, tx: optax.GradientTransformation, shardings: Any,
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
    elif stage in DRAFTER_STAGES:
        ar_params, _ = restore_prerequisite(
            Path(cfg.run_dir) / "ar", False, mesh, "the mtp stage drafts for the AR model",
            "train the ar stage first (stages=[ar, mtp])")
        params = jax.jit(lambda a, r: drafter_from_ar(mcfg, a, r),
                         out_shardings=shardings.params)(ar_params, rng)
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
                                          tc.adapters, stage in DRAFTER_STAGES)
    start = ckpt.latest_step(stage_dir)
    if start is not None and "opt_state" not in ckpt.saved_keys(stage_dir, start):
        # A params-only checkpoint (an imported or merged model): train from its weights with
        # fresh adapters and a fresh optimizer.
        params, _ = restore_stage_params(stage_dir, pipo, mesh, start)
        return init_state(cfg, stage, tx, shardings, mesh, base=params, start=start), start, \
            shardings
    if start is not None:
        state, _ = ckpt.restore(stage_dir, ckpt.abstract_target(abstract, shardings))
        return state, int(state.step), shardings
    return init_state(cfg, stage, tx, shardings, mesh, base=base() if base else None), 0, \
        shardings


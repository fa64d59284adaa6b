"""The ``opd`` stage (SPEC §5): on-policy distillation of the PIPO student from a frozen AR teacher.

Each step is three jit-compiled programs, with the rollout kept on the device between them:

1. **rollout**: the student generates responses to a batch of prompts with the decoder used at
   inference (``pipo_jax.decode.engine.generate``: one ``lax.while_loop``, ``lax.cond`` pair
   acceptance), at ``opd.rollout_temperature`` with the current parameters;
2. **teacher scoring**: the teacher runs on each rollout with its PADs removed, and its hidden
   states are mapped back to the student's backbone and MTP positions (``opd_loss.compact``);
3. **update**: the student's compressed teacher-forced forward on the rollout, the divergence at
   backbone and MTP positions and the confidence BCE (``opd_loss.opd_loss``), one AdamW step.

The host only builds prompt batches and, one step late, scores the finished rollouts' answers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from pipo_jax.config import Config, ModelConfig, OpdConfig
from pipo_jax.data.loader import make_prompt_dataset
from pipo_jax.decode import engine
from pipo_jax.decode.sampling import SamplingParams, request_keys, vocab_limit
from pipo_jax.errors import TrainingError
from pipo_jax.eval.scoring import verify
from pipo_jax.io.run_dir import abstract_params, model_diff, stage_of
from pipo_jax.io.tokenizer import Tokenizer
from pipo_jax.model import sharding
from pipo_jax.model.pipo import PipoLM, lm_head
from pipo_jax.model.self_attention import check_impl
from pipo_jax.train import opd_loss as opd
from pipo_jax.train.loop import StageResult, run_steps
from pipo_jax.train.losses import mask_total
from pipo_jax.train.state import (
    TrainState,
    apply_accumulated_update,
    apply_update,
    check_same_model,
    check_tokenizer,
    make_optimizer,
    restore_prerequisite,
    setup_state,
    state_shardings,
)

Array = jax.Array
Params = dict[str, Any]

# Salt that keeps the rollout sampling stream apart from the other streams of ``opd.seed``.
_ROLLOUT_SALT = 0x5011


def rollout_seeds(seed: int, step: int, batch: int) -> np.ndarray:
    """Per-row sampling seeds of a step's rollouts: a pure function of ``(seed, step)``, so a
    resumed run samples the same rollouts."""
    return np.random.default_rng([seed, step, _ROLLOUT_SALT]).integers(
        0, 2**31 - 1, size=batch, dtype=np.uint32)


def rollout_spec(cfg: ModelConfig, oc: OpdConfig, tokenizer: Tokenizer) -> engine.DecodeSpec:
    """The decode statics of the student's rollouts: ``opd``'s temperature and budget, drafts
    unless every row's threshold is >= 1."""
    sp = SamplingParams(temperature=oc.rollout_temperature,
                        vocab_limit=vocab_limit(tokenizer, cfg.vocab_size))
    thresholds = oc.rollout_thresholds or (oc.rollout_threshold,)
    return engine.DecodeSpec(cfg, True, sp, oc.rollout_max_new_tokens, tokenizer.pad_id,
                             tokenizer.eos_id, draft=min(thresholds) < 1.0)


def rollout(params: Params, prompt_BxP: Array, valid_BxP: Array, seeds_B: Array, *,
            spec: engine.DecodeSpec, oc: OpdConfig) -> dict[str, Array]:
    """Student rollouts → training rows (see ``opd_loss.rollout_rows``), all on the device.

    Returns ``tokens`` B×T, ``prompt_len`` B, ``seq_len`` B and ``n_tokens`` B (real tokens
    generated, EOS included).
    """
    threshold = (jnp.asarray(oc.row_thresholds(prompt_BxP.shape[0]), jnp.float32)
                 if oc.rollout_thresholds else jnp.float32(oc.rollout_threshold))
    state = engine.generate(params, prompt_BxP, valid_BxP, request_keys(seeds_B), threshold,
                            spec=spec)
    tokens, prompt_len, seq_len = opd.rollout_rows(prompt_BxP, valid_BxP, state.out,
                                                   state.n_passes, spec.pad_id)
    return {"tokens": tokens, "prompt_len": prompt_len, "seq_len": seq_len,
            "n_tokens": state.n_tokens}


def teacher_hidden(teacher_params: Params, tokens_BxT: Array, *, cfg: ModelConfig,
                   pad_id: int) -> dict[str, Array]:
    """The teacher's final hidden states at the student's target positions, B×(L-1)×Ht each:
    ``backbone`` (token position ``2i+1``) and ``mtp`` (``2i+2``). The teacher reads the row with
    every PAD removed; a PAD position takes the state of the last real token before it."""
    t = tokens_BxT.shape[1]
    _, index = opd.compaction_index(tokens_BxT, pad_id)
    h = PipoLM(cfg, pipo=False).apply({"params": teacher_params},
                                      opd.compact(tokens_BxT, pad_id))["h"]
    mapped = opd.expand(jnp.pad(h, ((0, 0), (0, 1), (0, 0))), index)  # B×T×Ht
    n = t // 2 - 1
    return {"backbone": mapped[:, 1::2][:, :n], "mtp": mapped[:, 2::2][:, :n]}


def opd_objective(params: Params, rngs: dict[str, Array], *, rows: dict[str, Array],
                  teacher: dict[str, Array], teacher_head_VxHt: Array, cfg: ModelConfig,
                  oc: OpdConfig, pad_id: int, eos_id: int,
                  totals: dict[str, Array] | None = None) -> tuple[Array, Any]:
    """The OPD loss of rollout ``rows`` scored by the ``teacher`` (``teacher_hidden``):
    ``(params, rngs) → (loss, metrics)``; with ``totals`` (one micro-batch of a step: the whole
    batch's target counts) ``(loss, (metrics, calibration rows))``, see ``opd.opd_loss``."""
    tokens = rows["tokens"]
    masks = opd.target_masks(tokens, rows["prompt_len"], rows["seq_len"], pad_id, eos_id,
                             oc.pad_fill)
    out = PipoLM(cfg, True, oc.adapters).apply(
        {"params": params}, tokens, rngs=rngs, detach_confidence_inputs=oc.detach_confidence_inputs)
    return opd.opd_loss(out, lm_head(params), teacher, teacher_head_VxHt, tokens, masks,
                        mode=oc.divergence, k=oc.topk, chunk=oc.loss_chunk,
                        w_backbone=oc.w_backbone, w_mtp=oc.w_mtp, w_conf=oc.w_conf,
                        ece_bins=oc.ece_bins, vocab_chunk=oc.vocab_chunk, totals=totals,
                        per_row=totals is not None)


def opd_update(state: TrainState, rows: dict[str, Array], teacher: dict[str, Array],
               teacher_head_VxHt: Array, *, cfg: ModelConfig, oc: OpdConfig,
               tx: optax.GradientTransformation, pad_id: int,
               eos_id: int) -> tuple[TrainState, dict[str, Array]]:
    """One optimiser step of the OPD objective (``opd_objective``) on a batch of rollout
    rows."""
    objective = functools.partial(opd_objective, teacher_head_VxHt=teacher_head_VxHt, cfg=cfg,
                                  oc=oc, pad_id=pad_id, eos_id=eos_id)
    if oc.grad_accum == 1:
        state, metrics = apply_update(state, oc, tx, functools.partial(
            objective, rows=rows, teacher=teacher))
    else:
        # Micro-batches of rows: each loss with the whole batch's target counts; ECE, Brier
        # and AUROC once, over the whole batch's calibration rows.
        masks = opd.target_masks(rows["tokens"], rows["prompt_len"], rows["seq_len"], pad_id,
                                 eos_id, oc.pad_fill)
        totals = {k: mask_total(masks[k]) for k in ("backbone", "mtp")}
        batch = {"rows": {k: rows[k] for k in ("tokens", "prompt_len", "seq_len")},
                 "teacher": teacher}
        state, metrics, calibration = apply_accumulated_update(
            state, oc, tx, lambda p, r, mb: objective(p, r, rows=mb["rows"],
                                                      teacher=mb["teacher"], totals=totals),
            batch, per_row=True)
        metrics.update(opd.calibration_metrics(calibration, oc.ece_bins))
    response = (rows["seq_len"] - rows["prompt_len"]).astype(jnp.float32)
    n_tokens = rows["n_tokens"].astype(jnp.float32)
    metrics.update(rollout_tokens=jnp.mean(n_tokens),
                   rollout_pads=jnp.mean(response - n_tokens))
    return state, metrics


def rollout_statistics(params: Params, teacher_params: Params, rows: dict[str, Array], *,
                       cfg: ModelConfig, teacher_cfg: ModelConfig, pad_id: int, eos_id: int,
                       chunk: int = 2048) -> dict[str, Array]:
    """Per-position student–teacher statistics of rollout rows, for evaluation. Each B×(L-1):

    ``kl_backbone`` / ``kl_mtp``: exact reverse KL ``KL(p_s ‖ p_t)`` at backbone / MTP positions;
    ``confidence`` / ``confidence_logit``: the confidence head's probability and its logit;
    ``acceptance``: the realised acceptance probability ``min(1, p_t(y)/p_s(y))`` of the drafted
    token ``y`` (full-vocabulary probabilities); ``teacher_prob``: ``p_t(y)``, the probability
    that a sample of the teacher at that position equals the draft; ``backbone`` / ``mtp``: the
    positions that count (real drafts only).
    """
    tokens = rows["tokens"]
    masks = opd.target_masks(tokens, rows["prompt_len"], rows["seq_len"], pad_id, eos_id, "mask")
    teacher = teacher_hidden(teacher_params, tokens, cfg=teacher_cfg, pad_id=pad_id)
    out = PipoLM(cfg, True).apply({"params": params}, tokens)
    b, n, _ = out["h"].shape
    no_fill = jnp.zeros((b * n,), bool)

    def terms(hidden: Array, t_hidden: Array, labels: Array) -> dict[str, Array]:
        got = opd.chunked_divergence(hidden.reshape(b * n, -1), lm_head(params),
                                     t_hidden.reshape(b * n, -1), lm_head(teacher_params),
                                     labels.reshape(-1), no_fill, "sampled", 1, chunk)
        return {k: v.reshape(b, n) for k, v in got.items()}

    bb = terms(out["h"], teacher["backbone"], tokens[:, 2::2])
    mtp = terms(out["m"], teacher["mtp"], tokens[:, 3::2])
    z = out["conf_logits"]
    return {"kl_backbone": bb["kl"], "kl_mtp": mtp["kl"],
            "confidence": jax.nn.sigmoid(z), "confidence_logit": z,
            "acceptance": mtp["acceptance"], "teacher_prob": jnp.exp(mtp["teacher_logprob"]),
            "backbone": masks["backbone"], "mtp": masks["mtp"]}


def rollout_prompts(cfg: Config, tokenizer: Tokenizer,
                    prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Prompt ids → the left-padded batch ``rollout`` takes (tokens B×P, valid B×P), padded to
    ``opd.prompt_bucket`` and checked against the context with ``opd``'s token budget."""
    return engine.prepare_prompts(prompts, True, tokenizer.pad_id, cfg.opd.prompt_bucket,
                               cfg.opd.rollout_max_new_tokens, cfg.model.max_context)


def rollout_fn(cfg: Config, tokenizer: Tokenizer, **shardings: Any) -> Any:
    """``rollout`` jit-compiled for ``cfg.opd``'s sampling and budget and ``tokenizer``'s ids:
    ``(params, prompt B×P, valid B×P, seeds B) → rows``; ``shardings`` are ``jax.jit``'s
    ``in_shardings`` / ``out_shardings``."""
    return jax.jit(functools.partial(rollout, spec=rollout_spec(cfg.model, cfg.opd, tokenizer),
                                     oc=cfg.opd), **shardings)


@dataclasses.dataclass(frozen=True)
class Teacher:
    cfg: ModelConfig
    params: Params
    stage_dir: Path


def load_teacher(cfg: Config, mesh: Mesh) -> Teacher:
    """The frozen AR teacher: ``opd.teacher_dir`` or ``<run_dir>/teacher``."""
    teacher_dir = Path(cfg.opd.teacher_dir or Path(cfg.run_dir) / "teacher")
    params, saved = restore_prerequisite(
        teacher_dir, False, mesh, "the opd stage needs a frozen AR teacher",
        "train it first (stages=[teacher, ...]) or set opd.teacher_dir")
    tcfg = saved.model_of(stage_of(teacher_dir, False))
    if tcfg.vocab_size != cfg.model.vocab_size:
        raise TrainingError(f"the teacher in {teacher_dir} has vocab_size {tcfg.vocab_size}, the "
                            f"student {cfg.model.vocab_size}: they must share a tokenizer")
    return Teacher(tcfg, params, teacher_dir)


def load_student(cfg: Config, mesh: Mesh) -> Params:
    """The SFT student's parameters (adapters merged): ``opd.student_dir`` or ``<run_dir>/sft``."""
    student_dir = Path(cfg.opd.student_dir or Path(cfg.run_dir) / "sft")
    params, saved = restore_prerequisite(
        student_dir, True, mesh, "the opd stage starts from the PIPO SFT model",
        "train the sft stage first or set opd.student_dir")
    diff = model_diff(saved.model_of(stage_of(student_dir, True)), cfg.model)
    if diff:
        raise TrainingError(f"the student in {student_dir} has another model config than "
                            f"model: (saved vs now: {diff})")
    return params


class OpdStep:
    """The three jitted programs of an OPD step, for one config (see the module docstring).

    Each compiles with explicit shardings on ``mesh``: parameters and optimizer state as
    ``state_sh`` (the student) and as the teacher's restored parameters carry them, rollout rows
    and teacher states split over the batch axes, metrics replicated.
    """

    def __init__(self, cfg: Config, tokenizer: Tokenizer, teacher_cfg: ModelConfig,
                 tx: optax.GradientTransformation, mesh: Mesh, state_sh: Any = None,
                 teacher_sh: Any = None) -> None:
        """``state_sh`` / ``teacher_sh``: the shardings of the student's train state and of the
        teacher's parameters; by default those the logical rules give on ``mesh``."""
        oc = cfg.opd
        if state_sh is None:
            state_sh = state_shardings(cfg.model, True, tx, mesh, oc.tuner, oc.adapters)[1]
        if teacher_sh is None:
            teacher_sh = jax.tree.map(lambda a: a.sharding,
                                      abstract_params(teacher_cfg, False, mesh))
        self.cfg, self.oc, self.tokenizer, self.mesh = cfg, oc, tokenizer, mesh
        ids = dict(pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id)
        batch = sharding.batch_sharding(mesh)
        self._batch_sh = batch
        self._rollout = rollout_fn(cfg, tokenizer, in_shardings=(state_sh.params, batch, batch,
                                                                 batch), out_shardings=batch)
        self._score = jax.jit(functools.partial(teacher_hidden, cfg=teacher_cfg,
                                                pad_id=tokenizer.pad_id),
                              in_shardings=(teacher_sh, batch), out_shardings=batch)
        self._update = jax.jit(functools.partial(opd_update, cfg=cfg.model, oc=oc, tx=tx, **ids),
                               in_shardings=(state_sh, batch, batch, lm_head(teacher_sh)),
                               out_shardings=(state_sh, sharding.replicated(mesh)),
                               donate_argnums=(0,))
        self._trim = jax.jit(lambda t, width: t[:, :width], static_argnums=(1,),
                             out_shardings=batch)

    def prompts(self, prompts: Sequence[Sequence[int]]) -> tuple[Array, Array]:
        tokens, valid = rollout_prompts(self.cfg, self.tokenizer, prompts)
        return sharding.global_batch((tokens, valid), self.mesh)

    def rollout(self, params: Params, prompts: Sequence[Sequence[int]],
                step: int) -> dict[str, Array]:
        """Rollout rows, cut to a multiple of ``opd.row_bucket`` tokens past the longest one.

        Rows are sized for the whole budget, but most rollouts end well before it; teacher
        scoring and the update run on the cut rows (one scalar read back per step, and a
        handful of shapes to compile)."""
        tokens, valid = self.prompts(prompts)
        seeds = sharding.global_batch(rollout_seeds(self.oc.seed, step, len(prompts)), self.mesh)
        rows = self._rollout(params, tokens, valid, seeds)
        longest = int(jax.device_get(jnp.max(rows["seq_len"])))
        bucket = self.oc.row_bucket
        width = min(rows["tokens"].shape[1], max(-(-longest // bucket) * bucket, 4))
        return dict(rows, tokens=self._trim(rows["tokens"], width))

    def score(self, teacher_params: Params, tokens_BxT: Array) -> dict[str, Array]:
        return self._score(teacher_params, tokens_BxT)

    def update(self, state: TrainState, rows: dict[str, Array], teacher: dict[str, Array],
               teacher_head: Array) -> tuple[TrainState, dict[str, Array]]:
        return self._update(state, rows, teacher, teacher_head)

    def __call__(self, state: TrainState, teacher_params: Params,
                 prompts: Sequence[Sequence[int]],
                 step: int) -> tuple[TrainState, dict[str, Array], dict[str, Array]]:
        """Rollout with ``state.params`` → teacher scoring → update. Returns the new state, the
        step's metrics and the rollout rows (device arrays)."""
        rows = self.rollout(state.params, prompts, step)
        teacher = self.score(teacher_params, rows["tokens"])
        state, metrics = self.update(state, rows, teacher, lm_head(teacher_params))
        return state, metrics, rows


def response_texts(tokenizer: Tokenizer, rows: dict[str, np.ndarray]) -> list[tuple[str, bool]]:
    """``(text, finished)`` of each rollout row: its response tokens without PAD, cut at EOS."""
    out = []
    for toks, p, n in zip(rows["tokens"], rows["prompt_len"], rows["seq_len"], strict=True):
        real = [int(t) for t in toks[int(p):int(n)] if t != tokenizer.pad_id]
        finished = tokenizer.eos_id in real
        out.append((tokenizer.decode(real[:real.index(tokenizer.eos_id)] if finished else real),
                    finished))
    return out


def rollout_scores(tokenizer: Tokenizer, rows: dict[str, np.ndarray],
                   answers: Sequence[str | None]) -> dict[str, float]:
    """Host metrics of a step's rollouts: the finished rate and, where the prompts have reference
    answers (the arithmetic task), the accuracy (reward) of the final ``\\boxed{}`` answer."""
    texts = response_texts(tokenizer, rows)
    out = {"rollout_finished": float(np.mean([f for _, f in texts]))}
    graded = [verify(text, a) for (text, _), a in zip(texts, answers, strict=True)
              if a is not None]
    if graded:
        out["rollout_accuracy"] = float(np.mean(graded))
    return out


def train_opd(cfg: Config, tokenizer: Tokenizer | None = None, mesh: Mesh | None = None,
              progress: bool = True) -> StageResult:
    """Trains the ``opd`` stage to ``opd.steps``, resuming from its latest checkpoint."""
    oc = cfg.opd
    check_impl(cfg.model)
    tokenizer = check_tokenizer(cfg, tokenizer)
    mesh = mesh or sharding.build_mesh(cfg.mesh)
    sharding.check_batch(mesh, oc.batch_size, "opd.batch_size")
    stage_dir = Path(cfg.run_dir) / "opd"
    check_same_model(stage_dir, cfg, "opd")
    prompts = make_prompt_dataset(cfg, tokenizer)  # bad data fails before any model work
    tx = make_optimizer(oc)
    # Programs traced in the mesh context place the model's activation constraints on it.
    with jax.set_mesh(mesh):
        state, start, shardings = setup_state(cfg, "opd", mesh, tx,
                                              base=lambda: load_student(cfg, mesh))
        if start >= oc.steps:
            return StageResult(stage_dir, start, {}, 0.0)
        teacher = load_teacher(cfg, mesh)
        step_fn = OpdStep(cfg, tokenizer, teacher.cfg, tx, mesh, shardings,
                          jax.tree.map(lambda a: a.sharding, teacher.params))

        def advance(state: TrainState, step: int) -> tuple[TrainState, dict[str, Array], Any]:
            batch = prompts[step]
            state, metrics, rows = step_fn(state, teacher.params, batch["prompts"], step)
            return state, metrics, (rows, batch["answers"])

        def summarise(step: int, host: dict[str, Any], info: Any) -> dict[str, float]:
            rows, answers = info
            return rollout_scores(tokenizer, sharding.to_host(rows), answers)

        return run_steps(cfg, "opd", state, start, advance, summarise, progress)

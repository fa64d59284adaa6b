"""Memory plan of one OPD step: a PIPO student in training and a frozen AR teacher, both resident.

An OPD step is three compiled programs (``opd.OpdStep``): the student's **rollout** (the decode
loop with its caches), the teacher's **score** of the rollout rows, and the student's
**update** on them. Between them the device holds the student's train state and the teacher's
parameters; each program adds its own inputs, outputs and temporaries. So the step's peak is::

    max over programs p of  resident + (arguments_p − resident arguments_p)
                            + outputs_p − aliased_p + temp_p + code_p

with ``resident`` = student parameters + optimizer state + teacher parameters (exact, from
``jax.eval_shape`` and the shardings), and each program's terms from ``memory_analysis()`` of
the program exactly as ``OpdStep`` jits it (its shardings, the donated state), lowered on
abstract inputs at the worst case: prompts of ``--prompt-len`` tokens and every rollout running
to ``opd.rollout_max_new_tokens`` (the score and the update then see full-width rows).

The token ids only place PADs and stops, which do not change a byte: the plan uses stand-in ids
(``PlanIds``) rather than a tokenizer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from pipo_jax.config import Config, ConfigError, ModelConfig
from pipo_jax.decode import engine
from pipo_jax.io.run_dir import abstract_params
from pipo_jax.model import sharding
from pipo_jax.model.pipo import lm_head
from pipo_jax.train import opd as opd_lib
from pipo_jax.train.plan_common import (
    Verdict,
    compile_or_refuse,
    compiled_where,
    human_bytes,
    planning_model,
    tree_bytes_per_device,
    verdict_line,
    verdicts,
)
from pipo_jax.train.state import make_optimizer, state_shardings


@dataclasses.dataclass(frozen=True)
class PlanIds:
    """What the OPD programs read of a tokenizer (``pad_id``, ``eos_id``)."""

    pad_id: int = 0
    eos_id: int = 1


@dataclasses.dataclass(frozen=True)
class ProgramPlan:
    """One compiled program of the step, per device (bytes)."""

    name: str                 # rollout | score | update
    argument_bytes: int       # compiled (arguments the program does not read are pruned)
    own_argument_bytes: int   # exact: the arguments that are not resident state
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    live_bytes: int           # resident + the program's own bytes: its peak on the device
    compile_seconds: float


@dataclasses.dataclass(frozen=True)
class OpdPlan:
    mesh: dict[str, int]
    global_batch: int
    batch_per_device: int
    grad_accum: int
    prompt_len: int
    rollout_tokens: int        # opd.rollout_max_new_tokens
    row_tokens: int            # width of a rollout row (prompt + budget, as the decoder lays it)
    tuner: str
    attention_impl: str
    attention_impl_compiled: str
    backend: str
    simulated: bool
    topology: str | None
    student_params_bytes: int
    student_opt_state_bytes: int
    teacher_params_bytes: int
    resident_bytes: int
    programs: tuple[ProgramPlan, ...]
    peak_bytes: int
    peak_program: str
    verdicts: tuple[Verdict, ...] = ()

    def with_devices(self, devices: list[tuple[str, int]]) -> OpdPlan:
        return dataclasses.replace(self, verdicts=verdicts(self.peak_bytes, devices))

    def to_json(self) -> dict[str, Any]:
        return dict(dataclasses.asdict(self), stage="opd")


def _compile(name: str, fn: Any, args: tuple[Any, ...], own: Any, resident: int,
             backend: str) -> tuple[ProgramPlan, Any]:
    """Compiles ``fn`` on abstract ``args``; ``own``: those of them that are not resident state
    (their exact bytes, since the compiled argument size leaves out what is pruned)."""
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    compiled = compile_or_refuse(lowered, backend, f"the opd {name} program")
    seconds = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    if stats is None:
        raise ConfigError("this backend reports no memory analysis; plan the opd stage on "
                          "simulated CPU devices (--simulate)")
    arg, out = int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes)
    alias, temp = int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes)
    code = int(stats.generated_code_size_in_bytes)
    own_b = tree_bytes_per_device(own, jax.tree.map(lambda a: a.sharding, own))
    live = resident + own_b + out - alias + temp + code
    return (ProgramPlan(name, arg, own_b, out, alias, temp, code, live, round(seconds, 1)),
            lowered.out_info)


def plan_opd_memory(cfg: Config, teacher_cfg: ModelConfig, mesh: Mesh, prompt_len: int,
                    global_batch: int, simulated: bool = False,
                    topology: str | None = None) -> OpdPlan:
    """Plans one OPD step of ``cfg`` (student ``cfg.model``, ``cfg.opd``) against a resident
    ``teacher_cfg`` teacher on ``mesh``, for ``global_batch`` prompts of ``prompt_len`` tokens."""
    oc = cfg.opd
    if prompt_len <= 0:
        raise ConfigError(f"--prompt-len must be positive, got {prompt_len}")
    if global_batch <= 0:
        raise ConfigError(f"--batch-size must be positive, got {global_batch}")
    sharding.check_batch(mesh, global_batch, "the global batch (--batch-size)")
    if global_batch % oc.grad_accum:
        raise ConfigError(f"the global batch (--batch-size) {global_batch} does not split into "
                          f"opd.grad_accum={oc.grad_accum} micro-batches")
    if teacher_cfg.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"the teacher's vocab_size {teacher_cfg.vocab_size} differs from the "
                          f"student's {cfg.model.vocab_size}: they must share a tokenizer")
    backend = mesh.devices.flat[0].platform
    configured = f"student {cfg.model.attention_impl}, teacher {teacher_cfg.attention_impl}"
    student_cfg = planning_model(cfg.model, backend)
    teacher_cfg = planning_model(teacher_cfg, backend)
    cfg = dataclasses.replace(cfg, model=student_cfg)
    ids = PlanIds()

    tx = make_optimizer(oc)
    state, state_sh = state_shardings(student_cfg, True, tx, mesh, oc.tuner, oc.adapters)
    teacher = abstract_params(teacher_cfg, False, mesh)
    teacher_sh = jax.tree.map(lambda a: a.sharding, teacher)
    params_b = tree_bytes_per_device(state.params, state_sh.params)
    opt_b = tree_bytes_per_device(state.opt_state, state_sh.opt_state)
    teacher_b = tree_bytes_per_device(teacher, teacher_sh)
    state_b = tree_bytes_per_device(state, state_sh)  # parameters + optimizer state + step
    resident = state_b + teacher_b

    def spec(shape: tuple[int, ...], dtype: Any, sh: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sh)

    batch = sharding.batch_sharding(mesh)
    prompt = engine.prepare_prompts([[2] * prompt_len], True, ids.pad_id, oc.prompt_bucket,
                                    oc.rollout_max_new_tokens, student_cfg.max_context)[0]
    width = prompt.shape[1]
    state_in = jax.tree.map(lambda a, s: spec(a.shape, a.dtype, s), state, state_sh)
    programs = []
    with jax.set_mesh(mesh):
        rollout = opd_lib.rollout_fn(cfg, ids, in_shardings=(state_sh.params, batch, batch, batch),
                                     out_shardings=batch)
        prompts = (spec((global_batch, width), jnp.int32, batch),
                   spec((global_batch, width), jnp.bool_, batch),
                   spec((global_batch,), jnp.uint32, batch))
        plan, rows = _compile("rollout", rollout, (state_in.params, *prompts), prompts,
                              resident, backend)
        programs.append(plan)
        rows = jax.tree.map(lambda a: spec(a.shape, a.dtype, batch), rows)

        score = jax.jit(functools.partial(opd_lib.teacher_hidden, cfg=teacher_cfg,
                                          pad_id=ids.pad_id),
                        in_shardings=(teacher_sh, batch), out_shardings=batch)
        plan, hidden = _compile("score", score, (teacher, rows["tokens"]), rows["tokens"],
                                resident, backend)
        programs.append(plan)
        hidden = jax.tree.map(lambda a: spec(a.shape, a.dtype, batch), hidden)

        update = jax.jit(functools.partial(opd_lib.opd_update, cfg=student_cfg, oc=oc, tx=tx,
                                           pad_id=ids.pad_id, eos_id=ids.eos_id),
                         in_shardings=(state_sh, batch, batch, lm_head(teacher_sh)),
                         out_shardings=(state_sh, sharding.replicated(mesh)),
                         donate_argnums=(0,))
        plan, _ = _compile("update", update, (state_in, rows, hidden, lm_head(teacher)),
                           (rows, hidden), resident, backend)
        programs.append(plan)
    top = max(programs, key=lambda p: p.live_bytes)
    return OpdPlan(
        mesh=dict(mesh.shape), global_batch=global_batch,
        batch_per_device=global_batch // sharding.batch_parallel(mesh), grad_accum=oc.grad_accum,
        prompt_len=width, rollout_tokens=oc.rollout_max_new_tokens,
        row_tokens=int(rows["tokens"].shape[1]), tuner=oc.tuner,
        attention_impl=configured,
        attention_impl_compiled=f"student {student_cfg.attention_impl}, "
                                f"teacher {teacher_cfg.attention_impl}",
        backend=backend, simulated=simulated, topology=topology,
        student_params_bytes=params_b, student_opt_state_bytes=opt_b,
        teacher_params_bytes=teacher_b, resident_bytes=resident, programs=tuple(programs),
        peak_bytes=top.live_bytes, peak_program=top.name)


def format_opd_plan(plan: OpdPlan, config_name: str) -> str:
    """The human-readable table (per device)."""
    mesh = ",".join(f"{k}={v}" for k, v in plan.mesh.items())
    n = math.prod(plan.mesh.values())
    where = compiled_where(plan.backend, n, plan.simulated, plan.topology)
    lines = [
        f"memory plan: {config_name}, stage opd ({plan.tuner}; attention "
        f"{plan.attention_impl_compiled})",
        f"mesh {mesh}; {plan.global_batch} rollouts ({plan.batch_per_device} per batch-parallel "
        f"device" + (f", the update in {plan.grad_accum} micro-batches" if plan.grad_accum > 1
                     else "") + f"), prompts of {plan.prompt_len} + {plan.rollout_tokens} "
        f"rollout tokens (rows of {plan.row_tokens}); compiled on {where}",
        "",
        f"{'resident, per device':<28}{'bytes':>12}",
        f"{'student parameters':<28}{human_bytes(plan.student_params_bytes):>12}",
        f"{'student optimizer state':<28}{human_bytes(plan.student_opt_state_bytes):>12}",
        f"{'teacher parameters':<28}{human_bytes(plan.teacher_params_bytes):>12}",
        "",
        f"{'program':<10}{'own args':>12}{'outputs':>12}{'temp':>12}{'live (peak)':>14}"
        f"{'compile s':>11}",
    ]
    for p in plan.programs:
        own_out = p.output_bytes - p.alias_bytes
        lines.append(f"{p.name:<10}{human_bytes(p.own_argument_bytes):>12}"
                     f"{human_bytes(own_out):>12}{human_bytes(p.temp_bytes):>12}"
                     f"{human_bytes(p.live_bytes):>14}{p.compile_seconds:>11.1f}")
    lines += ["", f"peak: {human_bytes(plan.peak_bytes)} (the {plan.peak_program} program)"]
    lines += [verdict_line(v) for v in plan.verdicts]
    return "\n".join(lines)

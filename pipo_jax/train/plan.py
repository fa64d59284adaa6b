"""Memory planner: per-device bytes of one training step, before any array is allocated.

``python -m pipo_jax.train.plan --config configs/qwen3_5_4b_sft.yaml --mesh fsdp=8 \
--device h100-80gb``

For a stage (``teacher``, ``ar`` or ``sft``), a mesh, a sequence length and a global batch it
prints, per device:

* parameters, optimizer state and gradients: exact, from ``jax.eval_shape`` of the train state
  and its shardings (``Σ prod(sharding.shard_shape(shape)) · itemsize`` over the leaves);
  gradients cover only the trained parameters (LoRA: the adapters and the SPEC §4 PIPO modules),
  in the parameter dtype;
* temporaries: ``memory_analysis()`` of the train step exactly as ``supervised.train_stage`` builds
  it (``supervised.jit_train_step``: in/out shardings, donated state, the configured remat policy
  and chunked loss, traced in the mesh context that places the activation constraints), lowered
  and compiled on abstract ``jax.ShapeDtypeStruct`` inputs. They hold the gradients and the
  activations at the step's peak; ``activations`` is temporaries minus gradients;
* the peak (arguments + temporaries + outputs not aliased to donated arguments + code) and,
  against a device's memory, whether it fits and by how much.

The compiled numbers come from the backend the planner runs on. On a GPU the planned peak was
the measured ``peak_bytes_in_use`` of a real step to within 2 KB (Qwen3.5-4B and 9B SFT, one
device). A mesh larger than the machine (or ``--simulate``) is compiled on simulated CPU devices:
the planner re-runs itself with ``--xla_force_host_platform_device_count``. XLA:CPU partitions
the program as an accelerator would but fuses and schedules differently and widens some
bfloat16 temporaries to float32: its temporaries were 1.3–1.8× a GPU's for the same step, so a
simulated plan errs on the safe side. ``analytic activations`` is an independent
order-of-magnitude check (``activation_estimate``).

``--stage opd`` plans the OPD step's three programs with both models resident (``plan_opd``).
``--topology v5p:2x2x2`` compiles for a TPU slice with the TPU compiler, on libtpu's
compile-only devices (``plan_common.topology_devices``): the target's own memory analysis
without the target.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from pipo_jax.cli import parse_bytes, run_main
from pipo_jax.config import (
    PIPO_STAGES,
    Config,
    ConfigError,
    MeshConfig,
    ModelConfig,
    TrainConfig,
    load_config,
)
from pipo_jax.io import checkpoint as ckpt
from pipo_jax.io.diskerrors import reporting
from pipo_jax.io.run_dir import stage_of
from pipo_jax.model import lora as lora_lib
from pipo_jax.model import sharding
from pipo_jax.model.layers import dtype_of
from pipo_jax.model.self_attention import resolve_impl
from pipo_jax.model.sharding import MESH_AXES, parse_mesh
from pipo_jax.train.plan_common import (
    Verdict,
    compile_or_refuse,
    compiled_where,
    human_bytes,
    planning_model,
    topology_devices,
    tree_bytes_per_device,
    verdict_line,
    verdicts,
)
from pipo_jax.train.plan_opd import format_opd_plan, plan_opd_memory
from pipo_jax.train.state import make_optimizer, state_shardings
from pipo_jax.train.supervised import jit_train_step

MiB = 1 << 20
GiB = 1 << 30
GB = 10 ** 9

# Memory per device in bytes (``--device-memory`` for anything else, or to plan against what the
# runtime leaves usable: JAX on GPU preallocates 75 % of the memory unless
# XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise, and a TPU runtime reserves some HBM).
DEVICE_PRESETS: dict[str, int] = {
    "tpu-v4": 32 * GiB,       # 32 GiB HBM2 per chip
    "tpu-v5e": 16 * GiB,      # 16 GiB HBM2 per chip
    "tpu-v5p": 95 * GiB,      # 95 GiB HBM2e per chip (Cloud TPU docs: "95GB")
    "tpu-v6e": 32 * GiB,      # 32 GiB HBM per chip
    # NVIDIA's "80GB" / "141GB": the totals nvidia-smi reports (the CUDA context takes a little).
    "a100-80gb": 81920 * MiB,
    "h100-80gb": 81559 * MiB,  # 79.6 GiB
    "h200": 143771 * MiB,      # 140.4 GiB
}

# Stages whose step is ``trainer.train_step`` (OPD's also rolls out and scores a teacher).
PLANNED_STAGES = ("teacher", "ar", "sft")

_CHILD_FLAG = "--simulated-child"


# ----------------------------------------------------------------------------- parsing


def mesh_device_count(mesh_cfg: MeshConfig, num_devices: int | None, available: int) -> int:
    """Devices the mesh needs: the product of its sizes; with a -1 axis, ``num_devices`` or, when
    that is None, the ``available`` devices of this machine (what training would use)."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    if -1 in sizes:
        return available if num_devices is None else num_devices
    n = math.prod(sizes)
    if num_devices is not None and num_devices != n:
        raise ConfigError(f"the mesh {dict(zip(MESH_AXES, sizes, strict=True))} has {n} devices "
                          f"but --num-devices is {num_devices}")
    return n


def resolve_devices(presets: list[str], memory: str | None) -> list[tuple[str, int]]:
    """``--device`` presets and ``--device-memory`` → ``[(name, bytes)]``."""
    out = []
    for name in presets:
        if name not in DEVICE_PRESETS:
            raise ConfigError(f"unknown --device {name!r}; presets: "
                              f"{', '.join(DEVICE_PRESETS)} (or give --device-memory BYTES)")
        out.append((name, DEVICE_PRESETS[name]))
    if memory is not None:
        out.append((f"{memory.strip()} device", parse_bytes(memory, "--device-memory")))
    return out


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Per-device bytes of one train step (see the module docstring for how each is obtained).

    The compiled fields are None when the step was not compiled (``--state-only``); the peak is
    then the state alone (parameters + optimizer state + gradients + batch), a lower bound.
    """

    stage: str
    mesh: dict[str, int]
    seq_len: int
    global_batch: int
    batch_per_device: int  # rows per batch-parallel shard (data × fsdp)
    tuner: str
    remat_policy: str
    loss_chunk: int
    backend: str           # platform of the mesh's devices ("cpu" when simulated)
    simulated: bool        # True: more devices than the machine has, simulated on CPU
    params_bytes: int
    opt_state_bytes: int
    grads_bytes: int
    batch_bytes: int
    activations_estimate_bytes: int  # analytic, independent of the compiler (estimate_total)
    estimate_terms: dict[str, int]   # activation_estimate's terms
    peak_bytes: int        # compiled: argument + output − alias + temp + code
    compiled: bool
    compile_seconds: float | None = None
    argument_bytes: int | None = None  # compiled: state + batch, as the executable sees them
    output_bytes: int | None = None
    alias_bytes: int | None = None     # outputs written into donated arguments
    temp_bytes: int | None = None      # compiled: gradients + activations + workspace
    code_bytes: int | None = None
    activations_bytes: int | None = None  # temp − grads
    verdicts: tuple[Verdict, ...] = ()
    grad_accum: int = 1                # micro-batches per step (the stage's grad_accum)
    attention_impl: str = "auto"       # model.attention_impl, as configured
    # The form the step was compiled with: the configured one, or ``blockwise`` (linear memory
    # as the fused kernels are) when that kernel does not run on the planning backend.
    attention_impl_compiled: str | None = None
    # ``--topology``: the TPU slice the step was compiled for, on compile-only devices.
    topology: str | None = None

    def with_devices(self, devices: list[tuple[str, int]]) -> MemoryPlan:
        """The plan with a fits / does-not-fit verdict for each ``(name, bytes)`` device."""
        return dataclasses.replace(self, verdicts=verdicts(self.peak_bytes, devices))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _axis_size(mesh: Mesh, axes: Any) -> int:
    """Devices a logical axis is split over (``axes``: a mesh axis name, a tuple of them or
    None)."""
    if axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in names)


def activation_estimate(cfg: Config, stage: str, mesh: Mesh, seq_len: int,
                        batch_per_device: int, block_params: int) -> dict[str, int]:
    """A rough per-device activation estimate in bytes, independent of XLA: ``residuals`` plus
    the largest of the other terms, the phases of the backward pass, which run one after
    another (``estimate_total``).

    With ``T`` tokens the backbone runs over ``L = T/2`` latents (PIPO) or ``T`` positions (AR),
    ``b`` rows per device, ``H = d_model``; a ``layer``'s intermediates are ``b·L·(8H + 3·mlp)``
    compute-dtype values (norm outputs, projections, MLP gate/up/activation) plus, for full
    attention in the materialised form (``model.attention_impl`` ``xla``), ``b·heads·L²``
    scores: float32 scores and their gradient, compute-dtype probabilities. The ``blockwise``
    form keeps none of them for the backward pass; it recomputes one query block at a time,
    ``b·heads·block·L`` of them (the ``attention`` phase); the fused kernels (``cudnn``,
    ``splash``) keep a float32 log-sum-exp and one tile, ``b·heads·L`` values. A Gated DeltaNet
    layer adds its chunked form's float32 intermediates (``deltanet.chunked``, linear in ``L``),
    twice for values and cotangents: the convolution's input and output (``2·conv_dim``), q, k
    and v at the value heads and their chunked copies (``6·Nv·dk``), the chunk products
    (decay, ``kk``, ``M``, ``A``, ``qk``: ``5·Nv·C``), the solve's right-hand side and solution
    (``2·Nv·(dk+dv)``), its outputs (``4·Nv·dk``), and one state per chunk (``Nv·dk·dv/C``),
    all per position. Heads, MLP and vocabulary are divided by their mesh split.

    * ``residuals``: kept from the forward pass to the backward. With remat, one ``b×L×H`` block
      input per scanned block (``layer``: per decoder layer); without, every layer's
      intermediates.
    * ``block`` (remat): one block recomputed for its backward pass (``layer``: the largest
      layer), plus its weights (``block_params``, a block's) in the compute dtype (and gathered
      in the parameter dtype under fsdp).
    * ``mtp_layer`` (PIPO): the MTP head's layer, which is not rematerialised.
    * ``loss_chunk``: one ``loss_chunk × V`` float32 chunk of logits, its softmax and gradient.
    """
    mcfg = cfg.model_of(stage)
    tc: TrainConfig = getattr(cfg, stage)
    pipo = stage in PIPO_STAGES
    rules = dict(sharding.LOGICAL_AXIS_RULES)
    length = seq_len // 2 if pipo else seq_len
    # With accumulation the activations are one micro-batch's.
    b, h = max(batch_per_device // tc.grad_accum, 1), mcfg.d_model
    dt = jnp.dtype(dtype_of(mcfg.dtype)).itemsize
    pdt = jnp.dtype(dtype_of(mcfg.param_dtype)).itemsize
    mlp = mcfg.mlp_dim // _axis_size(mesh, rules.get("mlp"))
    heads = max(mcfg.n_heads // _axis_size(mesh, rules.get("heads")), 1)
    vocab = mcfg.vocab_size // _axis_size(mesh, rules.get("vocab"))
    linear = b * length * (8 * h + 3 * mlp) * dt
    impl = resolve_impl(mcfg.attention_impl, length, dtype_of(mcfg.dtype),
                        mesh.devices.flat[0].platform, check=False)
    per_score = 4 + 4 + dt
    attention, attention_phase = 0, 0
    if impl == "xla":
        attention = b * heads * length * length * per_score
    elif impl == "blockwise":
        attention_phase = b * heads * min(mcfg.attention_block, length) * length * per_score
    else:
        attention_phase = b * heads * length * 8

    nv = max(mcfg.linear_n_value_heads // _axis_size(mesh, rules.get("heads")), 1)
    dk, dv, chunk = mcfg.linear_key_head_dim, mcfg.linear_value_head_dim, mcfg.linear_chunk
    conv = mcfg.linear_conv_dim // _axis_size(mesh, rules.get("mlp"))
    deltanet = 2 * 4 * b * length * (2 * conv + 6 * nv * dk + 5 * nv * chunk
                                     + 2 * nv * (dk + dv) + 4 * nv * dk + nv * dk * dv // chunk)

    def layer(kind: str) -> int:
        return linear + (attention if kind == "full_attention" else
                         deltanet if kind == "linear_attention" else 0)

    pattern = mcfg.layer_pattern
    terms: dict[str, int] = {}
    if mcfg.remat_policy == "none":
        terms["residuals"] = mcfg.n_blocks * sum(layer(k) for k in pattern)
    elif mcfg.remat_policy == "layer":
        terms["residuals"] = mcfg.n_layers * b * length * h * dt
        weights = block_params // len(pattern) // mesh.shape["tensor"]
        terms["block"] = (max(layer(k) for k in pattern)
                          + weights * (dt + (pdt if mesh.shape["fsdp"] > 1 else 0)))
    else:
        terms["residuals"] = mcfg.n_blocks * b * length * h * dt
        weights = block_params // mesh.shape["tensor"]
        terms["block"] = (sum(layer(k) for k in pattern)
                          + weights * (dt + (pdt if mesh.shape["fsdp"] > 1 else 0)))
    if pipo:
        terms["mtp_layer"] = layer("full_attention")
    if attention_phase:
        terms["attention"] = attention_phase
    terms["loss_chunk"] = 3 * min(tc.loss_chunk, b * length) * vocab * 4
    return terms


def estimate_total(terms: dict[str, int]) -> int:
    """``residuals`` + the largest phase of ``activation_estimate``'s terms."""
    return terms["residuals"] + max(v for k, v in terms.items() if k != "residuals")


def plan_memory(cfg: Config, stage: str, mesh: Mesh, seq_len: int, global_batch: int,
                compile_step: bool = True, simulated: bool = False,
                topology: str | None = None) -> MemoryPlan:
    """Plans one train step of ``stage`` on ``mesh`` for a ``global_batch × seq_len`` batch.

    Nothing is allocated: the state is ``jax.eval_shape``d and the step compiled on
    ``jax.ShapeDtypeStruct`` inputs (tokens B×T int32, loss_mask B×T bool). With
    ``compile_step=False`` only the state is sized (seconds instead of minutes for a 9B model).
    """
    if stage not in PLANNED_STAGES:
        raise ConfigError(f"--stage {stage} cannot be planned; one of {', '.join(PLANNED_STAGES)} "
                          "(the opd step also runs rollouts and a teacher)")
    if seq_len <= 0 or seq_len % 2:
        raise ConfigError(f"--seq-len must be a positive even number, got {seq_len}")
    if global_batch <= 0:
        raise ConfigError(f"--batch-size must be positive, got {global_batch}")
    sharding.check_batch(mesh, global_batch, "the global batch (--batch-size)")
    if global_batch % getattr(cfg, stage).grad_accum:
        raise ConfigError(f"the global batch (--batch-size) {global_batch} does not split into "
                          f"{stage}.grad_accum={getattr(cfg, stage).grad_accum} micro-batches")
    batch_parallel = sharding.batch_parallel(mesh)
    tc: TrainConfig = getattr(cfg, stage)
    mcfg = cfg.model_of(stage)
    pipo = stage in PIPO_STAGES
    tx = make_optimizer(tc)
    abstract, shardings = state_shardings(mcfg, pipo, tx, mesh, tc.tuner, tc.adapters)

    params_bytes = tree_bytes_per_device(abstract.params, shardings.params)
    opt_bytes = tree_bytes_per_device(abstract.opt_state, shardings.opt_state)
    # Gradients: one per trained parameter, same dtype and layout as the parameter.
    trained = lora_lib.partition(abstract.params, tc.tuner)[0]
    trained_sh = lora_lib.partition(shardings.params, tc.tuner)[0]
    grads_bytes = tree_bytes_per_device(trained, trained_sh)

    batch_sh = sharding.batch_sharding(mesh)
    batch = {"tokens": jax.ShapeDtypeStruct((global_batch, seq_len), jnp.int32, sharding=batch_sh),
             "loss_mask": jax.ShapeDtypeStruct((global_batch, seq_len), jnp.bool_,
                                               sharding=batch_sh)}
    batch_bytes = tree_bytes_per_device(batch, {"tokens": batch_sh, "loss_mask": batch_sh})
    per_device = global_batch // batch_parallel
    block_params = sum(x.size for x in jax.tree.leaves(abstract.params["backbone"]["layers"]))
    terms = activation_estimate(cfg, stage, mesh, seq_len, per_device,
                                block_params // mcfg.n_blocks)
    common = dict(
        stage=stage, mesh=dict(mesh.shape), seq_len=seq_len, global_batch=global_batch,
        batch_per_device=per_device, tuner=tc.tuner, remat_policy=mcfg.remat_policy,
        loss_chunk=tc.loss_chunk, backend=mesh.devices.flat[0].platform, simulated=simulated,
        params_bytes=params_bytes, opt_state_bytes=opt_bytes, grads_bytes=grads_bytes,
        batch_bytes=batch_bytes, activations_estimate_bytes=estimate_total(terms),
        estimate_terms=terms, attention_impl=mcfg.attention_impl, grad_accum=tc.grad_accum,
        topology=topology)
    if not compile_step:
        return MemoryPlan(**common, compiled=False,
                          peak_bytes=params_bytes + opt_bytes + grads_bytes + batch_bytes)

    state_in = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
    t0 = time.perf_counter()
    # The step exactly as supervised.train_stage jits it, traced in the mesh context that places
    # the model's activation constraints.
    cfg = dataclasses.replace(cfg, **{field: planning_model(getattr(cfg, field), common["backend"])
                                      for field in ("model", "teacher_model")})
    compiled_impl = cfg.model_of(stage).attention_impl
    with jax.set_mesh(mesh):
        step_fn = jit_train_step(cfg, stage, tx, mesh, shardings)
        compiled = compile_or_refuse(step_fn.lower(state_in, batch), common["backend"],
                                     "the step")
    compile_seconds = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    if stats is None:
        raise ConfigError(f"the {common['backend']} backend reports no memory analysis; rerun "
                          "with --state-only")
    temp = int(stats.temp_size_in_bytes)
    peak = int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               - stats.alias_size_in_bytes + temp + stats.generated_code_size_in_bytes)
    return MemoryPlan(
        **common, compiled=True, peak_bytes=peak, compile_seconds=round(compile_seconds, 1),
        attention_impl_compiled=compiled_impl,
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes), alias_bytes=int(stats.alias_size_in_bytes),
        temp_bytes=temp, code_bytes=int(stats.generated_code_size_in_bytes),
        activations_bytes=max(temp - grads_bytes, 0))


# ----------------------------------------------------------------------------- output


def _estimate_text(terms: dict[str, int]) -> str:
    phases = ", ".join(f"{k} {human_bytes(v)}" for k, v in terms.items() if k != "residuals")
    return f"residuals {human_bytes(terms['residuals'])} + max({phases})"


def format_plan(plan: MemoryPlan, config_name: str) -> str:
    """The human-readable table (per device; KiB/MiB/GiB are powers of 2)."""
    mesh = ",".join(f"{k}={v}" for k, v in plan.mesh.items())
    n_devices = math.prod(plan.mesh.values())
    where = compiled_where(plan.backend, n_devices, plan.simulated, plan.topology)
    rows = [
        ("parameters", plan.params_bytes, "exact: eval_shape × shardings"),
        ("optimizer state", plan.opt_state_bytes,
         f"exact: AdamW state of the {plan.tuner} trainable set"),
        ("gradients", plan.grads_bytes, "exact: trained parameters in param dtype"),
        ("batch", plan.batch_bytes, "tokens int32 + loss_mask bool"),
    ]
    if plan.compiled:
        rows += [
            ("activations/temporaries", plan.activations_bytes,
             f"compiled ({where}): temp − gradients"),
            ("  analytic activations", plan.activations_estimate_bytes,
             "rough check: " + _estimate_text(plan.estimate_terms)),
            ("temp (compiled)", plan.temp_bytes, "gradients + activations + workspace"),
            ("peak", plan.peak_bytes, "compiled: arguments + temp + non-donated outputs + code"),
        ]
    else:
        rows += [
            ("  analytic activations", plan.activations_estimate_bytes,
             "rough, not in the peak: " + _estimate_text(plan.estimate_terms)),
            ("peak (state only)", plan.peak_bytes,
             "--state-only: parameters + optimizer + gradients + batch, a lower bound"),
        ]
    how = (f"compiled on {where} in {plan.compile_seconds:.1f}s" if plan.compiled
           else "step not compiled (--state-only)")
    lines = [
        f"memory plan: {config_name}, stage {plan.stage} ({plan.tuner}, remat "
        f"{plan.remat_policy}, loss_chunk {plan.loss_chunk}, attention {plan.attention_impl}"
        + (f", compiled as {plan.attention_impl_compiled}"
           if plan.attention_impl_compiled not in (None, plan.attention_impl) else "") + ")",
        f"mesh {mesh}; seq_len {plan.seq_len}; global batch {plan.global_batch} "
        f"({plan.batch_per_device} per batch-parallel device"
        + (f", in {plan.grad_accum} micro-batches" if plan.grad_accum > 1 else "") + f"); {how}",
        "",
        f"{'per device':<26}{'bytes':>12}  how",
    ]
    lines += [f"{name:<26}{human_bytes(n):>12}  {note}" for name, n, note in rows]
    if plan.verdicts:
        lines.append("")
    word = "fits" if plan.compiled else "state fits (activations not planned)"
    lines += [verdict_line(v, word) for v in plan.verdicts]
    if plan.compiled and plan.backend == "cpu":
        lines += ["", "note: the temporaries are XLA:CPU's; a TPU or GPU compile fuses and "
                      "schedules differently and keeps bfloat16 as bfloat16, so treat them as "
                      "an estimate; run the planner on the target for its own numbers."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command line


def simulation_command(argv: list[str], n_devices: int) -> tuple[list[str], dict[str, str]]:
    """The command and environment that re-run the planner on ``n_devices`` simulated CPU
    devices: XLA reads the device count once, when its backend starts, so a process that has
    started one cannot change it."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={n_devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    return [sys.executable, "-m", "pipo_jax.train.plan", *argv, _CHILD_FLAG], env


def _simulate(argv: list[str], n_devices: int) -> int:
    """Runs ``simulation_command`` in a child process and returns its exit status."""
    print(f"note: the mesh needs {n_devices} device{'s' if n_devices > 1 else ''} and this "
          f"machine has {jax.device_count()} ({jax.default_backend()}); planning on "
          f"{n_devices} simulated CPU devices in a child process", file=sys.stderr, flush=True)
    cmd, env = simulation_command(argv, n_devices)
    return subprocess.run(cmd, env=env, check=False).returncode


def teacher_model(cfg: Config, args: argparse.Namespace) -> ModelConfig:
    """The OPD teacher's architecture: ``--teacher-config``'s ``model``, else the config saved
    with the checkpoint in ``opd.teacher_dir`` (``<run_dir>/teacher`` when empty)."""
    if args.teacher_config:
        return load_config(args.teacher_config).model
    teacher_dir = Path(cfg.opd.teacher_dir or Path(cfg.run_dir) / "teacher")
    if not teacher_dir.is_dir():
        raise ConfigError(f"no teacher checkpoint in {teacher_dir} to take its model from: give "
                          "--teacher-config FILE (a config whose model is the teacher)")
    return ckpt.restore_config(teacher_dir).model_of(stage_of(teacher_dir, False))


def _main_opd(args: argparse.Namespace, cfg: Config, teacher: ModelConfig, mesh: Mesh,
              batch_size: int, devices: list[tuple[str, int]], simulated: bool) -> int:
    prompt_len = cfg.opd.prompt_bucket if args.prompt_len is None else args.prompt_len
    plan = plan_opd_memory(cfg, teacher, mesh, prompt_len, batch_size,
                           simulated=simulated, topology=args.topology).with_devices(devices)
    print(format_opd_plan(plan, args.config), flush=True)
    if args.json:
        payload = dict(plan.to_json(), config=args.config, overrides=list(args.overrides),
                       teacher_config=args.teacher_config)
        with reporting(args.json, elsewhere="choose another --json"):
            Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipo_jax.train.plan", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--stage", default="sft", choices=(*PLANNED_STAGES, "opd"),
                        help="the stage whose train step is planned (default: sft); opd plans "
                             "rollout, teacher scoring and update with both models resident")
    parser.add_argument("--teacher-config", default=None, metavar="FILE",
                        help="opd: a YAML config whose `model` is the teacher (default: the "
                             "config saved in opd.teacher_dir, when it exists)")
    parser.add_argument("--prompt-len", type=int, default=None,
                        help="opd: prompt tokens per rollout (default: opd.prompt_bucket); each "
                             "rollout runs to opd.rollout_max_new_tokens")
    parser.add_argument("--mesh", default=None,
                        help="mesh sizes, e.g. data=1,fsdp=8,tensor=1 (axes left out are 1; one "
                             "may be -1: see --num-devices); default: the config's mesh")
    parser.add_argument("--num-devices", type=int, default=None,
                        help="total devices, to resolve a -1 mesh axis (default: this machine's)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="tokens per row (default: data.max_len)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="global batch in rows (default: the stage's batch_size)")
    parser.add_argument("--device", action="append", default=[], metavar="NAME",
                        help=f"device preset to check against (repeatable): "
                             f"{', '.join(DEVICE_PRESETS)}")
    parser.add_argument("--device-memory", default=None, metavar="BYTES",
                        help="device memory to check against, e.g. 80GiB or 85899345920")
    parser.add_argument("--simulate", action="store_true",
                        help="compile on simulated CPU devices even where this machine has "
                             "enough accelerators (their compile can fail on an intermediate "
                             "that does not fit)")
    parser.add_argument("--topology", default=None, metavar="NAME",
                        help="compile for a TPU slice without one, with the TPU compiler: a "
                             "libtpu topology such as v5p:2x2x2 (8 v5p chips); the mesh takes "
                             "its devices. Needs `pip install libtpu`")
    parser.add_argument("--state-only", action="store_true",
                        help="skip compiling the step: parameters, optimizer state and gradients "
                             "only (seconds, where a 9B compile takes minutes)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the plan here")
    parser.add_argument(_CHILD_FLAG, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. model.remat_policy=none sft.loss_chunk=1024")
    args = parser.parse_intermixed_args(argv)

    cfg = load_config(args.config, args.overrides)
    if args.stage == "opd" and args.state_only:
        raise ConfigError("--state-only does not apply to --stage opd: its plan is the peak of "
                          "three compiled programs")
    if args.stage != "opd" and (args.teacher_config or args.prompt_len is not None):
        raise ConfigError("--teacher-config and --prompt-len are for --stage opd")
    # Before any device or child process: a missing teacher fails early.
    teacher = teacher_model(cfg, args) if args.stage == "opd" else None
    devices = resolve_devices(args.device, args.device_memory)  # bad presets fail before compiling
    mesh_cfg = parse_mesh(args.mesh) if args.mesh else cfg.mesh
    if args.topology is not None and (args.simulate or args.num_devices is not None):
        raise ConfigError("--topology gives the devices: leave out --simulate and --num-devices")
    target = topology_devices(args.topology) if args.topology is not None else None
    if target is None:
        n_devices = mesh_device_count(mesh_cfg, args.num_devices, jax.device_count())
    else:
        fixed = (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
        n_devices = len(target) if -1 in fixed else math.prod(fixed)
        if n_devices != len(target):
            raise ConfigError(f"--topology {args.topology} has {len(target)} chips but the mesh "
                              f"needs {n_devices}; give a --mesh of {len(target)} devices")
    if (-1 in (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor) and args.num_devices is None
            and target is None):
        print(f"note: the mesh's -1 axis takes this machine's {n_devices} device(s); give "
              "--num-devices N or every size with --mesh to plan another machine",
              file=sys.stderr, flush=True)
    tc: TrainConfig = getattr(cfg, args.stage)
    seq_len = cfg.data.max_len if args.seq_len is None else args.seq_len
    batch_size = tc.batch_size if args.batch_size is None else args.batch_size
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    if -1 in sizes:
        sizes[sizes.index(-1)] = max(n_devices // -math.prod(sizes), 1)
    if batch_size % (sizes[0] * sizes[1]):  # before a child process is started for nothing
        raise ConfigError(f"the global batch (--batch-size) is {batch_size}, which data × fsdp = "
                          f"{sizes[0] * sizes[1]} cannot split evenly")
    simulated = args.simulated_child
    if simulated and n_devices > jax.device_count():
        raise ConfigError(f"the simulated CPU backend has {jax.device_count()} devices, not "
                          f"{n_devices}: XLA_FLAGS was not honoured")
    if target is None and not simulated and (args.simulate or n_devices > jax.device_count()):
        return _simulate(argv, n_devices)
    mesh = sharding.build_mesh(mesh_cfg, target or jax.devices()[:n_devices])
    if args.stage == "opd":
        assert teacher is not None
        return _main_opd(args, cfg, teacher, mesh, batch_size, devices, simulated)
    plan = plan_memory(cfg, args.stage, mesh, seq_len, batch_size,
                       compile_step=not args.state_only, simulated=simulated,
                       topology=args.topology)
    plan = plan.with_devices(devices)
    print(format_plan(plan, args.config), flush=True)
    if args.json:
        payload = dict(plan.to_json(), config=args.config, overrides=list(args.overrides))
        with reporting(args.json, elsewhere="choose another --json"):
            Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

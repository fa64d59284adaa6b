"""The memory planner (``python -m pipo_jax.train.plan``): exact state bytes, compiled temporaries,
verdicts, errors, and per-device bytes on a simulated 8-device mesh."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from pipo_jax.cli import parse_bytes, run_main
from pipo_jax.config import ConfigError, MeshConfig, load_config
from pipo_jax.errors import ConvertError
from pipo_jax.model.pipo import init_params
from pipo_jax.model.sharding import build_mesh
from pipo_jax.train import plan as plan_lib

REPO = Path(__file__).resolve().parent.parent
MICRO = str(REPO / "configs" / "micro.yaml")
# The micro model as a plain attention stack (no Gated DeltaNet): short to compile and simple to
# count by hand.
PLAIN = ["model.family=qwen3", "model.layer_types=[full_attention,full_attention]"]


def _one_device_mesh() -> jax.sharding.Mesh:
    return build_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])


def _hand_counts(overrides: list[str]) -> tuple[int, int]:
    """(parameters, LoRA adapter parameters) of the plain AR micro model, from its config."""
    cfg = load_config(MICRO, PLAIN + overrides)
    m = cfg.model
    h, n, k, d, f, r = m.d_model, m.n_heads, m.n_kv_heads, m.head_dim, m.mlp_dim, cfg.ar.lora.rank
    per_layer = (h * n * d + 2 * h * k * d + n * d * h  # q, k, v, o projections
                 + 2 * d + 2 * h                        # q/k norms, input/post-attention norms
                 + 3 * h * f)                           # gate, up, down
    params = m.n_layers * per_layer + m.vocab_size * h + h  # + embedding (tied) + final norm
    adapters_per_layer = ((h + n * d) + 2 * (h + k * d) + (n * d + h)  # q, k, v, o: A + B
                          + 3 * (h + f))                               # gate, up, down
    return params, m.n_layers * adapters_per_layer * r


@pytest.mark.parametrize("tuner", ["full", "lora"])
def test_state_bytes_match_a_hand_count(tuner: str) -> None:
    overrides = [f"ar.tuner={tuner}", "ar.lora.rank=4"]
    cfg = load_config(MICRO, PLAIN + overrides)
    plan = plan_lib.plan_memory(cfg, "ar", _one_device_mesh(), seq_len=64, global_batch=2,
                                compile_step=False)
    params, adapters = _hand_counts(overrides)
    f32 = 4
    trained = params if tuner == "full" else adapters
    assert plan.params_bytes == f32 * (params + (adapters if tuner == "lora" else 0))
    assert plan.grads_bytes == f32 * trained
    # AdamW: two moments per trained parameter, plus two int32 step counts (Adam, schedule).
    assert plan.opt_state_bytes == 2 * f32 * trained + 2 * 4
    assert plan.batch_bytes == 2 * 64 * (4 + 1)  # int32 tokens + bool mask
    assert not plan.compiled and plan.temp_bytes is None
    assert plan.peak_bytes == (plan.params_bytes + plan.opt_state_bytes + plan.grads_bytes
                               + plan.batch_bytes)


@pytest.fixture(scope="module")
def compiled_plan() -> plan_lib.MemoryPlan:
    """One compiled plan of the plain micro AR step (the only compile in this module)."""
    cfg = load_config(MICRO, PLAIN)
    return plan_lib.plan_memory(cfg, "ar", _one_device_mesh(), seq_len=32, global_batch=2)


def test_compiled_step_has_temporaries(compiled_plan: plan_lib.MemoryPlan) -> None:
    p = compiled_plan
    assert p.compiled and p.backend == jax.default_backend() and not p.simulated
    assert p.temp_bytes > 0 and p.activations_bytes > 0
    # The executable's arguments are the state (plus its int32 step) and the batch.
    assert p.argument_bytes == p.params_bytes + p.opt_state_bytes + 4 + p.batch_bytes
    assert p.peak_bytes >= p.argument_bytes + p.temp_bytes - p.alias_bytes
    phases = [v for k, v in p.estimate_terms.items() if k != "residuals"]
    assert p.activations_estimate_bytes == p.estimate_terms["residuals"] + max(phases) > 0


def test_a_compile_out_of_device_memory_is_a_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(self: jax.stages.Lowered) -> None:
        raise jax.errors.JaxRuntimeError(
            "NOT_FOUND: All configs failed during profiling.\nEXECUTION FAILED: "
            "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 64.02GiB")

    monkeypatch.setattr(jax.stages.Lowered, "compile", oom)
    with pytest.raises(ConfigError, match=r"^the step DOES NOT FIT a cpu device: compiling it ran "
                                          r"out of device memory \(EXECUTION FAILED: RESOURCE_EX"
                                          r"HAUSTED: Out of memory .* 64.02GiB\); fewer rows"):
        plan_lib.plan_memory(load_config(MICRO, PLAIN), "ar", _one_device_mesh(), seq_len=32,
                             global_batch=2)

    class Lowered:  # what the TPU compiler says of a program over its HBM
        def compile(self) -> None:
            raise jax.errors.JaxRuntimeError(
                "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, the "
                "total memory required for HLO temporaries (227.29G) exceeds available HBM "
                "(95.73G). HLO module: jit_opd_update.\nSee https://openxla.org/xla/errors")

    with pytest.raises(ConfigError, match=r"the opd update program DOES NOT FIT a tpu device.*"
                                          r"\(227.29G\) exceeds available HBM"):
        plan_lib.compile_or_refuse(Lowered(), "tpu", "the opd update program")
    with pytest.raises(ConfigError, match="xla_gpu_autotune_level=0"):
        plan_lib.compile_or_refuse(Lowered(), "gpu", "the step")


def test_verdict_flips_at_the_peak(compiled_plan: plan_lib.MemoryPlan) -> None:
    peak = compiled_plan.peak_bytes
    plan = compiled_plan.with_devices([("exact", peak), ("one byte short", peak - 1)])
    exact, short = plan.verdicts
    assert (exact.fits, exact.headroom_bytes) == (True, 0)
    assert (short.fits, short.headroom_bytes) == (False, -1)
    text = plan_lib.format_plan(plan, "micro")
    assert "exact (" in text and "fits, headroom 0 B" in text
    assert "one byte short" in text and "DOES NOT FIT, short by 1 B" in text
    assert json.loads(json.dumps(plan.to_json()))["verdicts"][1]["fits"] is False


def test_device_presets_and_memory_sizes() -> None:
    assert plan_lib.resolve_devices(["tpu-v5p", "h100-80gb"], "12.5GB") == [
        ("tpu-v5p", 95 * 2 ** 30), ("h100-80gb", 81559 * 2 ** 20),
        ("12.5GB device", 12_500_000_000)]
    assert parse_bytes("80GiB", "--device-memory") == 80 * 2 ** 30
    assert parse_bytes("1024", "--device-memory") == 1024
    with pytest.raises(ConfigError, match="unknown --device 'tpu-v9'; presets: tpu-v4"):
        plan_lib.resolve_devices(["tpu-v9"], None)
    for bad in ("lots", "-1GB", "8 parsecs"):
        with pytest.raises(ConfigError, match="must be a positive number with an optional unit"):
            parse_bytes(bad, "--device-memory")
    # The same parser reads the converter's --max-shard-size (transformers' units).
    assert parse_bytes("2GB", "--max-shard-size") == 2 * 10 ** 9
    assert parse_bytes("500MiB", "--max-shard-size") == 500 * 2 ** 20
    assert parse_bytes("1e6", "--max-shard-size") == 10 ** 6
    with pytest.raises(ConvertError, match="--max-shard-size '0.5' must be a positive number"):
        parse_bytes("0.5", "--max-shard-size", ConvertError)


@pytest.mark.parametrize("text, message", [
    ("fsdp:8", "each item must be AXIS=SIZE"),
    ("pipeline=2", "each item must be AXIS=SIZE with AXIS one of data, fsdp, tensor"),
    ("fsdp=8,fsdp=2", "axis fsdp is given twice"),
    ("fsdp=two", "size of fsdp must be an integer"),
    ("tensor=0", "size of tensor must be positive or -1"),
    (",", "names no axis"),
])
def test_bad_mesh_strings(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_lib.parse_mesh(text)


def test_mesh_strings() -> None:
    assert plan_lib.parse_mesh("fsdp=8") == MeshConfig(data=1, fsdp=8, tensor=1)
    assert plan_lib.parse_mesh("data=2, tensor=-1") == MeshConfig(data=2, fsdp=1, tensor=-1)
    assert plan_lib.mesh_device_count(MeshConfig(data=2, fsdp=1, tensor=-1), 8, 1) == 8
    assert plan_lib.mesh_device_count(MeshConfig(data=1, fsdp=-1, tensor=1), None, 4) == 4
    assert plan_lib.mesh_device_count(MeshConfig(data=2, fsdp=4, tensor=1), None, 1) == 8
    with pytest.raises(ConfigError, match="has 8 devices but --num-devices is 16"):
        plan_lib.mesh_device_count(MeshConfig(data=2, fsdp=4, tensor=1), 16, 1)


def test_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(plan_lib.main, ["--config", MICRO, "--mesh", "fsdp:8"]) == 2
    assert "error: --mesh 'fsdp:8': each item must be AXIS=SIZE" in capsys.readouterr().err
    assert run_main(plan_lib.main, ["--config", MICRO, "--device", "tpu-v9"]) == 2
    assert "error: unknown --device 'tpu-v9'" in capsys.readouterr().err
    # Checked before any child process is started for a mesh this machine lacks.
    assert run_main(plan_lib.main, ["--config", MICRO, "--mesh", "fsdp=3"]) == 2
    err = capsys.readouterr().err
    assert "error: the global batch (--batch-size) is 4, which data × fsdp = 3 cannot" in err
    assert "child process" not in err


def test_a_mesh_larger_than_the_machine_reruns_on_simulated_devices(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    runs: list[tuple[list[str], dict[str, str]]] = []

    def fake_run(cmd: list[str], env: dict[str, str], check: bool) -> subprocess.CompletedProcess:
        runs.append((cmd, env))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(plan_lib.subprocess, "run", fake_run)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_thunk_runtime=true")
    n = jax.device_count() + 1
    argv = ["--config", MICRO, "--mesh", f"fsdp={n}", "--state-only"]
    assert plan_lib.main(argv) == 0
    (cmd, env), = runs
    assert cmd == [sys.executable, "-m", "pipo_jax.train.plan", *argv, "--simulated-child"]
    assert env["XLA_FLAGS"] == ("--xla_cpu_use_thunk_runtime=true "
                                f"--xla_force_host_platform_device_count={n}")
    assert env["JAX_PLATFORMS"] == "cpu"
    assert f"planning on {n} simulated CPU devices in a child process" in capsys.readouterr().err
    # --simulate asks for the same even where the devices exist.
    argv = ["--config", MICRO, "--mesh", "data=1", "--state-only", "--simulate"]
    assert plan_lib.main(argv) == 0
    assert runs[1][0][-2:] == ["--simulate", "--simulated-child"]


def test_fsdp_shards_the_state_on_simulated_devices(tmp_path: Path) -> None:
    """One child process, run as the planner re-runs itself: on 8 simulated CPU devices with
    fsdp=8, each device holds about an eighth of the state one device holds alone."""
    out = tmp_path / "plan.json"
    cmd, env = plan_lib.simulation_command(
        ["--config", MICRO, "--mesh", "fsdp=8", "--batch-size", "8", "--state-only",
         "--json", str(out)], 8)
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "mesh data=1,fsdp=8,tensor=1" in p.stdout and "step not compiled" in p.stdout
    sharded = json.loads(out.read_text())
    assert sharded["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and sharded["simulated"]

    whole = plan_lib.plan_memory(load_config(MICRO), "sft", _one_device_mesh(),
                                 seq_len=256, global_batch=8, compile_step=False)
    for key in ("params_bytes", "opt_state_bytes", "grads_bytes"):
        one = getattr(whole, key)
        # Norm scales over head_dim and the DeltaNet's per-head vectors are not split.
        assert one / 8 <= sharded[key] < one / 4, key
    assert sharded["batch_bytes"] == whole.batch_bytes // 8  # one row of 8 per device


def test_blockwise_attention_plans_linear_activation_memory() -> None:
    """At 4096 latents the analytic estimate of the materialised form carries ``b·heads·L²``
    scores per layer; the blockwise form one query block of them: smaller by about ``L /
    block``. The compiled temporaries of the two agree in direction (a short compile at 1024
    latents). A cudnn config planned on CPU compiles with the blockwise stand-in."""
    def terms(impl: str, seq_len: int) -> dict[str, int]:
        cfg = load_config(MICRO, PLAIN + [f"model.attention_impl={impl}",
                                          "model.attention_block=256"])
        mesh = _one_device_mesh()
        return plan_lib.activation_estimate(cfg, "sft", mesh, seq_len, 1, 0)

    xla, block = terms("xla", 8192), terms("blockwise", 8192)
    scores = 1 * 2 * 4096 * 4096 * (4 + 4 + 4)  # b · heads · L² · (f32 scores, grad, probs)
    assert xla["residuals"] - block["residuals"] >= 2 * scores  # two layers
    assert block["attention"] == 1 * 2 * 256 * 4096 * 12
    assert plan_lib.estimate_total(xla) > 8 * plan_lib.estimate_total(block)

    def temp(impl: str) -> int:
        cfg = load_config(MICRO, PLAIN + [f"model.attention_impl={impl}",
                                          "model.attention_block=128", "sft.batch_size=1"])
        return plan_lib.plan_memory(cfg, "sft", _one_device_mesh(), seq_len=2048,
                                    global_batch=1).temp_bytes

    assert temp("blockwise") < temp("xla") / 2
    cfg = load_config(MICRO, PLAIN + ["model.attention_impl=cudnn", "model.dtype=bfloat16"])
    plan = plan_lib.plan_memory(cfg, "ar", _one_device_mesh(), seq_len=32, global_batch=2)
    assert (plan.attention_impl, plan.attention_impl_compiled) == ("cudnn", "blockwise")
    assert "attention cudnn, compiled as blockwise" in plan_lib.format_plan(plan, "micro")


def test_accumulation_plans_one_micro_batch_of_activations() -> None:
    cfg = load_config(MICRO, PLAIN + ["sft.batch_size=8", "sft.grad_accum=4"])
    mesh = _one_device_mesh()
    one = plan_lib.activation_estimate(load_config(MICRO, PLAIN), "sft", mesh, 256, 2, 0)
    four = plan_lib.activation_estimate(cfg, "sft", mesh, 256, 8, 0)
    assert four == one  # 8 rows in 4 micro-batches: 2 rows of activations at a time
    with pytest.raises(ConfigError, match="does not split into sft.grad_accum=4"):
        plan_lib.plan_memory(cfg, "sft", mesh, seq_len=64, global_batch=6, compile_step=False)


def test_opd_plan_holds_student_and_teacher_and_peaks_at_one_program(tmp_path: Path) -> None:
    """``--stage opd``: the resident state is the student's train state plus the teacher's
    parameters (exact), every program's live bytes add its own to them, and the peak is the
    largest program. The teacher is another model (``--teacher-config``) than the student."""
    teacher_cfg = tmp_path / "teacher.yaml"  # the micro config's model, wider
    teacher_cfg.write_text(Path(MICRO).read_text().replace("d_model: 32", "d_model: 48", 1))
    out = tmp_path / "opd.json"
    argv = ["--config", MICRO, "--stage", "opd", "--teacher-config", str(teacher_cfg),
            "--mesh", "fsdp=1", "--batch-size", "2", "--prompt-len", "10",
            "--device-memory", "1GiB", "--json", str(out), "opd.rollout_max_new_tokens=12"]
    assert run_main(plan_lib.main, argv) == 0
    plan = json.loads(out.read_text())
    cfg = load_config(MICRO)
    student = plan_lib.plan_memory(cfg, "sft", _one_device_mesh(), 64, 2, compile_step=False)
    teacher = load_config(teacher_cfg).model
    assert teacher.d_model == 48
    params = jax.eval_shape(lambda: init_params(teacher, False, jax.random.key(0)))
    teacher_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    assert plan["student_params_bytes"] == student.params_bytes
    assert plan["teacher_params_bytes"] == teacher_bytes
    assert plan["resident_bytes"] >= (plan["student_params_bytes"] + plan["student_opt_state_bytes"]
                                      + plan["teacher_params_bytes"])
    programs = {p["name"]: p for p in plan["programs"]}
    assert set(programs) == {"rollout", "score", "update"}
    for p in programs.values():
        assert p["live_bytes"] > plan["resident_bytes"] and p["temp_bytes"] > 0
    assert plan["peak_bytes"] == max(p["live_bytes"] for p in programs.values())
    assert programs[plan["peak_program"]]["live_bytes"] == plan["peak_bytes"]
    # The update donates the student's state: its new state is written in place.
    assert programs["update"]["alias_bytes"] >= plan["student_params_bytes"]
    # Prompts of 10 tokens in buckets of 32; rows hold the prompt and the whole budget.
    assert plan["prompt_len"] == 32 and plan["row_tokens"] >= 32 + 12
    assert plan["verdicts"][0]["fits"]


def test_opd_and_topology_errors_are_one_line(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    base = ["--config", MICRO, f"run_dir={tmp_path}/run"]
    assert run_main(plan_lib.main, [*base, "--stage", "opd"]) == 2
    assert "give --teacher-config FILE" in capsys.readouterr().err
    assert run_main(plan_lib.main, [*base, "--stage", "opd", "--state-only"]) == 2
    assert "--state-only does not apply to --stage opd" in capsys.readouterr().err
    assert run_main(plan_lib.main, [*base, "--prompt-len", "8"]) == 2
    assert "are for --stage opd" in capsys.readouterr().err
    assert run_main(plan_lib.main, [*base, "--topology", "v5p:2x2x2", "--simulate"]) == 2
    assert "--topology gives the devices" in capsys.readouterr().err
    if importlib.util.find_spec("libtpu") is None:
        assert run_main(plan_lib.main, [*base, "--topology", "v5p:2x2x2"]) == 2
        assert "--topology needs libtpu" in capsys.readouterr().err


def test_topology_devices_make_the_mesh_and_name_the_target(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``--topology`` builds the mesh on the slice's compile-only devices, in this process (no
    simulation child), and says so; a mesh of another size is a one-line error."""
    names: list[str] = []

    def fake_devices(name: str) -> list[jax.Device]:
        names.append(name)
        return jax.devices()[:1]

    monkeypatch.setattr(plan_lib, "topology_devices", fake_devices)
    monkeypatch.setattr(plan_lib.subprocess, "run", lambda *a, **k: pytest.fail("simulated"))
    argv = ["--config", MICRO, *PLAIN, "--stage", "ar", "--topology", "fake:1", "--mesh",
            "fsdp=-1", "--batch-size", "2", "--seq-len", "32"]
    assert plan_lib.main(argv) == 0
    assert names == ["fake:1"]
    assert "compiled on cpu fake:1, 1 compile-only devices" in capsys.readouterr().out
    assert run_main(plan_lib.main, [*argv[:-6], "--mesh", "fsdp=8"]) == 2
    assert "--topology fake:1 has 1 chips but the mesh needs 8" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install libtpu): the TPU compiler")
def test_a_tpu_topology_compiles_the_step_without_a_tpu() -> None:
    devices = plan_lib.topology_devices("v5p:2x2x1")
    assert len(devices) == 4 and devices[0].platform == "tpu"
    mesh = build_mesh(MeshConfig(data=1, fsdp=4, tensor=1), devices)
    plan = plan_lib.plan_memory(load_config(MICRO, PLAIN), "ar", mesh, seq_len=32,
                                global_batch=4, topology="v5p:2x2x1")
    assert plan.backend == "tpu" and plan.compiled and plan.temp_bytes > 0


def test_layer_remat_keeps_every_layer_input_and_recomputes_one_layer() -> None:
    def terms(policy: str) -> dict[str, int]:
        cfg = load_config(MICRO, [f"model.remat_policy={policy}"])
        return plan_lib.activation_estimate(cfg, "sft", _one_device_mesh(), 512, 2, 1000)

    full, layer = terms("full"), terms("layer")
    cfg = load_config(MICRO).model
    assert len(cfg.layer_pattern) == 2 and cfg.n_blocks == 1  # one block of two layers
    assert layer["residuals"] == 2 * full["residuals"]  # an input per layer, not per block
    assert layer["block"] < full["block"]  # the largest layer, not the block's two

"""The command-line scripts ``train.py`` and ``decode.py``, run as a user runs them.

One micro run is trained per module with ``train.py`` (the smoke test) and reused by the decode
tests (bad input and faults: tests/test_faults.py). Subprocesses share a persistent compilation
cache, so a script that jits what an earlier one compiled (same shapes) loads it instead of
compiling it again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import Proc, describe

REPO = Path(__file__).resolve().parents[1]
MICRO = "configs/micro.yaml"
# Fewer and shorter examples than micro.yaml's: the same code paths, faster to build and compile.
DATA_OVERRIDES = ["data.num_train=16", "data.max_len=128"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cache = tmp_path_factory.getbasetemp() / "jax-compilation-cache"
    # No GPU memory preallocation: on an accelerator the pytest process and several scripts
    # (the bad-input cases run concurrently) share one device.
    return dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONUNBUFFERED="1",
                XLA_PYTHON_CLIENT_PREALLOCATE="false")


def run_script(env: dict[str, str], script: str, *args: str, timeout: float = 300) -> Proc:
    p = subprocess.run([sys.executable, script, *args], cwd=REPO, env=env, capture_output=True,
                       text=True, errors="replace", timeout=timeout)
    return Proc(p.returncode, p.stdout, p.stderr)


@dataclasses.dataclass
class TrainedRun:
    run_dir: Path
    data_dir: Path
    train: Proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> TrainedRun:
    root = tmp_path_factory.mktemp("cli")
    run_dir, data_dir = root / "run", root / "tfds"
    proc = run_script(env, "train.py", "--config", MICRO, f"run_dir={run_dir}",
                      f"data.data_dir={data_dir}", *DATA_OVERRIDES, "--no-progress")
    assert proc.returncode == 0, describe(proc)
    return TrainedRun(run_dir, data_dir, proc)


# --------------------------------------------------------------------------- happy paths


def test_train_smoke_prints_config_and_checkpoints_both_stages(trained):
    out = trained.train.stdout
    cfg, end = json.JSONDecoder().raw_decode(out)  # the resolved config comes first
    assert cfg["run_dir"] == str(trained.run_dir)
    assert cfg["data"]["data_dir"] == str(trained.data_dir)
    assert cfg["data"]["max_len"] == 128 and cfg["model"]["d_model"] == 32  # override, file
    assert cfg["stages"] == ["ar", "sft"]
    summary = out[end:].strip().splitlines()
    for stage, line in zip(("ar", "sft"), summary, strict=True):
        assert line.startswith(f"{trained.run_dir / stage}: step {cfg[stage]['steps']} in ")
        assert "'loss_backbone'" in line
    assert "loss_mtp" in summary[1]
    for stage in ("ar", "sft"):
        steps = sorted(int(p.name) for p in (trained.run_dir / stage / "checkpoints").iterdir())
        assert steps == [2, 4]  # micro: 4 steps, a checkpoint every 2
        assert (trained.run_dir / stage / "metrics.jsonl").is_file()
    assert json.loads((trained.run_dir / "config.json").read_text()) == cfg
    assert "Traceback" not in trained.train.stderr


def test_decode_evaluates_both_models(trained, env, tmp_path):
    out = tmp_path / "eval" / "out.json"
    # Batch size 1 everywhere: the accuracy pass then reuses the timing pass's compiled
    # decode functions (and --prompt below reuses them through the compilation cache).
    p = run_script(env, "decode.py", "--run", str(trained.run_dir), "--num-problems", "4",
                   "--timing-problems", "1", "--batch-size", "1", "--no-progress",
                   "--out", str(out))
    assert p.returncode == 0, describe(p)
    lines = p.stdout.splitlines()
    header = next(line for line in lines if line.startswith("metric"))
    assert header.split() == ["metric", "PIPO", "AR", "PIPO/AR"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[lines.index(header) + 1:]
            if line and not line.startswith("wrote")}
    for key in ("pass@1", "commit_rate", "tokens_per_pass", "ttft_ms", "tpot_ms"):
        assert key in rows, p.stdout
    assert rows["tokens_per_pass"][2].endswith("x")  # the PIPO/AR column
    assert f"wrote {out}" in p.stdout

    result = json.loads(out.read_text())
    assert {"pipo", "ar", "ratios"} <= set(result)
    assert result["num_problems"] == 4 and result["run"] == str(trained.run_dir)
    assert result["options"] == {"batch_size": 1}
    for model in ("pipo", "ar"):
        res = result[model]
        assert 0.0 <= res["pass@1"] <= 1.0
        assert len(res["samples"]) == 4
        assert res["tokens_per_pass"] >= 1.0 and res["ttft_ms"] > 0
    assert result["ar"]["commit_rate"] == 0.0  # AR drafts nothing
    assert set(result["ratios"]) == {"tpot_speedup", "ttft_speedup", "pass@1_diff_points"}


def test_decode_prompt_prints_text_and_stats_of_both_models(trained, env):
    p = run_script(env, "decode.py", "--run", str(trained.run_dir), "--prompt",
                   "What is 12 + 34?")
    assert p.returncode == 0, describe(p)
    lines = p.stdout.splitlines()
    assert lines[0] == "--- pipo" and "--- ar" in lines
    blocks = {"pipo": lines[1:lines.index("--- ar")], "ar": lines[lines.index("--- ar") + 1:]}
    for model, block in blocks.items():
        stats = json.loads(block[-1])  # the text (any number of lines), then the stats
        assert {"tokens", "backbone_passes", "commit_rate", "tokens_per_pass"} <= set(stats)
        assert 0 < stats["tokens"] <= 32, (model, stats)  # micro: decode.max_new_tokens=32
    assert json.loads(blocks["ar"][-1])["drafts"] == 0


def test_decode_on_a_mesh_answers_as_on_one_device(trained, env):
    """``--mesh`` shards the parameters over two simulated devices and decodes with programs
    compiled for the mesh (both models: the prompt is padded to the batch-parallel size)."""
    args = ("decode.py", "--run", str(trained.run_dir), "--prompt", "What is 12 + 34?")
    one = run_script(env, *args)
    mesh = run_script(env, *args, "--mesh", "fsdp=2", "--cpu-devices", "2")
    assert one.returncode == 0 and mesh.returncode == 0, describe(mesh)
    assert mesh.stdout == one.stdout


def test_train_stage_opd_distills_the_run_and_decode_picks_it(trained, env, tmp_path):
    """``train.py --stage opd`` on a copy of the run (its AR model as the teacher), then
    ``decode.py --stage sft`` on the run that now has both PIPO stages."""
    run = tmp_path / "run"
    for stage in ("ar", "sft"):
        shutil.copytree(trained.run_dir / stage, run / stage)
    # Flags and overrides in any order: --stage between key=value overrides.
    p = run_script(env, "train.py", "--config", MICRO, f"run_dir={run}", "--stage", "opd",
                   f"data.data_dir={trained.data_dir}", *DATA_OVERRIDES,
                   f"opd.teacher_dir={run / 'ar'}", "opd.steps=2", "--no-progress")
    assert p.returncode == 0, describe(p)
    cfg, end = json.JSONDecoder().raw_decode(p.stdout)
    assert cfg["stages"] == ["opd"]
    (line,) = p.stdout[end:].strip().splitlines()
    assert line.startswith(f"{run / 'opd'}: step 2 in ") and "'kl_mtp'" in line, line
    d = run_script(env, "decode.py", "--run", str(run), "--prompt", "What is 1 + 2?",
                   "--models", "pipo", "--stage", "sft")
    assert d.returncode == 0, describe(d)
    assert json.loads(d.stdout.splitlines()[-1])["tokens"] > 0

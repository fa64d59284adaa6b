"""The fault-injection suite (issue #19): bad input and broken environments, tried as a user
meets them — through ``train.py``, ``decode.py`` and the converter, in subprocesses.

Each case asserts what the user sees (exit status, exactly one ``error:`` line, no traceback,
no stray "Event loop is closed") and that nothing was lost (the run's files byte-identical,
checkpoints restoring to the same parameters). docs/configuration.md#faults-and-bad-input has
the table of cases. The run most cases point at is written in-process from random parameters
of the micro model (its checkpoints, config and data are all that the scripts read before they
fail), so the suite trains only where training is the fault's subject.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import random_params

from pipo_jax.config import load_config, save_config
from pipo_jax.io import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
MICRO = "configs/micro.yaml"
DATA_OVERRIDES = ["data.num_train=16", "data.max_len=128"]


@dataclasses.dataclass
class Proc:
    returncode: int
    stdout: str
    stderr: str


def describe(p: Proc) -> str:
    return f"exit {p.returncode}\n--- stdout\n{p.stdout[-3000:]}\n--- stderr\n{p.stderr[-3000:]}"


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    cache = tmp_path_factory.getbasetemp() / "jax-compilation-cache"
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONUNBUFFERED="1")


def run_cmd(env: dict[str, str], *args: str, timeout: float = 300) -> Proc:
    """``python <args>`` in the repository, as a user types it."""
    p = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                       text=True, errors="replace", timeout=timeout)
    return Proc(p.returncode, p.stdout, p.stderr)


def write_fake_run(run_dir: Path, data_dir: Path) -> None:
    """The micro run's layout (ar and sft checkpoints at steps 2 and 4, config.json), with
    random parameters: everything the scripts read before the faults below stop them."""
    cfg = load_config(REPO / MICRO, [f"run_dir={run_dir}", f"data.data_dir={data_dir}",
                                     *DATA_OVERRIDES])
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.json")
    for stage, pipo in (("ar", False), ("sft", True)):
        for step in (2, 4):
            ckpt.save_params(run_dir / stage, step, random_params(cfg.model, pipo, seed=step),
                             cfg, stage, keep=2)


def _garble(step_dir: Path) -> None:
    for f in step_dir.rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage\x00\xff")


def _truncate_arrays(step_dir: Path) -> None:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no array data files under {step_dir}"
    for p in files:
        p.write_bytes(p.read_bytes()[:64])


def _garbage_metadata(step_dir: Path) -> None:
    (step_dir / "state" / "_METADATA").write_text("{not json")


DAMAGE = {"corrupt": _garble, "truncated": _truncate_arrays, "badmeta": _garbage_metadata}


@dataclasses.dataclass
class Runs:
    paths: dict[str, str]  # the {names} of FAULTS' arguments


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("faults")
    run, data = root / "run", root / "tfds"
    write_fake_run(run, data)
    paths = {"run": str(run), "data": str(data), "missing": str(root / "nonexistent")}
    for name, damage in DAMAGE.items():  # copies whose newest sft checkpoint (4) is damaged
        shutil.copytree(run, root / name)
        damage(root / name / "sft" / ckpt.CHECKPOINT_SUBDIR / "4")
        paths[name] = str(root / name)
    (root / "dup.yaml").write_text(f"run_dir: {run}\nar:\n  steps: 3\n  steps: 30\n")
    (root / "binary.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    paths.update(dup_yaml=str(root / "dup.yaml"), binary_yaml=str(root / "binary.yaml"),
                 root=str(root))
    return Runs(paths)


TRAIN = ["train.py", "--config", MICRO, "run_dir={run}", "data.data_dir={data}",
         *DATA_OVERRIDES, "--no-progress"]
DECODE = ["decode.py", "--run", "{run}"]
CONVERT = ["-m", "pipo_jax.io.hf.convert"]

# name → (command line, regex the one error line must match). {run} is the intact run,
# {corrupt}/{truncated}/{badmeta} copies with a damaged sft step 4, {missing} a path that does
# not exist. Every case must leave every run byte-identical.
FAULTS: dict[str, tuple[list[str], str]] = {
    # --- config values that used to train silently wrong (or end in a traceback)
    "unknown_key": (TRAIN + ["sft.stepz=3"], r"unknown config key sft\.stepz"),
    "wrong_type": (TRAIN + ["ar.steps=abc"], r"ar\.steps must be an integer.*'abc'"),
    "negative_clip_norm": (TRAIN + ["ar.clip_norm=-1"], r"ar\.clip_norm must be > 0, got -1\.0"),
    "adam_b1_above_one": (TRAIN + ["ar.b1=1.5"], r"ar\.b1 must be in \[0, 1\)"),
    "nan_weight_decay": (TRAIN + ["sft.weight_decay=.nan"], r"sft\.weight_decay .* got nan"),
    "nan_loss_weight": (TRAIN + ["sft.w_conf=nan"], r"sft\.w_conf must be >= 0, got nan"),
    "negative_loss_weight": (TRAIN + ["sft.w_mtp=-1"], r"sft\.w_mtp must be >= 0"),
    "negative_rms_eps": (TRAIN + ["model.rms_eps=-1e-6"], r"model\.rms_eps must be in \(0, 1\)"),
    "zero_rope_theta": (TRAIN + ["model.rope_theta=0"], r"model\.rope_theta must be > 0"),
    "context_below_max_len": (TRAIN + ["model.max_context=64"],
                              r"model\.max_context \(64\) is below data\.max_len \(128\)"),
    "negative_seed": (TRAIN + ["ar.seed=-1"], r"ar\.seed must be in \[0, 4294967295\], got -1"),
    "batch_vs_mesh": (TRAIN + ["mesh.fsdp=3"], r"ar\.batch_size \(4\) cannot be split evenly"),
    "empty_run_dir": (["train.py", "--config", MICRO, "run_dir="], r"run_dir is empty"),
    "yaml_key_twice": (["train.py", "--config", "{dup_yaml}"],
                       r"key 'steps' is set twice \(first on line 3\)"),
    "binary_yaml": (["train.py", "--config", "{binary_yaml}"], r"is not UTF-8 text"),
    # --- decoding options and prompts
    "bad_threshold": (DECODE + ["--threshold", "3"], r"--threshold must be in \[-1, 1\].*3"),
    "nan_presence_penalty": (DECODE + ["--presence-penalty", "nan", "--prompt", "hi"],
                             r"presence.penalty must be in \[-2, 2\], got nan"),
    "missing_run": (["decode.py", "--run", "{missing}"], r"{missing} does not exist.*train"),
    "empty_prompt": (DECODE + ["--prompt", ""], r"empty prompt"),
    "prompt_too_long": (DECODE + ["--prompt", "9" * 2000], r"context of 512 tokens"),
    "too_many_problems": (DECODE + ["--num-problems", "50"],
                          r"50 test examples.*20.*data\.num_test"),
    "zero_samples": (DECODE + ["--samples", "0", "--num-problems", "2"],
                     r"samples must be >= 1"),
    # --- damaged checkpoints: named, with the step to fall back to
    "corrupt_checkpoint_decode": (["decode.py", "--run", "{corrupt}", "--prompt", "hi"],
                                  r"checkpoint step 4 .* is corrupt.*fall back to step 2"),
    "corrupt_checkpoint_train": ([a.replace("{run}", "{corrupt}") for a in TRAIN],
                                 r"checkpoint step 4 .* is corrupt.*fall back to step 2"),
    "truncated_arrays": (["decode.py", "--run", "{truncated}", "--prompt", "hi"],
                         r"checkpoint step 4 .* is corrupt.*fall back to step 2"),
    "garbage_metadata": (["decode.py", "--run", "{badmeta}", "--prompt", "hi"],
                         r"checkpoint step 4 .* is corrupt.*fall back to step 2"),
    # --- converters never write into their input
    "export_into_its_run": (CONVERT + ["pipo-to-hf", "--run", "{run}", "--out", "{run}",
                                       "--force"], r"--out .* is the input"),
    "export_inside_its_run": (CONVERT + ["pipo-to-hf", "--run", "{run}", "--out",
                                         "{run}/sft/hf", "--force"], r"inside the input"),
}


@dataclasses.dataclass
class Outcomes:
    procs: dict[str, Proc]
    paths: dict[str, str]
    before: dict[str, dict[str, str]]
    after: dict[str, dict[str, str]]


@pytest.fixture(scope="module")
def outcomes(runs: Runs, env: dict[str, str]) -> Outcomes:
    """Runs every FAULTS case, a few at a time: each is mostly interpreter start-up."""
    paths = runs.paths
    watched = ["run", *DAMAGE]

    def launch(case: str) -> Proc:
        return run_cmd(env, *[a.format(**paths) for a in FAULTS[case][0]])

    before = {name: digest(Path(paths[name])) for name in watched}
    with ThreadPoolExecutor(max_workers=4) as pool:
        procs = dict(zip(FAULTS, pool.map(launch, FAULTS), strict=True))
    return Outcomes(procs, paths, before, {name: digest(Path(paths[name])) for name in watched})


def assert_one_line_error(p: Proc, pattern: str) -> str:
    assert p.returncode == 2, describe(p)
    for noise in ("Traceback", "Event loop is closed", "Exception ignored"):
        assert noise not in p.stderr, describe(p)
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, describe(p)
    assert re.search(pattern, errors[0]), describe(p)
    return errors[0]


@pytest.mark.parametrize("case", list(FAULTS))
def test_fault_is_a_one_line_error(case: str, outcomes: Outcomes):
    pattern = FAULTS[case][1].format(**{k: re.escape(v) for k, v in outcomes.paths.items()})
    assert_one_line_error(outcomes.procs[case], pattern)


def test_faults_leave_every_run_untouched(outcomes: Outcomes):
    """No case wrote into a run (the damaged steps stay for the user to inspect: nothing deletes
    them silently), and none created a directory it was not asked for."""
    assert outcomes.after == outcomes.before
    assert not Path(outcomes.paths["missing"]).exists()
    assert "sft/checkpoints/4/_CHECKPOINT_METADATA" in outcomes.after["corrupt"]
    assert not (REPO / "checkpoints").exists() and not (REPO / "ar").exists()  # run_dir=""
    written = json.loads((Path(outcomes.paths["run"]) / "config.json").read_text())
    assert written["run_dir"] == outcomes.paths["run"]

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
import select
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import Proc, describe, mount_tmpfs, random_params

from pipo_jax.config import Config, load_config, save_config
from pipo_jax.io import checkpoint as ckpt
from pipo_jax.io.hf.convert import main as convert_main
from pipo_jax.model import sharding
from pipo_jax.train.state import make_optimizer, state_shardings

REPO = Path(__file__).resolve().parents[1]
MICRO = "configs/micro.yaml"
DATA_OVERRIDES = ["data.num_train=16", "data.max_len=128"]


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
    # Its Hugging Face export, and a copy whose config lacks the linear-attention keys.
    hf, hf_bad = root / "hf", root / "hf_bad"
    assert convert_main(["pipo-to-hf", "--run", str(run), "--out", str(hf)]) == 0
    shutil.copytree(hf, hf_bad)
    config = json.loads((hf_bad / "config.json").read_text())
    text = config.get("text_config", config)
    for key in [k for k in text if k.startswith("linear_")]:
        del text[key]
    (hf_bad / "config.json").write_text(json.dumps(config))
    paths.update(hf=str(hf), hf_bad=str(hf_bad))
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
                             r"--presence-penalty must be in \[-2, 2\], got nan"),
    "top_p_zero": (DECODE + ["--top-p", "0"], r"--top-p must be in \(0, 1\], got 0\.0"),
    "non_utf8_prompt": (DECODE + ["--prompt", "ab\udcff"],  # the bytes b"ab\xff" in argv
                        r"--prompt is not valid UTF-8 text \(byte 0xff at offset 2\)"),
    "unwritable_output": (DECODE + ["--num-problems", "2", "--out", "{run}/config.json/x.json"],
                          r"cannot write the results to .*config\.json.*choose another --out"),
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
    "import_into_its_source": (CONVERT + ["hf-to-pipo", "--hf-dir", "{hf}", "--out", "{hf}",
                                          "--force"], r"--out .* is the input --hf-dir"),
    "hf_config_without_linear_keys": (
        CONVERT + ["hf-to-pipo", "--hf-dir", "{hf_bad}", "--out", "{missing}"],
        r"config\.json has no linear_\w+ \(an integer\), which a qwen3_5_text model needs"),
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
    watched = ["run", *DAMAGE, "hf", "hf_bad"]

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


# ------------------------------------------------------------------ faults during training

# The ar stage of the micro model in four steps, a checkpoint every two: the shapes of
# tests/test_preemption.py's runs (one compiled step, shared through the compilation cache).
PHASE_ARGS = ["--config", MICRO, "--stage", "ar", "data.num_train=8", "data.max_len=128",
              "ar.steps=4", "ar.batch_size=8", "ar.log_every=1", "ar.ckpt_every=2",
              "--no-progress"]


def train_with_fault(env: dict[str, str], phase: str, run: Path, data: Path) -> Proc:
    return run_cmd(env, "tests/fault_child.py", phase, *PHASE_ARGS, f"run_dir={run}",
                   f"data.data_dir={data}")


def restored_state(run: Path, step: int | None = None) -> Any:
    cfg = load_config(REPO / MICRO, [a for a in PHASE_ARGS if "=" in a] + [f"run_dir={run}"])
    abstract, shardings = state_shardings(cfg.model, False, make_optimizer(cfg.ar),
                                          sharding.build_mesh(cfg.mesh))
    state, _ = ckpt.restore(run / "ar", ckpt.abstract_target(abstract, shardings), step=step)
    return state


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, env: dict[str, str]) -> Path:
    """The uninterrupted run (it also builds the data set that the later runs share)."""
    root = tmp_path_factory.mktemp("reference")
    p = train_with_fault(env, "none", root / "run", root / "tfds")
    assert p.returncode == 0, describe(p)
    return root


def in_parallel(*calls: Any) -> list[Proc]:
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(lambda c: c[0](*c[1:]), calls))


def test_sigterm_at_each_phase_then_resume_matches_uninterrupted_run(
        reference: Path, env: dict[str, str], tmp_path: Path):
    """SIGTERM while the data set is written, inside a checkpoint write, and while a resumed
    stage restores: the process stops (killed outright before the training loop has installed
    its handlers; after the running save, with exit status 143, inside it); every committed
    checkpoint stays; the same command then finishes, bit-identical to the uninterrupted run."""
    data = reference / "tfds"
    fresh = tmp_path / "tfds"  # the data phase builds its own copy
    run_data, run_save, run_restore = tmp_path / "data", tmp_path / "save", tmp_path / "restore"
    killed_in_data, preempted = in_parallel(
        (train_with_fault, env, "data", run_data, fresh),
        (train_with_fault, env, "save", run_save, data))
    assert killed_in_data.returncode == -signal.SIGTERM, describe(killed_in_data)
    assert "FAULT: SIGTERM during data" in killed_in_data.stderr
    assert not ckpt.all_steps(run_data / "ar")
    # Inside the step-2 write: the signal is recorded, the save completes, and the loop stops
    # after the next step (saved and committed before exit).
    assert preempted.returncode == 143, describe(preempted)
    assert re.search(r"^preempted: ar stopped by SIGTERM after step 3 of 4; checkpoint 3 is "
                     r"saved", preempted.stderr, re.M), describe(preempted)
    assert ckpt.all_steps(run_save / "ar") == [2, 3]
    shutil.copytree(run_save, run_restore)
    before = digest(run_restore / "ar" / ckpt.CHECKPOINT_SUBDIR)

    resumed_data, killed_in_restore = in_parallel(
        (train_with_fault, env, "none", run_data, fresh),
        (train_with_fault, env, "restore", run_restore, data))
    assert resumed_data.returncode == 0, describe(resumed_data)  # the half-written data rebuilt
    assert killed_in_restore.returncode == -signal.SIGTERM, describe(killed_in_restore)
    assert digest(run_restore / "ar" / ckpt.CHECKPOINT_SUBDIR) == before

    resumed = in_parallel((train_with_fault, env, "none", run_save, data),
                          (train_with_fault, env, "none", run_restore, data))
    for p in resumed:
        assert p.returncode == 0, describe(p)
    want = restored_state(reference / "run")
    assert int(want.step) == 4
    for run in (run_data, run_save, run_restore):
        chex.assert_trees_all_equal(restored_state(run), want)


# A child that starts a save of step 2 and blocks at a chosen point inside orbax's save, so
# the parent's SIGKILL is guaranteed to land mid-save rather than racing the write.
_KILLED_CHILD = """
import asyncio, sys
from pathlib import Path
import jax
jax.config.update("jax_platforms", "cpu")
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity
from pipo_jax.io import checkpoint as ck
from pipo_jax.config import Config

stage, hang_in = sys.argv[1], sys.argv[2]

async def hang(*args, **kwargs):
    # Orbax may create the tmp step directory concurrently with the item writes; wait for it
    # (yielding to the event loop) so the kill always lands with the directory on disk.
    root = Path(stage) / "checkpoints"
    for _ in range(1000):
        if any("tmp" in p.name for p in root.iterdir()):
            break
        await asyncio.sleep(0.01)
    print("HANGING", flush=True)
    await asyncio.sleep(3600)

if hang_in == "commit":  # every file written, only the rename to the final name is missing
    atomicity.AtomicRenameTemporaryPath.finalize = hang
else:  # tmp directory created, array data not yet written
    ocp.StandardCheckpointHandler.async_save = hang
manager = ck.open_manager(stage, keep=3)
ck.save(manager, 2, {"w": jnp.full((256, 256), 2.0)}, Config(), "ar", wait=True)
print("SAVE FINISHED", flush=True)
"""


@pytest.mark.parametrize("hang_in", ["commit", "write"])
def test_kill_9_mid_save_keeps_last_good_checkpoint(tmp_path: Path, hang_in: str):
    stage = tmp_path / "sft"
    target = ckpt.abstract_target(jax.ShapeDtypeStruct((256, 256), jnp.float32),
                                  jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    with ckpt.open_manager(stage, keep=3) as manager:
        ckpt.save(manager, 1, {"w": jnp.full((256, 256), 1.0)}, Config(), "ar")

    with open(tmp_path / "child.log", "w") as log:
        child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(stage), hang_in],
                                 cwd=REPO, stdout=subprocess.PIPE, stderr=log, text=True)
        try:
            ready, _, _ = select.select([child.stdout], [], [], 120)
            line = child.stdout.readline() if ready else ""
            assert line.strip() == "HANGING", (tmp_path / "child.log").read_text()[-3000:]
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()

    ckpt_root = stage / ckpt.CHECKPOINT_SUBDIR
    leftovers = [p.name for p in ckpt_root.iterdir() if "tmp" in p.name]
    assert leftovers, sorted(p.name for p in ckpt_root.iterdir())
    assert ckpt.latest_step(stage) == 1
    restored, _ = ckpt.restore(stage, {"w": target})
    np.testing.assert_array_equal(restored["w"], 1.0)

    # Training resumes: the next manager clears the leftover and saving step 2 again works.
    with ckpt.open_manager(stage, keep=3) as manager:
        assert ckpt.save(manager, 2, {"w": jnp.full((256, 256), 3.0)}, Config(), "ar")
    assert sorted(p.name for p in ckpt_root.iterdir()) == ["1", "2"]
    restored, _ = ckpt.restore(stage, {"w": target})
    np.testing.assert_array_equal(restored["w"], 3.0)


# ----------------------------------------------------------------------------- disk full


def _bytes_used(root: Path) -> int:
    # Whole 4 KiB pages per file, as tmpfs charges them.
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in root.rglob("*") if p.is_file())


def test_disk_full_mid_run_is_one_line_and_keeps_the_last_checkpoint(
        reference: Path, env: dict[str, str], tmp_path: Path):
    """A tmpfs with room for the run's first checkpoint but not its second: training stops at
    the failing write with one line naming the path and the free space (exit 2), the committed
    step 2 restores to the uninterrupted run's step 2, and once there is room the same command
    finishes, bit-identical to the uninterrupted run."""
    first = _bytes_used(reference / "run")  # the finished run holds two checkpoints
    size = -(-int(first * 0.75) // 4096) * 4096  # one and a half checkpoints
    mount = tmp_path / "tmpfs"
    why = mount_tmpfs(mount, size)
    if why is not None:
        pytest.skip(why)
    try:
        run = mount / "run"
        full = train_with_fault(env, "none", run, reference / "tfds")
        line = assert_one_line_error(full, r"No space left on device")
        assert str(mount) in line and "free" in line, line
        assert ckpt.all_steps(run / "ar") == [2]
        chex.assert_trees_all_equal(restored_state(run), restored_state(reference / "run", 2))
        subprocess.run(["mount", "-o", f"remount,size={64 << 20}", str(mount)], check=True)
        again = train_with_fault(env, "none", run, reference / "tfds")
        assert again.returncode == 0, describe(again)
        chex.assert_trees_all_equal(restored_state(run), restored_state(reference / "run"))
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)

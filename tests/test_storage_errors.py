"""Issue #19, in process: writes that the storage refuses (disk full, read-only, not permitted)
are one line naming the path and the free space, and keep every committed checkpoint; a corrupt
checkpoint is one error without stray event-loop tracebacks; bad config.json keys and
non-UTF-8 prompts are one line too.

The subprocess versions of these faults (a real tmpfs filled by ``train.py``, corrupt runs
given to ``decode.py``) are in tests/test_faults.py.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import DECODE_HYBRID, mount_tmpfs
from orbax.checkpoint._src import asyncio_utils
from orbax.checkpoint._src.path import atomicity

import decode
from pipo_jax.cli import run_main
from pipo_jax.config import Config, load_config
from pipo_jax.errors import MappingError, StorageError
from pipo_jax.eval.heldout import write_json
from pipo_jax.eval.store import ResultFile
from pipo_jax.io import checkpoint as ckpt
from pipo_jax.io import diskerrors
from pipo_jax.io.hf import convert
from pipo_jax.io.hf import mapping as hm
from pipo_jax.train.loop import run_steps
from pipo_jax.train.metrics import MetricWriter, read_jsonl
from pipo_jax.train.state import TrainState

REPO = Path(__file__).resolve().parents[1]
SHARDING = jax.sharding.SingleDeviceSharding(jax.devices()[0])
DEV_FULL = Path("/dev/full")  # every write to it fails with ENOSPC


def _one_line(text: str) -> str:
    assert "\n" not in text.strip(), text
    return text.strip()


def _blocker(tmp_path: Path) -> Path:
    """A regular file: nothing can be created under it (also for root, unlike chmod)."""
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    return path


# --------------------------------------------------------------------------- the message


def test_write_error_names_path_reason_free_space_and_way_out(tmp_path):
    target = tmp_path / "eval" / "decode.json"
    message = diskerrors.write_error(
        target, OSError(errno.ENOSPC, "No space left on device", str(target)),
        "write the results to", "choose another --out")
    assert message.startswith(f"cannot write the results to {target}: No space left on device (")
    assert " free on /" in message and message.endswith("; free space or choose another --out")
    read_only = diskerrors.write_error(target, OSError(errno.EROFS, "Read-only file system",
                                                       str(tmp_path)), note="step 2 is intact")
    assert f"Read-only file system: {tmp_path} (" in read_only  # the refused parent is named
    assert read_only.endswith("make it writable or write elsewhere — step 2 is intact")


def test_storage_errno_reads_tensorstore_errors_and_causes():
    written = ValueError('RESOURCE_EXHAUSTED: Failed writing "x/d/1": Failed to write 9 bytes '
                         "to file 15: No space left on device [os_error_code='28']")
    assert diskerrors.storage_errno(written) == errno.ENOSPC
    try:
        try:
            raise PermissionError(errno.EACCES, "Permission denied")
        except OSError as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as e:
        assert diskerrors.storage_errno(e) == errno.EACCES
    assert diskerrors.storage_errno(ValueError("NOT_FOUND: Error opening zarr")) is None
    assert diskerrors.storage_errno(FileNotFoundError(errno.ENOENT, "gone")) is None


def test_check_writable_leaves_nothing_behind(tmp_path):
    diskerrors.check_writable(tmp_path / "new" / "eval")
    diskerrors.check_writable(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no directory and no probe file left
    with pytest.raises(StorageError, match=r"cannot write to .*a_file/eval: Not a directory"):
        diskerrors.check_writable(_blocker(tmp_path) / "eval")
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


# --------------------------------------------------------------------------- checkpoints


def _state(value: float, n: int = 64) -> dict:
    return {"step": jnp.int32(value), "params": {"w": jnp.full((n, n), value)}}


def _restored_w(stage: Path, step: int | None = None, n: int = 64) -> np.ndarray:
    target = ckpt.abstract_target(jax.eval_shape(lambda: _state(0.0, n)), SHARDING)
    restored, _ = ckpt.restore(stage, target, step=step)
    return np.asarray(restored["params"]["w"])


def _disk_full(hit: threading.Event | None = None) -> Any:
    async def finalize(*args: object, **kwargs: object) -> None:
        if hit is not None:
            hit.set()
        raise OSError(errno.ENOSPC, "No space left on device")
    return finalize


def test_failed_background_save_is_one_line_and_keeps_the_committed_step(
        tmp_path, monkeypatch, caplog):
    """The asynchronous save of step 2 fails on a full disk (its commit): ``raise_failed_save``
    reports it as soon as it is known, naming step, directory, free space and the committed
    step 1, which restores; orbax's own traceback log of that error is dropped."""
    manager = ckpt.open_manager(tmp_path, keep=1)
    try:
        assert ckpt.save(manager, 1, _state(1.0), Config(), "ar", wait=True)
        monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", _disk_full())
        assert ckpt.save(manager, 2, _state(2.0), Config(), "ar")  # returns at once (async)
        for _ in range(600):  # until the background write has failed
            if not manager.is_saving_in_progress():
                break
            time.sleep(0.01)
        with pytest.raises(StorageError) as info:
            manager.raise_failed_save()
    finally:
        monkeypatch.undo()
        manager.close()  # the failure was reported once; closing does not raise it again
    message = _one_line(str(info.value))
    assert message.startswith(f"cannot save checkpoint step 2 to {tmp_path / 'checkpoints'}: "
                              "No space left on device (")
    assert "free on /" in message
    assert message.endswith("free space or set run_dir elsewhere — the last committed "
                            "checkpoint (step 1) is intact")
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert ckpt.all_steps(tmp_path) == [1]
    np.testing.assert_array_equal(_restored_w(tmp_path), 1.0)


def test_read_only_checkpoint_directory_fails_the_save_itself(tmp_path, monkeypatch):
    """The step's directory is made before ``save`` returns, so a read-only disk fails that
    save (not, minutes later, orbax's writers waiting for the directory)."""
    async def read_only(self: Any) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self.get()))

    with ckpt.open_manager(tmp_path, keep=2) as manager:
        monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "create", read_only)
        started = time.time()
        with pytest.raises(StorageError) as info:
            ckpt.save(manager, 1, _state(1.0), Config(), "ar")
        assert time.time() - started < 60
        monkeypatch.undo()
    message = _one_line(str(info.value))
    assert "cannot save checkpoint step 1 to" in message and "Read-only file system" in message
    assert message.endswith("make it writable or set run_dir elsewhere — no checkpoint of "
                            "this stage was committed before")
    assert ckpt.all_steps(tmp_path) == []


def test_a_real_full_disk_is_one_line_and_keeps_the_committed_step(tmp_path):
    """tensorstore's own ENOSPC (a ValueError carrying the OS error code) on a 1 MiB tmpfs that
    holds one checkpoint of 512 KiB but not two (random values: OCDBT compresses)."""
    mount = tmp_path / "tmpfs"
    why = mount_tmpfs(mount, 1 << 20)
    if why is not None:
        pytest.skip(why)
    try:
        stage = mount / "ar"
        states = [{"step": jnp.int32(s), "params": {"w": jax.random.normal(
            jax.random.key(s), (362, 362))}} for s in (1, 2)]
        with ckpt.open_manager(stage, keep=2) as manager:
            ckpt.save(manager, 1, states[0], Config(), "ar", wait=True)
            with pytest.raises(StorageError) as info:
                ckpt.save(manager, 2, states[1], Config(), "ar", wait=True)
        message = _one_line(str(info.value))
        assert "cannot save checkpoint step 2" in message and "No space left on device" in message
        assert f"free on {mount}" in message and "(step 1) is intact" in message
        target = ckpt.abstract_target(jax.eval_shape(lambda: states[0]), SHARDING)
        chex.assert_trees_all_equal(ckpt.restore(stage, target)[0], states[0])
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


# --------------------------------------------------------------------------- training loop


def _advance(wait_for: threading.Event, at: int, managers: list[ckpt.Manager]) -> Any:
    """A stand-in step (``w += 1``, ``loss = w``); step ``at`` (0-based) waits until the failing
    write has happened and the loop's manager has finished that save, so that the failure is
    known when the step ends."""

    def advance(state: TrainState, step: int) -> tuple[TrainState, dict[str, jax.Array], Any]:
        if step == at:
            assert wait_for.wait(60)
            for _ in range(6000):
                if not managers[0].is_saving_in_progress():
                    break
                time.sleep(0.01)
        new = TrainState(step=state.step + 1, params={"w": state.params["w"] + 1},
                         opt_state=state.opt_state)
        return new, {"loss": new.params["w"][0], "target_tokens": jnp.float32(10)}, None

    return advance


def test_training_stops_at_the_step_after_a_failed_save(tmp_path, monkeypatch, capsys):
    """Step 2 is committed; the save of step 4 fails in the background. The loop stops after
    step 5 (when the failure is known), with one ``error:`` line and exit status 2, not at the
    next save (step 6) or the end; the committed step 2 restores."""
    cfg = load_config(REPO / "configs" / "micro.yaml",
                      [f"run_dir={tmp_path}", "ar.steps=8", "ar.log_every=1", "ar.ckpt_every=2"])
    hit = threading.Event()
    real = atomicity.AtomicRenameTemporaryPath.finalize

    async def fail_step_4(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.get_final().name == "4":
            return await _disk_full(hit)()
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", fail_step_4)
    managers: list[ckpt.Manager] = []
    open_manager = ckpt.open_manager
    monkeypatch.setattr(ckpt, "open_manager",
                        lambda *a, **k: managers.append(open_manager(*a, **k)) or managers[-1])
    state = TrainState(step=jnp.int32(0), params={"w": jnp.zeros((4,))},
                       opt_state={"m": jnp.zeros((4,))})

    def main(argv: list[str]) -> int:
        run_steps(cfg, "ar", state, 0, _advance(hit, 4, managers), progress=False)
        return 0

    assert run_main(main, []) == 2
    monkeypatch.undo()
    err = _one_line(capsys.readouterr().err)
    assert err.startswith(f"error: cannot save checkpoint step 4 to {tmp_path / 'ar'}"), err
    assert err.endswith("the last committed checkpoint (step 2) is intact"), err
    assert [r["step"] for r in read_jsonl(tmp_path / "ar")] == [1, 2, 3, 4]
    assert ckpt.all_steps(tmp_path / "ar") == [2]
    target = ckpt.abstract_target(jax.eval_shape(lambda: state), SHARDING)
    restored, _ = ckpt.restore(tmp_path / "ar", target)
    np.testing.assert_array_equal(restored.params["w"], 2.0)


# --------------------------------------------------------------------------- result writes


@pytest.mark.skipif(not DEV_FULL.exists(), reason="needs /dev/full")
def test_result_writes_on_a_full_disk_are_one_line(tmp_path):
    with pytest.raises(StorageError) as info:
        write_json({"a": 1}, DEV_FULL, elsewhere="choose another --out")
    assert _one_line(str(info.value)).startswith(
        "cannot write the results to /dev/full: No space left on device")
    assert str(info.value).endswith("free space or choose another --out")

    writer = MetricWriter(tmp_path)
    writer._jsonl.close()
    writer._jsonl = DEV_FULL.open("a")  # the disk fills up during the run
    with pytest.raises(StorageError, match=r"^cannot write metrics to .*No space left on device"):
        writer.write_scalars(1, {"loss": 1.0})
    with pytest.raises(StorageError):
        writer.close()

    with ResultFile(tmp_path / "aime.pipo.jsonl", {"run": "r"}) as store:
        store._file.close()
        store._file = DEV_FULL.open("w")
        with pytest.raises(StorageError, match=r"aime\.pipo\.jsonl: No space left.*--out-dir"):
            store.append([{"id": "q1"}])
        store._file = (tmp_path / "ignored").open("w")


def test_unwritable_result_paths_are_one_line(tmp_path):
    from pipo_jax.bench.report import write_text

    blocker = _blocker(tmp_path)
    for write in (lambda: MetricWriter(blocker / "ar"),
                  lambda: ResultFile(blocker / "r.jsonl", {"run": "r"}),
                  lambda: write_json({}, blocker / "decode.json"),
                  lambda: write_text("table", blocker / "report.md")):
        with pytest.raises(StorageError) as info:
            write()
        message = _one_line(str(info.value))
        assert f"{blocker}" in message, message
        assert "Not a directory" in message or "File exists" in message, message
        assert "free on /" in message, message
    assert [p.name for p in tmp_path.iterdir()] == ["a_file"]


# --------------------------------------------------------------------------- decode.py


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    def load(*args: object, **kwargs: object) -> None:
        raise AssertionError("decode.py loaded the run before refusing its input")
    monkeypatch.setattr(decode, "load", load)


def test_decode_checks_that_it_can_write_before_it_loads(tmp_path, capsys, no_load):
    run = tmp_path / "run"
    run.mkdir()
    (run / "eval").write_text("a file where the results' directory should be")
    assert run_main(decode.main, ["--run", str(run)]) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith(f"error: cannot write the results to {run / 'eval'}: "), err
    assert err.endswith("choose another --out"), err
    blocker = _blocker(tmp_path)
    assert run_main(decode.main, ["--run", str(run), "--out", str(blocker / "x.json")]) == 2
    assert f"{blocker}: Not a directory" in _one_line(capsys.readouterr().err)


@pytest.mark.parametrize("flag", ["--prompt", "--system-prompt"])
def test_decode_refuses_text_that_is_not_utf8(flag, tmp_path, capsys, no_load):
    # What `decode.py --prompt $'ab\xff'` finds in sys.argv: the byte as a lone surrogate.
    text = os.fsdecode(b"ab\xff")
    argv = ["--run", str(tmp_path), flag, text] + ([] if flag == "--prompt" else ["--prompt",
                                                                                   "hi"])
    assert run_main(decode.main, argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert err.startswith(f"error: {flag} is not valid UTF-8 text (byte 0xff at offset 2)"), err


# --------------------------------------------------------------------------- HF config.json


def _hybrid_config() -> dict[str, Any]:
    return hm.hf_config_from_model(DECODE_HYBRID)


@pytest.mark.parametrize("key", ["num_hidden_layers", "hidden_size", "num_attention_heads",
                                 "vocab_size", "intermediate_size", "linear_num_key_heads",
                                 "linear_num_value_heads", "linear_key_head_dim",
                                 "linear_value_head_dim", "linear_conv_kernel_dim"])
def test_every_missing_config_key_is_named(key):
    config = _hybrid_config()
    del config[key]
    with pytest.raises(MappingError, match=rf"^src/config\.json has no {key} \(an integer\), "
                                           r"which a qwen3_5_text model needs"):
        hm.config_from_hf(config, "src/config.json")
    # A VLM checkpoint nests the text settings: the key is named by its path in the file.
    vlm = {"model_type": "qwen3_5", "text_config": dict(config, model_type="qwen3_5_text")}
    with pytest.raises(MappingError, match=rf"has no text_config\.{key} "):
        hm.config_from_hf(vlm)


@pytest.mark.parametrize("key, value, kind", [
    ("hidden_size", "32", "an integer"), ("num_hidden_layers", True, "an integer"),
    ("rms_norm_eps", "1e-6", "a number"), ("tie_word_embeddings", "no", "true or false"),
    ("layer_types", "linear_attention", "a list"), ("rope_parameters", [1], "a JSON object"),
])
def test_ill_typed_config_keys_are_named(key, value, kind):
    config = dict(_hybrid_config(), **{key: value})
    with pytest.raises(MappingError, match=rf"^config\.json: {key} must be {kind}, got "):
        hm.config_from_hf(config)
    nested = _hybrid_config()
    nested["rope_parameters"]["rope_theta"] = "big"
    with pytest.raises(MappingError, match=r"rope_parameters\.rope_theta must be a number"):
        hm.config_from_hf(nested)


def test_converter_reports_a_missing_key_as_one_line(tmp_path, capsys):
    folder = tmp_path / "hf"
    folder.mkdir()
    config = _hybrid_config()
    del config["linear_num_key_heads"]
    (folder / "config.json").write_text(json.dumps(config))
    argv = ["hf-to-pipo", "--hf-dir", str(folder), "--out", str(tmp_path / "run")]
    assert run_main(convert.main, argv) == 2
    err = _one_line(capsys.readouterr().err)
    assert err == (f"error: {folder / 'config.json'} has no linear_num_key_heads (an integer), "
                   "which a qwen3_5_text model needs; it is not a complete Hugging Face config")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- event loops


def test_a_failed_batch_waits_for_its_siblings_before_its_loop_closes():
    """Orbax runs a batch of reads or writes with ``gather`` in a loop of its own; when one
    fails, the others must finish before that loop closes, or each one's completion hits the
    closed loop ("RuntimeError: Event loop is closed", printed from tensorstore's threads)."""
    finished = []

    async def batch() -> None:
        async def fails() -> None:
            raise ValueError("NOT_FOUND: a corrupt array")

        async def slow() -> None:
            await asyncio.sleep(0.2)
            finished.append(True)

        await asyncio.gather(fails(), slow())

    with pytest.raises(ValueError, match="corrupt array"):
        asyncio_utils.run_sync(batch())
    assert finished == [True]


def test_corrupt_checkpoint_leaves_no_event_loop_errors(tmp_path, monkeypatch):
    with ckpt.open_manager(tmp_path, keep=2) as manager:
        for step in (1, 2):
            ckpt.save(manager, step, _state(float(step)), Config(), "ar")
    for data in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if data.is_file() and data.parent.name == "d":
            data.unlink()
    unraisable: list[str] = []
    monkeypatch.setattr(sys, "unraisablehook",
                        lambda u: unraisable.append(f"{u.exc_type.__name__}: {u.exc_value}"))
    with pytest.raises(ckpt.CheckpointError, match="step 2 .* is corrupt.*fall back to step 1"):
        _restored_w(tmp_path)
    time.sleep(0.5)  # the reads the failure left in flight would complete now
    gc.collect()
    assert not [u for u in unraisable if "Event loop is closed" in u], unraisable
    np.testing.assert_array_equal(_restored_w(tmp_path, step=1), 1.0)
    chex.assert_trees_all_equal(ckpt.all_steps(tmp_path), [1, 2])

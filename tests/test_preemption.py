"""Preemption: SIGTERM/SIGINT stop the training loop after saving the current step, and a resumed
run continues exactly where an uninterrupted one would be.

The in-process tests drive ``pipo_jax.train.loop.run_steps`` with a stand-in ``advance`` (no
model, no compilation), so the signal paths cost a few orbax saves. One end-to-end test kills a real
``python train.py`` with SIGTERM and compares the resumed loss curve with an uninterrupted run;
a slow one (``-m slow``) does the same to one process of a two-process job.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipo_jax.cli import run_main
from pipo_jax.config import Config, load_config
from pipo_jax.errors import Preempted
from pipo_jax.io import checkpoint as ckpt
from pipo_jax.model import sharding
from pipo_jax.train.loop import Advance, run_steps
from pipo_jax.train.metrics import MetricWriter, read_jsonl
from pipo_jax.train.state import TrainState, make_optimizer, state_shardings

# Saves cut short by a signal may leave tensorstore callbacks that Python reports later as
# "unraisable"; harmless here (tests/test_checkpoint.py makes them errors for failed restores,
# which io/orbax_quirks.py lets finish).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

REPO = Path(__file__).resolve().parents[1]
MICRO = REPO / "configs" / "micro.yaml"


# --------------------------------------------------------------------------- in process


def loop_config(run_dir: Path, steps: int = 8) -> Config:
    return load_config(MICRO, [f"run_dir={run_dir}", f"ar.steps={steps}", "ar.log_every=1",
                               "ar.ckpt_every=100"])


def fake_state(value: float = 0.0) -> TrainState:
    return TrainState(step=jnp.int32(0), params={"w": jnp.full((4,), value)},
                              opt_state={"m": jnp.zeros((4,))})


def fake_advance(on_step: dict[int, Callable[[], None]]) -> Advance:
    """An ``advance`` that adds 1 to ``w`` and reports ``loss = w``; ``on_step[i]()`` runs inside
    step ``i`` (0-based), as a signal would arrive in the middle of a real step."""

    def advance(state: TrainState, step: int) -> tuple[TrainState,
                                                             dict[str, jax.Array], Any]:
        if step in on_step:
            on_step[step]()
        new = TrainState(step=state.step + 1, params={"w": state.params["w"] + 1},
                                 opt_state=state.opt_state)
        return new, {"loss": new.params["w"][0], "target_tokens": jnp.float32(10)}, None

    return advance


def send(*signums: int) -> Callable[[], None]:
    def kill() -> None:
        for signum in signums:
            # Never deliver a signal the loop has not caught: it would end the test process.
            assert signal.getsignal(signum) not in (signal.SIG_DFL, signal.default_int_handler)
            os.kill(os.getpid(), signum)

    return kill


def restore_fake(stage_dir: Path) -> TrainState:
    sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return ckpt.restore(stage_dir, ckpt.abstract_target(jax.eval_shape(fake_state), sh))[0]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_current_step_and_raises_preempted(tmp_path, signum):
    """A signal during step 5 (1-based) stops the loop after it: step 5 is checked, logged and
    saved (committed), ``Preempted`` carries the exit status, the handlers are put back."""
    cfg = loop_config(tmp_path)
    before = {s: signal.getsignal(s) for s in ckpt.StopSignals.SIGNALS}
    with pytest.raises(Preempted) as info:
        run_steps(cfg, "ar", fake_state(), 0, fake_advance({4: send(signum)}),
                          progress=False)
    err = info.value
    assert (err.step, err.signum, err.exit_code) == (5, signum, 128 + signum)
    assert str(err).startswith(f"ar stopped by {signal.Signals(signum).name} after step 5 of 8")
    assert "\n" not in str(err) and "run the same command again" in str(err)
    assert {s: signal.getsignal(s) for s in ckpt.StopSignals.SIGNALS} == before

    stage_dir = tmp_path / "ar"
    assert ckpt.all_steps(stage_dir) == [5]  # not a multiple of ckpt_every: saved on the signal
    state = restore_fake(stage_dir)
    assert int(state.step) == 5
    np.testing.assert_array_equal(state.params["w"], 5.0)
    assert [r["step"] for r in read_jsonl(stage_dir)] == [1, 2, 3, 4, 5]
    assert read_jsonl(stage_dir)[-1]["loss"] == 5.0

    # Resuming from the saved step runs the rest and no step twice.
    result = run_steps(cfg, "ar", state, 5, fake_advance({}), progress=False)
    assert result.steps == 8 and result.final_metrics["loss"] == 8.0
    assert [r["step"] for r in read_jsonl(stage_dir)] == list(range(1, 9))


def test_signal_during_last_step_host_work_still_stops(tmp_path):
    """A signal after the loop's last check (here from ``summarise``, during the final step's
    host work) still saves that step and raises, so ``train`` starts no further stage."""
    cfg = loop_config(tmp_path, steps=3)

    def summarise(step: int, host: dict[str, Any], info: Any) -> dict[str, float]:
        if step == 2:
            send(signal.SIGTERM)()
        return {}

    with pytest.raises(Preempted) as info:
        run_steps(cfg, "ar", fake_state(), 0, fake_advance({}), summarise,
                          progress=False)
    assert info.value.step == 3 and info.value.exit_code == 143
    assert ckpt.all_steps(tmp_path / "ar") == [3]


def test_second_sigint_interrupts_at_once(tmp_path):
    """Ctrl-C twice: the second is a KeyboardInterrupt right away (the way out of a hung step
    or save), nothing is saved for the unfinished step, and the handlers are restored."""
    cfg = loop_config(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        run_steps(cfg, "ar", fake_state(), 0,
                          fake_advance({2: send(signal.SIGINT, signal.SIGINT)}), progress=False)
    assert ckpt.all_steps(tmp_path / "ar") == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_run_main_reports_preempted_with_signal_exit_status(capsys):
    def main(argv: list[str]) -> int:
        raise Preempted("ar stopped by SIGTERM after step 5 of 8; ...", signal.SIGTERM, 5)

    assert run_main(main, []) == 143
    assert capsys.readouterr().err == "preempted: ar stopped by SIGTERM after step 5 of 8; ...\n"


def test_stop_signals_leave_ignored_signals_and_restore_others():
    old_term = signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as under nohup
    try:
        with ckpt.StopSignals() as stop:
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) == stop._handle
            assert stop.signum is None
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, old_term)


def test_loop_outside_main_thread_trains_without_handlers(tmp_path):
    """Handlers can only be installed from the main thread: a loop in a worker thread warns,
    trains normally and leaves the process's handlers alone."""
    cfg = loop_config(tmp_path, steps=3)
    before = signal.getsignal(signal.SIGTERM)
    out: dict[str, Any] = {}

    def work() -> None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out["result"] = run_steps(cfg, "ar", fake_state(), 0, fake_advance({}),
                                              progress=False)
        out["warnings"] = [str(w.message) for w in caught if w.category is RuntimeWarning]

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(60)
    assert out["result"].final_metrics["loss"] == 3.0
    assert any("main thread" in w for w in out["warnings"]), out["warnings"]
    assert signal.getsignal(signal.SIGTERM) == before
    assert ckpt.all_steps(tmp_path / "ar") == [3]


def test_only_process_0_writes_metrics(tmp_path):
    with MetricWriter(tmp_path / "lead") as lead:
        assert jax.process_index() == 0 and lead.active
    with MetricWriter(tmp_path / "other", prefix="ar", active=False) as writer:
        writer.write_scalars(1, {"loss": 1.0})
        writer.write_text(1, "sample", "text")
        writer.flush()
        with pytest.raises(ValueError, match="scalar"):  # a bad call fails on every process
            writer.write_scalars(2, {"loss": np.zeros(2)})
    assert not (tmp_path / "other").exists()


def test_to_host_reads_replicated_metrics_of_every_process():
    """``run_steps`` reads metrics with ``sharding.to_host``: a replicated value is read from
    the local replica, never with ``device_get`` of the whole (multi-process) array."""
    mesh = sharding.build_mesh(loop_config(Path("unused")).mesh)
    loss = jax.device_put(jnp.float32(1.5), sharding.replicated(mesh))
    assert loss.is_fully_replicated
    assert float(sharding.to_host({"loss": loss})["loss"]) == 1.5


# --------------------------------------------------------------------------- end to end


def overrides(run_dir: Path, data_dir: Path) -> list[str]:
    # The model, data shapes and ar step count of tests/test_trainer.py's micro run, so the two
    # modules share one compiled train step through the session's compilation cache.
    return [f"run_dir={run_dir}", f"data.data_dir={data_dir}", "data.num_train=8",
            "data.max_len=128", "ar.steps=30", "ar.batch_size=8", "ar.log_every=1",
            "ar.ckpt_every=100"]


def train_command(run_dir: Path, data_dir: Path, *flags: str) -> list[str]:
    return [sys.executable, "train.py", "--config", str(MICRO), "--stage", "ar",
            *overrides(run_dir, data_dir), "--no-progress", *flags]


def run_env(cache_dir: Path) -> dict[str, str]:
    # CPU: the bit-exact claim is about the CPU backend (GPU reductions need not be
    # deterministic). The persistent cache lets the later runs load the first one's compile.
    return dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def wait_for_first_record(log: Path, procs: list[subprocess.Popen], timeout: float) -> None:
    """Polls until a step is logged (compilation is over, training is under way)."""
    deadline = time.monotonic() + timeout
    while not (log.exists() and log.stat().st_size):
        assert all(p.poll() is None for p in procs), "a training process ended early"
        assert time.monotonic() < deadline, f"no step was logged within {timeout} s"
        time.sleep(0.01)


def stop_message(log: Path) -> tuple[str, int]:
    """The last line of a stopped process's output, and the step it names."""
    message = log.read_text().strip().splitlines()[-1]
    assert message.startswith("preempted: ar stopped by SIGTERM after step "), message
    return message, int(message.split("after step ")[1].split()[0])


def curve(stage_dir: Path) -> list[dict[str, Any]]:
    # Everything but the wall-clock throughput must match to the bit.
    return [{k: v for k, v in r.items() if k != "tokens_per_second"}
            for r in read_jsonl(stage_dir)]


def test_sigterm_mid_run_then_resume_matches_uninterrupted_run(tmp_path, compilation_cache_dir):
    env, data_dir = run_env(compilation_cache_dir), tmp_path / "tfds"
    run, ref = tmp_path / "interrupted", tmp_path / "uninterrupted"
    cmd = train_command(run, data_dir)
    log = run / "ar" / "metrics.jsonl"

    # The interrupted run goes first: it builds the data set and fills the compilation cache.
    child = start(cmd, env, tmp_path / "stopped.log")
    try:
        wait_for_first_record(log, [child], timeout=240)
        child.send_signal(signal.SIGTERM)
    finally:
        rc = wait_all([child], timeout=120)[0]
    assert rc == 143, f"exit status {rc}\n{(tmp_path / 'stopped.log').read_text()[-3000:]}"
    message, stopped = stop_message(tmp_path / "stopped.log")
    # Saved on the signal: the only checkpoint is the stop step (ckpt_every is 100).
    assert 1 <= stopped < 30, f"the run was not stopped mid-run: {message}"
    assert ckpt.all_steps(run / "ar") == [stopped]
    assert [r["step"] for r in read_jsonl(log)] == list(range(1, stopped + 1))

    # The same command again, and side by side (both load the compiled step) the reference.
    procs = [start(cmd, env, tmp_path / "resumed.log"),
             start(train_command(ref, data_dir), env, tmp_path / "reference.log")]
    assert wait_all(procs) == [0, 0], \
        [(tmp_path / f"{n}.log").read_text()[-2000:] for n in ("resumed", "reference")]
    got, want = curve(run / "ar"), curve(ref / "ar")
    assert [r["step"] for r in got] == list(range(1, 31))  # each step once: nothing redone
    assert [r["step"] for r in want] == list(range(1, 31))
    for g, w in zip(got, want, strict=True):
        assert g == w, f"step {w['step']}: resumed {g} != uninterrupted {w}"

    cfg = load_config(MICRO, overrides(run, data_dir))
    tx = make_optimizer(cfg.ar)
    abstract, shardings = state_shardings(cfg.model, False, tx,
                                                  sharding.build_mesh(cfg.mesh))
    target = ckpt.abstract_target(abstract, shardings)
    final, _ = ckpt.restore(run / "ar", target)
    reference, _ = ckpt.restore(ref / "ar", target)
    assert int(final.step) == 30
    chex.assert_trees_all_equal(final, reference)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_job(run_dir: Path, data_dir: Path, env: dict[str, str],
              logs: Path) -> list[subprocess.Popen]:
    """The micro ar run as a two-process job (one CPU device each) on this machine; process
    ``i`` writes ``logs/<run_dir name>.<i>.log``."""
    port = free_port()
    return [start(train_command(run_dir, data_dir, "--coordinator", f"localhost:{port}",
                                "--num-processes", "2", "--process-id", str(i)),
                  env, logs / f"{run_dir.name}.{i}.log")
            for i in range(2)]


@pytest.mark.slow
def test_multiprocess_sigterm_to_one_process_stops_all_at_one_step(tmp_path,
                                                                   compilation_cache_dir):
    """Two processes; SIGTERM reaches only process 1 (as when one host is preempted). JAX's
    preemption service makes both stop after the same step; both save it (one checkpoint),
    exit with 143, and the resumed job's curve equals an uninterrupted two-process job's."""
    env, data_dir = run_env(compilation_cache_dir), tmp_path / "tfds"
    run, ref = tmp_path / "job", tmp_path / "ref"
    procs = start_job(run, data_dir, env, tmp_path)
    log = run / "ar" / "metrics.jsonl"
    try:
        wait_for_first_record(log, procs, timeout=300)
        procs[1].send_signal(signal.SIGTERM)
    finally:
        rcs = wait_all(procs, timeout=120)
    assert rcs == [143, 143], (tmp_path / "job.0.log").read_text()[-3000:]
    (message, stopped), (message_1, _) = (stop_message(tmp_path / f"job.{i}.log")
                                          for i in range(2))
    assert message == message_1 and 1 <= stopped < 30, message
    assert ckpt.all_steps(run / "ar") == [stopped]
    assert [r["step"] for r in read_jsonl(log)] == list(range(1, stopped + 1))  # process 0 only

    # Resume (the same commands) while the uninterrupted reference job runs on other ports.
    procs = start_job(run, data_dir, env, tmp_path) + start_job(ref, data_dir, env, tmp_path)
    assert wait_all(procs) == [0, 0, 0, 0], (tmp_path / "job.0.log").read_text()[-3000:]
    assert curve(run / "ar") == curve(ref / "ar")

"""Two processes on localhost (CPU backend, 4 devices each) train together with
``jax.distributed`` and agree with one process driving all 8 devices."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipo_jax import distributed
from pipo_jax.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
WORKER = str(REPO / "tests" / "distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def test_two_processes_train_together_and_agree(tmp_path: Path, compilation_cache_dir: Path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(compilation_cache_dir))
    # The worker sets its own device count; the suite's other flags (conftest) stay.
    env["XLA_FLAGS"] = " ".join(flag for flag in os.environ.get("XLA_FLAGS", "").split()
                                if "device_count" not in flag)
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, WORKER, str(tmp_path / "two"), "--cpu-devices", "4",
         "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the two-process job did not finish in 600 s")
        outs.append((p.returncode, out, err))
    if any(rc != 0 for rc, _, _ in outs) and any(
            "collectives" in err.lower() and "not" in err.lower() for _, _, err in outs):
        pytest.skip("this jaxlib's CPU backend cannot run cross-process collectives: "
                    + outs[0][2][-300:])
    for rc, _, err in outs:
        assert rc == 0, err[-3000:]
    results = [_last_json(out) for _, out, _ in outs]
    assert sorted(r["process"] for r in results) == [0, 1]
    assert all(r["processes"] == 2 and r["devices"] == 8 for r in results)
    assert results[0]["loss"] == results[1]["loss"]  # one global program, replicated metrics

    single = subprocess.run([sys.executable, WORKER, str(tmp_path / "one"), "--cpu-devices", "8"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    one = _last_json(single.stdout)
    assert one["processes"] == 1 and one["devices"] == 8
    assert results[0]["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert results[0]["grad_norm"] == pytest.approx(one["grad_norm"], rel=1e-4)
    # Only process 0 writes the run's metrics.
    assert (tmp_path / "two" / "ar" / "metrics.jsonl").is_file()


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "localhost:1"], "needs all of"),
    (["--num-processes", "2", "--process-id", "0"], "needs all of"),
    (["--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "2"],
     "must be in 0 … 1"),
    (["--distributed-auto", "--process-id", "0"], "either it or them"),
    (["--local-device-ids", "0,1"], "needs --coordinator"),
    (["--coordinator", "h:1", "--num-processes", "2", "--process-id", "0",
      "--local-device-ids", "0,x"], "comma-separated integers"),
    (["--cpu-devices", "0"], "must be positive"),
])
def test_bad_multiprocess_flags_are_clear_errors(flags: list[str], message: str):
    parser = argparse.ArgumentParser()
    distributed.add_arguments(parser)
    with pytest.raises(ConfigError, match=message):
        distributed.initialize(parser.parse_args(flags))


def test_train_py_accepts_the_multiprocess_flags():
    parser_help = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO,
                                 capture_output=True, text=True, timeout=120)
    assert parser_help.returncode == 0
    for flag in ("--coordinator", "--num-processes", "--process-id", "--distributed-auto",
                 "--local-device-ids", "--cpu-devices"):
        assert flag in parser_help.stdout

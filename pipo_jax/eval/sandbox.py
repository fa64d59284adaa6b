"""Runs untrusted Python (a model's code answer) in a limited subprocess.

Each run gets a fresh temporary directory (its working directory and ``HOME``, deleted after),
an empty environment, ``python -I`` (no user site, no ``PYTHON*`` variables), and limits the
child sets on itself before any untrusted line runs (``_DRIVER``: ``setrlimit`` in the child,
not ``preexec_fn``, which is unsafe in a parent with threads such as JAX's):

- address space (``memory_mb``): an allocation beyond it raises ``MemoryError`` → ``memory``;
- CPU seconds (``time_s`` + 1) and the wall clock (``time_s``): past either the whole process
  group is killed → ``timeout``;
- processes: ``os.fork``, ``os.exec*``, ``os.system``, ``subprocess`` and the ``posix``
  functions under them raise ``PermissionError``, so a fork bomb ends at its first ``fork``;
  ``RLIMIT_NPROC`` 0 backs that up in the kernel for a non-root user (root ignores the limit,
  and dropping to ``nobody`` would hide a Python installed under ``/root``); whatever it did
  start dies with its process group at the end of the run;
- file size (``output_mb``, also for stdout/stderr, which go to files): past it the write
  fails → ``output_limit``;
- network: when ``unshare --net`` works (as root, or with ``--map-root-user`` in a Linux user
  namespace otherwise) the child runs in a network namespace with no interface up, so no
  connection leaves the machine, not even to localhost. In every case ``socket.socket`` and
  friends are replaced by ones that raise (the only guard where no namespace can be made, e.g.
  in some containers). ``network_isolation()`` says which applies here.

This bounds what a wrong or hostile answer can do to an evaluation (hang it, exhaust memory or
processes, flood the disk, reach the network); it is not a security boundary against code that
targets the interpreter itself (``ctypes``): run untrusted benchmarks inside a container too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STATUSES = ("ok", "error", "timeout", "memory", "output_limit")
MEMORY_EXIT = 97  # the driver's exit code for MemoryError (distinct from a program's own codes)

# The child's first code: limits on itself, the socket guard, then the program. Kept free of
# imports beyond the standard library so that it starts in a few tens of milliseconds.
_DRIVER = r'''
import json, os, posix, resource, runpy, socket, sys
import _posixsubprocess
cfg = json.loads(sys.argv[1])
mem = cfg["memory_bytes"]
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cfg["cpu_s"], cfg["cpu_s"] + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (cfg["file_bytes"], cfg["file_bytes"]))
resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

def _no_network(*a, **k):
    raise PermissionError("network access is disabled in the sandbox")

def _no_process(*a, **k):
    raise PermissionError("starting processes is disabled in the sandbox")

class _NoSocket(socket.socket):
    def __init__(self, *a, **k):
        _no_network()

socket.socket = _NoSocket
for _name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
    setattr(socket, _name, _no_network)
for _mod in (os, posix):
    for _name in dir(_mod):
        if _name.startswith(("fork", "spawn", "exec", "posix_spawn")) or _name in (
                "system", "popen", "vfork"):
            setattr(_mod, _name, _no_process)
_posixsubprocess.fork_exec = _no_process
del _NoSocket, _name, _mod
sys.argv = [cfg["script"]]
try:
    runpy.run_path(cfg["script"], run_name="__main__")
except MemoryError:
    sys.stderr.write("MemoryError\n")
    sys.stderr.flush()
    os._exit(MEMORY_EXIT)
'''.replace("MEMORY_EXIT", str(MEMORY_EXIT))


@dataclasses.dataclass(frozen=True)
class Limits:
    """Per-run limits: ``time_s`` wall seconds, ``memory_mb`` address space, ``output_mb`` per
    file written (stdout and stderr included)."""

    time_s: float = 6.0
    memory_mb: int = 2048
    output_mb: int = 64

    def __post_init__(self) -> None:
        if not self.time_s > 0 or self.memory_mb < 64 or self.output_mb < 1:
            raise ValueError(f"sandbox limits must be time_s > 0, memory_mb >= 64 and "
                             f"output_mb >= 1, got {self}")


@dataclasses.dataclass(frozen=True)
class RunResult:
    """What one run did: ``status`` (one of ``STATUSES``), the exit code (None when killed),
    stdout (whole, decoded leniently), the tail of stderr and the wall seconds."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


def _unshare_command() -> list[str] | None:
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    # Root creates a network namespace directly; anyone else needs a user namespace for it.
    return [unshare, "--net"] if os.geteuid() == 0 else [unshare, "--net", "--map-root-user"]


@functools.cache
def network_isolation() -> str:
    """``"namespace"`` if ``unshare --net`` runs here, else ``"socket-guard"`` (probed once per
    process: the answer depends on the kernel and container, not on the input)."""
    cmd = _unshare_command()
    if cmd is None:
        return "socket-guard"
    try:
        ok = subprocess.run([*cmd, "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return "namespace" if ok else "socket-guard"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(script: str, stdin: str = "", limits: Limits | None = None,
               files: dict[str, str] | None = None) -> RunResult:
    """Runs ``script`` (Python source) as ``__main__`` in the sandbox, ``stdin`` as its input.

    Args:
      script: the program.
      stdin: text fed to its standard input.
      limits: the run's limits (default ``Limits()``).
      files: further files (name → text) written beside the script, e.g. a test harness's data.
    """
    limits = limits or Limits()
    with tempfile.TemporaryDirectory(prefix="pipo-sandbox-") as tmp:
        work = Path(tmp)
        (work / "main.py").write_text(script, encoding="utf-8")
        for name, text in (files or {}).items():
            (work / name).write_text(text, encoding="utf-8")
        (work / "stdin.txt").write_text(stdin, encoding="utf-8")
        cfg = {"script": str(work / "main.py"), "memory_bytes": limits.memory_mb << 20,
               "cpu_s": int(limits.time_s) + 1, "file_bytes": limits.output_mb << 20}
        cmd = [sys.executable, "-I", "-c", _DRIVER, json.dumps(cfg)]
        if network_isolation() == "namespace":
            cmd = [*(_unshare_command() or []), *cmd]
        env = {"PATH": "/usr/bin:/bin", "HOME": tmp, "LANG": "C.UTF-8", "TMPDIR": tmp,
               "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        with (open(work / "stdin.txt", "rb") as fin, open(work / "stdout.txt", "wb") as fout,
              open(work / "stderr.txt", "wb") as ferr):
            start = time.monotonic()
            proc = subprocess.Popen(cmd, stdin=fin, stdout=fout, stderr=ferr, cwd=tmp, env=env,
                                    start_new_session=True)
            try:
                returncode: int | None = proc.wait(timeout=limits.time_s)
            except subprocess.TimeoutExpired:
                returncode = None
            finally:
                _kill_group(proc)  # also whatever it left behind in its group
                proc.wait()
            seconds = time.monotonic() - start
        out = (work / "stdout.txt").read_bytes().decode("utf-8", "replace")
        err = (work / "stderr.txt").read_bytes()[-4000:].decode("utf-8", "replace")
    if returncode is None or returncode in (-signal.SIGXCPU, -signal.SIGKILL):
        status = "timeout"
    elif returncode == MEMORY_EXIT:
        status = "memory"
    elif returncode == -signal.SIGXFSZ or "File too large" in err:
        status = "output_limit"
    elif returncode == 0:
        status = "ok"
    else:
        status = "error"
    return RunResult(status, returncode, out, err, seconds)

"""One-line reports of writes that the storage refuses: a full disk, a read-only or forbidden
directory, an I/O error.

Every writer (checkpoint saves, metrics, evaluation results, reports) reports such a failure
the same way, through ``write_error``: what it could not write where, why, how much space is
left on which file system, and what to do. ``reporting`` raises it as ``StorageError``, which
a CLI prints as one ``error:`` line with exit status 2 (``pipo_jax.cli.run_main``).

Light on purpose (no JAX): the CLIs' result writers import it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipo_jax.errors import StorageError

_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_NOT_WRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})
# The errno values that mean the storage, not the program, is at fault.
STORAGE_ERRNOS = _NO_SPACE | _NOT_WRITABLE | {errno.EIO}
# tensorstore (orbax's array writer) raises a ValueError whose text carries the OS error, e.g.
# `Failed to write 13570 bytes to file 15: No space left on device [os_error_code='28']`.
_OS_ERROR_CODE = re.compile(r"os_error_code='(\d+)'")


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the exceptions it was raised from or during, newest first."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def storage_errno(exc: BaseException) -> int | None:
    """The errno of the storage fault behind ``exc`` (one of ``STORAGE_ERRNOS``), found on an
    ``OSError`` or in tensorstore's error text anywhere in its cause chain; None for any other
    error."""
    for e in _causes(exc):
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            return e.errno
        code = _OS_ERROR_CODE.search(str(e))
        if code and int(code.group(1)) in STORAGE_ERRNOS:
            return int(code.group(1))
    return None


def _size(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{int(n)} B" if i == 0 else f"{n:.1f} {units[i]}"


def free_space(path: str | Path) -> str:
    """``"12.0 MiB free on /mnt/data"``: the free space of the file system holding ``path`` (or
    its nearest existing parent) and that file system's mount point; ``""`` if unknown."""
    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
        mount = existing.resolve()
        while not os.path.ismount(mount):
            mount = mount.parent
    except OSError:
        return ""
    return f"{_size(free)} free on {mount}"


def _reason(path: Path, exc: BaseException) -> str:
    code = storage_errno(exc)
    os_error = next((e for e in _causes(exc) if isinstance(e, OSError)), None)
    if os_error is not None and (code is None or os_error.errno == code):
        reason = os_error.strerror or str(os_error)
        # The file the OS refused, when it is not the one named first (a parent directory).
        named = os_error.filename
        if named is not None and Path(os.fsdecode(named)).absolute() != path.absolute():
            reason += f": {os.fsdecode(named)}"
        return reason
    if code is not None:
        return os.strerror(code)
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def write_error(path: str | Path, exc: BaseException, what: str = "write",
                elsewhere: str = "write elsewhere", note: str = "") -> str:
    """The one-line message for a failed write of ``path``, e.g. ``cannot save checkpoint step
    40 to runs/x/sft/checkpoints: No space left on device (12.0 MiB free on /mnt); free space or
    set run_dir elsewhere — the last committed checkpoint (step 20) is intact``.

    Args:
      path: what was being written (a file or directory).
      exc: the error (an ``OSError``, or a library's error with one behind it).
      what: the verb phrase before ``path``: ``"write"``, ``"save checkpoint step 40 to"``.
      elsewhere: the other way out, after "free space or": ``"choose another --out"``.
      note: appended after a dash (e.g. what is still intact); ``""`` for none.
    """
    path = Path(path)
    code = storage_errno(exc)
    if code in _NO_SPACE:
        advice = f"free space or {elsewhere}"
    elif code in _NOT_WRITABLE:
        advice = f"make it writable or {elsewhere}"
    elif code == errno.EIO:
        advice = f"check the disk or {elsewhere}"
    else:
        advice = f"check the path or {elsewhere}"
    free = free_space(path)
    return (f"cannot {what} {path}: {_reason(path, exc)}{f' ({free})' if free else ''}; "
            f"{advice}{f' — {note}' if note else ''}")


@contextlib.contextmanager
def reporting(path: str | Path, what: str = "write",
              elsewhere: str = "write elsewhere") -> Iterator[None]:
    """Raises an ``OSError`` from the block, or a storage fault that a library wraps in another
    error (``storage_errno``), as ``StorageError`` with ``write_error``'s message."""
    try:
        yield
    except StorageError:
        raise  # already reported, by an inner writer
    except Exception as e:
        if not isinstance(e, OSError) and storage_errno(e) is None:
            raise
        raise StorageError(write_error(path, e, what, elsewhere)) from e


def check_writable(directory: str | Path, what: str = "write to",
                   elsewhere: str = "write elsewhere") -> None:
    """Raises ``StorageError`` unless a file can be created in ``directory``: run before long
    work whose results go there, so that they are not lost at the end.

    Creates ``directory`` (and its missing parents) to find out, and removes whatever it
    created again, so that a command failing later leaves nothing behind.
    """
    directory = Path(directory)
    missing: list[Path] = []  # directory and its parents that do not exist, deepest first
    at = directory.absolute()
    while not at.exists() and at != at.parent:
        missing.append(at)
        at = at.parent
    created: list[Path] = []
    try:
        with reporting(directory, what, elsewhere):
            for d in reversed(missing):
                d.mkdir()
                created.append(d)
            fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-probe-")
            os.close(fd)
            os.unlink(probe)
    finally:
        for d in reversed(created):  # the deepest first
            with contextlib.suppress(OSError):
                d.rmdir()

"""Training metrics: one JSON line per logged step plus TensorBoard event files.

``metrics.jsonl`` is the machine-readable record (notebooks, tests, benchmarks read it with
``read_jsonl``); the event files are for watching a run live with ``tensorboard --logdir runs``.

TensorBoard files are written with ``tensorboardX``, which needs only protobuf. The obvious JAX
alternative, ``clu.metric_writers``, imports its TF-summary ``SummaryWriter`` (``import
tensorflow``) from the package ``__init__``, and its other event-file writer,
``TorchTensorboardWriter``, needs PyTorch; dropping the TensorFlow import is still an open
request upstream (google/CommonLoopUtils PR #358, "lazy import tensorflow"). Neither framework is
otherwise needed here.

Events go through tensorboardX's synchronous ``EventsWriter`` rather than its ``SummaryWriter``:
the latter hands events to a background thread through a queue, and its ``flush()`` does not
drain that queue, so recent points could be missing after ``flush()`` or lost in a crash. A few
scalars every ``log_every`` steps cost nothing to write synchronously.

In a multi-process (multi-host) run only process 0 writes: a ``MetricWriter`` on any other
process is inactive (no files, writes are no-ops), so every process can run the same loop code.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import uuid
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

import jax
import numpy as np
from tensorboardX import summary as tb_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2, summary_pb2

from pipo_jax.io import diskerrors

JSONL_FILE = "metrics.jsonl"


def _to_float(name: str, value: Any) -> float:
    # np.asarray handles Python numbers, numpy scalars and (committed) jax arrays alike; a
    # non-scalar here is a caller bug that float() would only catch with a deprecation warning.
    arr = np.asarray(value)
    if arr.ndim != 0:
        raise ValueError(f"metric {name!r} must be a scalar, got shape {arr.shape}")
    return float(arr)


class MetricWriter:
    """Writes scalar metrics to ``<log_dir>/metrics.jsonl`` and to TensorBoard in ``log_dir``.

    JSONL records look like ``{"step": 20, "loss_backbone": 1.23, ...}``: keys are the names
    passed to ``write_scalars``. TensorBoard tags are ``f"{prefix}/{name}"`` (just ``name``
    without a prefix), e.g. ``sft/loss_backbone``.

    The JSONL file is appended to, so a resumed run continues its log; steps logged after the
    last checkpoint of a crashed run then appear twice, and the later record is the one from the
    resumed run. (A run stopped by SIGTERM saves the step it stopped at, so its resumed log has
    no repeats.)
    """

    def __init__(self, log_dir: str | Path, prefix: str = "", active: bool | None = None) -> None:
        """Opens the writers; every write is flushed to disk before it returns.

        Args:
          log_dir: directory for ``metrics.jsonl`` and the event files (created if missing).
          prefix: TensorBoard tag prefix, usually the stage name (``"sft"``).
          active: whether this writer writes at all; None means "on process 0 only"
            (``jax.process_index() == 0``). An inactive writer opens no files and ignores
            writes: processes sharing a file system must not append to the same log.
        """
        self.log_dir = Path(log_dir)
        self.jsonl_path = self.log_dir / JSONL_FILE
        self._prefix = prefix.rstrip("/")
        self.active = jax.process_index() == 0 if active is None else active
        self._closed = False
        if not self.active:
            return
        with self._reporting():
            self._open()

    def _reporting(self) -> contextlib.AbstractContextManager[None]:
        # A full or read-only disk is one error line naming the directory and the free space.
        return diskerrors.reporting(self.log_dir, "write metrics to", "set run_dir elsewhere")

    def _open(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # A process killed mid-write can leave a final line without its newline; start on a
        # fresh line so the first new record is not glued to that fragment.
        needs_newline = False
        if self.jsonl_path.exists() and self.jsonl_path.stat().st_size > 0:
            with self.jsonl_path.open("rb") as f:
                f.seek(-1, 2)
                needs_newline = f.read(1) != b"\n"
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8")
        if needs_newline:
            self._jsonl.write("\n")
        # Event file names only carry the time in whole seconds; the suffix keeps a writer
        # reopened within the same second (a quick resume) from truncating the previous file.
        self._tb = EventsWriter(str(self.log_dir / "events"),
                                filename_suffix=f".{uuid.uuid4().hex[:8]}")

    def _tag(self, name: str) -> str:
        return f"{self._prefix}/{name}" if self._prefix else name

    def write_scalars(self, step: int, scalars: dict[str, Any]) -> None:
        """Logs ``scalars`` at ``step``; values may be Python, numpy or jax scalars.

        Non-finite values are written as ``null`` in the JSONL file (JSON has no NaN) and as
        they are to TensorBoard, which plots them as NaN/inf markers.
        """
        self._check_open()
        if "step" in scalars:
            raise ValueError("'step' is reserved for the step number; rename that metric")
        step = int(step)
        values = {name: _to_float(name, value) for name, value in scalars.items()}
        if not self.active:
            return
        record: dict[str, Any] = {"step": step}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        # Flushing each record keeps both logs complete up to the last logged step after a
        # crash; they are written only every log_every steps, so the cost is negligible.
        with self._reporting():
            self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
            self._jsonl.flush()
            self._write_event(step, [v for name, value in values.items()
                                     for v in tb_summary.scalar(self._tag(name), value).value])

    def write_text(self, step: int, tag: str, text: str) -> None:
        """Logs a text sample (e.g. a decoded generation) to TensorBoard only."""
        self._check_open()
        if self.active:
            with self._reporting():
                self._write_event(int(step), list(tb_summary.text(self._tag(tag), text).value))

    def _write_event(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
        event = event_pb2.Event(wall_time=time.time(), step=step,
                                summary=summary_pb2.Summary(value=values))
        self._tb.write_event(event)
        self._tb.flush()

    def flush(self) -> None:
        """Flushes both files (each write already does; kept for the writer protocol)."""
        self._check_open()
        if self.active:
            with self._reporting():
                self._jsonl.flush()
                self._tb.flush()

    def close(self) -> None:
        """Flushes and closes both writers; closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        if self.active:
            with self._reporting():
                try:
                    self._jsonl.close()
                finally:
                    self._tb.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"MetricWriter for {self.log_dir} is already closed")

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Reads a ``metrics.jsonl`` file (or a directory containing one) into a list of records.

    Lines that are not valid JSON can only be fragments left by a killed process; they are
    skipped with a warning rather than making the whole log unreadable.
    """
    path = Path(path)
    if path.is_dir():
        path = path / JSONL_FILE
    records: list[dict[str, Any]] = []
    bad: list[int] = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                bad.append(lineno)
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} unparsable line(s) {bad[:5]} (torn writes?)",
                      stacklevel=2)
    return records

"""Training metrics: one JSON line per logged step plus TensorBoard event files.

``metrics.jsonl`` is the machine-readable record (notebooks, tests, benchmarks read it with
``read_jsonl``); the event files are for watching a run live with ``tensorboard --logdir runs``.

TensorBoard files are written with ``tensorboardX``, which needs only protobuf. The obvious JAX
alternative, ``clu.metric_writers``, imports its TF-summary ``SummaryWriter`` (``import
tensorflow``) from the package ``__init__``, and its other event-file writer,
``TorchTensorboardWriter``, needs PyTorch; dropping the TensorFlow import is still an open
request upstream (google/CommonLoopUtils PR #358, "lazy import tensorflow"). Neither framework is
otherwise needed here.

Only one process should write metrics; in a multi-host run, construct the writer on process 0.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from tensorboardX import SummaryWriter

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
    last checkpoint of the interrupted run then appear twice, and the later record is the one
    from the resumed run.
    """

    def __init__(self, log_dir: str | Path, prefix: str = "", flush_secs: int = 30) -> None:
        """Opens the writers.

        Args:
          log_dir: directory for ``metrics.jsonl`` and the event files (created if missing).
          prefix: TensorBoard tag prefix, usually the stage name (``"sft"``).
          flush_secs: how often tensorboardX flushes event files in the background.
        """
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.log_dir / JSONL_FILE
        self._prefix = prefix.rstrip("/")
        # A process killed mid-write can leave a final line without its newline; start on a
        # fresh line so the first new record is not glued to that fragment.
        needs_newline = (self.jsonl_path.exists() and self.jsonl_path.stat().st_size > 0
                         and not self.jsonl_path.read_bytes().endswith(b"\n"))
        self._jsonl = self.jsonl_path.open("a", encoding="utf-8")
        if needs_newline:
            self._jsonl.write("\n")
        self._tb = SummaryWriter(logdir=str(self.log_dir), flush_secs=flush_secs)
        self._closed = False

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
        record: dict[str, Any] = {"step": step}
        record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
        # Flushing each line keeps the JSONL complete up to the last logged step after a crash;
        # it is written only every log_every steps, so the cost is negligible.
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._tb.add_scalar(self._tag(name), value, global_step=step)

    def write_text(self, step: int, tag: str, text: str) -> None:
        """Logs a text sample (e.g. a decoded generation) to TensorBoard only."""
        self._check_open()
        self._tb.add_text(self._tag(tag), text, global_step=int(step))

    def flush(self) -> None:
        """Forces both the JSONL file and the event files to disk."""
        self._check_open()
        self._jsonl.flush()
        self._tb.flush()

    def close(self) -> None:
        """Flushes and closes both writers; closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        self._jsonl.close()
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

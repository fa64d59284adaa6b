"""Resumable per-question result files: ``<out_dir>/<benchmark>.<model>.jsonl``.

Line 1 is ``{"header": {...}}``: everything that decides the file's results (run, checkpoint
step, benchmark digest, samples, sampling options, budget, system prompt). Every further line is
one question's record. A file is only resumed under an identical header; anything else is
refused with the differing keys, and ``restart=True`` starts the file over.

Records are appended and flushed (and fsynced) as each batch of questions finishes, so an
interrupt loses at most the batch in flight. A crash in the middle of a write leaves a last line
without its newline: it is discarded (cut off the file) on the next open, and its question is
evaluated again.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import IO, Any

from pipo_jax.eval.schema import BenchError
from pipo_jax.io.diskerrors import reporting

FORMAT = 1


def result_path(out_dir: str | Path, benchmark: str, model: str) -> Path:
    return Path(out_dir) / f"{benchmark}.{model}.jsonl"


def _read_complete_lines(path: Path) -> tuple[list[bytes], int]:
    """The newline-terminated lines of ``path`` and their total length in bytes; an
    unterminated last line (a write cut short) is left out."""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # 0 when no line is complete
    return data[:end].splitlines(), end


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys
                     if old.get(k) != new.get(k))


class ResultFile:
    """An open result file: ``done`` maps question id → record already on file.

    Use as a context manager; ``append`` writes whole records and flushes them to disk.
    """

    def __init__(self, path: str | Path, header: dict[str, Any], restart: bool = False) -> None:
        self.path = Path(path)
        self.header = {"format": FORMAT, **header}
        self.done: dict[str, dict[str, Any]] = {}
        self.discarded_partial_line = False
        with self._reporting():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        valid_bytes = 0
        if self.path.exists() and not restart:
            valid_bytes = self._load()
        with self._reporting():
            self._file: IO[str] = open(self.path, "r+" if valid_bytes else "w",
                                       encoding="utf-8")
            if valid_bytes:
                self._file.truncate(valid_bytes)  # drop a partial last line before appending
                self._file.seek(valid_bytes)
            else:
                self._file.write(json.dumps({"header": self.header}) + "\n")
                self._sync()

    def _reporting(self) -> contextlib.AbstractContextManager[None]:
        # A full or read-only disk is one error line with the path and the free space.
        return reporting(self.path, "write the results to", "choose another --out-dir")

    def _load(self) -> int:
        """Reads the header and records; returns the byte length to keep (0: start over)."""
        lines, valid_bytes = _read_complete_lines(self.path)
        self.discarded_partial_line = valid_bytes < self.path.stat().st_size
        if not lines:  # empty, or the header itself was cut short
            return 0
        try:
            header = json.loads(lines[0])["header"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise BenchError(f"{self.path}:1: not a result file header; move the file away or "
                             "pass --restart to overwrite it") from e
        if header != self.header:
            raise BenchError(
                f"{self.path} holds results for different options "
                f"({_differences(header, self.header)}); rerun with the same options, "
                "choose another --out-dir, or pass --restart to start over")
        for lineno, line in enumerate(lines[1:], start=2):
            try:
                record = json.loads(line)
                qid = record["id"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise BenchError(f"{self.path}:{lineno}: corrupt result line; pass --restart "
                                 "to start over") from e
            self.done[qid] = record
        return valid_bytes

    def _sync(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())

    def append(self, records: list[dict[str, Any]]) -> None:
        """Appends one line per record, then flushes them to disk."""
        with self._reporting():
            for record in records:
                self._file.write(json.dumps(record) + "\n")
                self.done[record["id"]] = record
            self._sync()

    def close(self) -> None:
        with self._reporting():
            self._file.close()

    def __enter__(self) -> ResultFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

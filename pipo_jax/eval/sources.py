"""Converters from local copies of public benchmark files to the benchmark schema.

- ``aime25``: AIME-2025-style JSONL (``math-ai/aime25``), one object per line with ``problem``,
  ``answer`` (string or integer) and optional ``id``; other fields are ignored. Each line
  becomes a ``boxed`` question; without ``id`` the id is the 1-based line number.
- ``gpqa``: GPQA-style CSV (``Idavidrein/gpqa``, e.g. ``gpqa_diamond.csv``) with the columns
  ``Question``, ``Correct Answer``, ``Incorrect Answer 1``..``3`` (and optionally
  ``Record ID``, used as the id; else the 1-based row number). Each row becomes a ``choice``
  question whose four options are shuffled by ``random.Random(f"{seed}:{id}")``: the same seed
  always gives the same order, a row's order does not depend on the other rows, and the answer
  is the letter the correct option landed on.

- ``test-split``: the embedded arithmetic task's held-out problems of a run (its ``data``
  settings), as ``boxed`` questions posed as in training (``instruction: ""``): try
  ``decode.py --bench`` on the default run.

Only local files and the standard library: download the files yourself (they are gated or
licensed separately) and convert them here.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipo_jax.config import DataConfig
from pipo_jax.data.loader import test_examples
from pipo_jax.eval.schema import LETTERS, BenchError, json_lines, load_benchmark

GPQA_OPTIONS = ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                "Incorrect Answer 3")


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise BenchError(f"{path}: no such input file")
    try:
        return path.read_text(encoding="utf-8-sig")  # tolerate a byte-order mark
    except UnicodeDecodeError as e:
        raise BenchError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e


def _field(value: Any, name: str, where: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise BenchError(f"{where}: {name} must be a non-empty string, got {value!r}")
    return value.strip()


def _check_ids(records: list[tuple[str, dict[str, Any]]], path: Path) -> list[dict[str, Any]]:
    """The records, once no id repeats and there is at least one; ``records`` pairs each with
    its ``file:line``."""
    first: dict[str, str] = {}
    for where, r in records:
        if r["id"] in first:
            raise BenchError(f"{where}: duplicate id {r['id']!r} (first at {first[r['id']]})")
        first[r["id"]] = where
    if not records:
        raise BenchError(f"{path}: no questions (the file is empty)")
    return [r for _, r in records]


def aime25_questions(path: str | Path) -> list[dict[str, Any]]:
    """Questions (schema dicts, kind ``boxed``) from an AIME-2025-style JSONL file."""
    path = Path(path)
    out = []
    for lineno, where, obj in json_lines(_read_text(path), path):
        if not isinstance(obj, dict):
            raise BenchError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        for name in ("problem", "answer"):
            if name not in obj:
                raise BenchError(f"{where}: missing field {name!r}")
        qid = _field(obj["id"], "id", where) if "id" in obj else str(lineno)
        out.append((where, {"id": qid, "question": _field(obj["problem"], "problem", where),
                            "answer": _field(obj["answer"], "answer", where), "kind": "boxed"}))
    return _check_ids(out, path)


def gpqa_questions(path: str | Path, seed: int) -> list[dict[str, Any]]:
    """Questions (schema dicts, kind ``choice``, options shuffled by ``seed``) from a GPQA CSV."""
    path = Path(path)
    reader = csv.DictReader(_read_text(path).splitlines(keepends=True))
    columns = set(reader.fieldnames or ())
    missing = [c for c in ("Question", *GPQA_OPTIONS) if c not in columns]
    if missing:
        raise BenchError(f"{path}:1: missing column(s) {missing}")
    out = []
    for row_number, row in enumerate(reader, start=1):
        where = f"{path}:{reader.line_num}"
        qid = (row.get("Record ID") or "").strip() or str(row_number)
        question = _field(row["Question"], "Question", where)
        options = [_field(row[c], c, where) for c in GPQA_OPTIONS]
        order = list(range(len(options)))
        random.Random(f"{seed}:{qid}").shuffle(order)
        out.append((where, {"id": qid, "question": question,
                            "choices": [options[i] for i in order],
                            "answer": LETTERS[order.index(0)], "kind": "choice"}))
    return _check_ids(out, path)


def test_split_questions(data_cfg: DataConfig, n: int | None = None) -> list[dict[str, Any]]:
    """The embedded task's held-out problems (``kind: boxed``, ids ``arith-<index>``): the
    benchmark path exercised on a run trained on that task. Builds the data set if needed."""
    # The task's model was trained on the bare question (no eval instruction appended).
    return [{"id": f"arith-{i}", "question": ex["question"], "answer": ex["answer"],
             "kind": "boxed", "instruction": ""}
            for i, ex in enumerate(test_examples(data_cfg, n))]


test_split_questions.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Writes one JSON object per line (write-then-rename), then loads the file back through the
    schema as a self-check; returns the number of questions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    lines = [json.dumps(r, ensure_ascii=False) + "\n" for r in records]
    tmp.write_text("".join(lines), encoding="utf-8")
    os.replace(tmp, path)
    return len(load_benchmark(path).questions)

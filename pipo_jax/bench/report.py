"""One results table across benchmarks and runs, from the result files of ``decode.py --bench``.

A result file (``pipo_jax.eval.store``) is ``<out_dir>/<benchmark>.<model>.jsonl``: line 1 is
``{"header": {...}}``, every further line one question's record. A report has

- one *row* per (model, run, stage, step) of the headers, labelled ``AR``, ``SPEC`` or ``PIPO``
  (``"PIPO (opd, step 40)"`` only where two rows would otherwise share a label), ordered AR,
  SPEC, PIPO, then any other model, each group in the order first given;
- one *column* per benchmark (the header's ``benchmark``), in the order first given, then
  "Overall": the plain mean over benchmarks of avg@k and pass@k, for rows that have them all;
- per cell, ``pipo_jax.eval.aggregate.aggregate`` of its records: avg@k, pass@k (the unbiased
  estimator at n = k), mean real tokens, commit rate, tokens per backbone pass, finished rate;
- where records carry ``tags`` (string → string, e.g. LongBench v2's difficulty and length),
  avg@k and pass@k per (benchmark, tag, value, row).

Everything here is pure Python (no JAX): reports are made wherever the result files are.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipo_jax.errors import BenchError
from pipo_jax.eval.aggregate import aggregate
from pipo_jax.io.diskerrors import reporting

MISSING = "–"
STAT_KEYS = ("tokens", "backbone_passes", "drafts", "commits", "finished")
_MODEL_LABELS = {"ar": "AR", "spec": "SPEC", "pipo": "PIPO"}
_MODEL_ORDER = ("ar", "spec", "pipo")
_HOW_TO_FIX = "pass the result files written by decode.py --bench (<benchmark>.<model>.jsonl)"

RowKey = tuple[str, Any, Any, Any]
"""(model, run, stage, step) of a result header: what makes one row of the table."""


@dataclass(frozen=True)
class ResultSet:
    """One loaded result file: its header and its complete question records, in file order."""

    path: Path
    header: dict[str, Any]
    records: list[dict[str, Any]]

    @property
    def benchmark(self) -> str:
        return self.header["benchmark"]

    @property
    def model(self) -> str:
        return self.header["model"]

    @property
    def k(self) -> int:
        return self.header["samples"]

    @property
    def row_key(self) -> RowKey:
        h = self.header
        return (h["model"], h.get("run"), h.get("stage"), h.get("step"))


@dataclass(frozen=True)
class Row:
    """A row of the table: its identity and its (unique) label."""

    key: RowKey
    label: str

    @property
    def model(self) -> str:
        return self.key[0]


@dataclass
class Report:
    """Everything a report prints: ``cells[(label, benchmark)]`` holds a cell's metrics (see
    ``cell_metrics``), ``overall[label]`` the mean avg@k and pass@k over benchmarks (None for a
    row without every benchmark), ``tags`` one entry per (benchmark, tag, value, row) and
    ``notes`` the warnings printed under the accuracy table."""

    k: int
    benchmarks: list[str]
    rows: list[Row]
    cells: dict[tuple[str, str], dict[str, Any]]
    overall: dict[str, dict[str, float] | None]
    tags: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# --- loading ---------------------------------------------------------------------------------


def _complete_lines(path: Path) -> list[bytes]:
    """The newline-terminated lines of ``path``: an unterminated last line is a write cut short
    (``store.ResultFile`` discards it on its next open too), so it is no result yet."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BenchError(f"{path}: cannot read it ({e.strerror}); {_HOW_TO_FIX}") from e
    return data[:data.rfind(b"\n") + 1].splitlines()


def _header_of(line: bytes) -> dict[str, Any] | None:
    """The header dict of a result file's first line; None if the line is no result header."""
    try:
        obj = json.loads(line)
    except ValueError:  # JSONDecodeError and bad UTF-8 alike
        return None
    if isinstance(obj, dict) and isinstance(obj.get("header"), dict):
        return obj["header"]
    return None


def _check_header(path: Path, header: dict[str, Any]) -> None:
    for key, kind in (("benchmark", str), ("model", str), ("samples", int)):
        value = header.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise BenchError(f"{path}:1: the result header's {key!r} must be a {kind.__name__}, "
                             f"got {value!r}; {_HOW_TO_FIX}")
    if header["samples"] < 1:
        raise BenchError(f"{path}:1: the result header's 'samples' must be >= 1, got "
                         f"{header['samples']}")


def _check_record(where: str, record: Any, k: int) -> None:
    """Refuses a record that lacks what the metrics read; unknown keys are left alone."""
    if not isinstance(record, dict) or "id" not in record:
        raise BenchError(f"{where}: not a question record (a JSON object with an 'id'); "
                         "rerun decode.py --bench with --restart to rewrite the file")
    c = record.get("num_correct")
    if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c <= k:
        raise BenchError(f"{where}: question {record['id']!r}: num_correct must be an integer "
                         f"in [0, {k}], got {c!r}")
    samples = record.get("samples")
    if not isinstance(samples, list) or len(samples) != k:
        got = len(samples) if isinstance(samples, list) else repr(samples)
        raise BenchError(f"{where}: question {record['id']!r}: expected {k} samples (the "
                         f"header's 'samples'), got {got}")
    for s in samples:
        stats = s.get("stats") if isinstance(s, dict) else None
        if not isinstance(stats, dict) or any(key not in stats for key in STAT_KEYS):
            raise BenchError(f"{where}: question {record['id']!r}: every sample needs 'stats' "
                             f"with {list(STAT_KEYS)}")
    tags = record.get("tags")
    if tags is not None and not (isinstance(tags, dict) and all(
            isinstance(n, str) and isinstance(v, str) for n, v in tags.items())):
        raise BenchError(f"{where}: question {record['id']!r}: tags must map strings to "
                         f"strings, got {tags!r}")


def read_result_file(path: str | Path, required: bool = True) -> ResultSet | None:
    """Loads one result file.

    Returns its ``ResultSet``, or None when its first line is not a result header and
    ``required`` is false (a directory's other ``*.jsonl``). Raises ``BenchError`` for a file
    named explicitly that is no result file, a bad header, a corrupt record line or a file
    without a finished question. A last line without its newline is ignored.
    """
    path = Path(path)
    lines = _complete_lines(path)
    header = _header_of(lines[0]) if lines else None
    if header is None:
        if not required:
            return None
        raise BenchError(f"{path}: not a result file (its first line is no "
                         f'{{"header": ...}}); {_HOW_TO_FIX}')
    _check_header(path, header)
    k = header["samples"]
    records: dict[str, dict[str, Any]] = {}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line)
        except ValueError as e:
            raise BenchError(f"{where}: corrupt result line; rerun decode.py --bench with "
                             "--restart to rewrite the file") from e
        _check_record(where, record, k)
        # The last record of an id wins, as in store.ResultFile.done.
        records[str(record["id"])] = record
    if not records:
        raise BenchError(f"{path}: no finished question yet; let decode.py --bench finish it "
                         "or leave the file out")
    return ResultSet(path, header, list(records.values()))


def load_results(paths: Sequence[str | Path]) -> list[ResultSet]:
    """The result files of ``paths``: files, or directories whose ``*.jsonl`` with a result
    header are taken (in name order) and others skipped. The same file reached twice is loaded
    once. Raises ``BenchError`` for a missing path or when nothing is found."""
    found: list[ResultSet] = []
    seen: set[Path] = set()

    def add(p: Path, required: bool) -> None:
        if p.resolve() in seen:
            return
        seen.add(p.resolve())
        result = read_result_file(p, required)
        if result is not None:
            found.append(result)

    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            # Dot files are left out: an interrupted atomic write leaves one behind.
            for child in sorted(p.glob("*.jsonl")):
                if child.is_file() and not child.name.startswith("."):
                    add(child, required=False)
        elif p.exists():
            add(p, required=True)
        else:
            raise BenchError(f"{p}: no such file or directory; {_HOW_TO_FIX}")
    if not found:
        raise BenchError(f"no result files in {', '.join(map(str, paths))}; {_HOW_TO_FIX}")
    return found


# --- metrics ---------------------------------------------------------------------------------


def _metrics(records: Sequence[dict[str, Any]], k: int) -> dict[str, Any]:
    """``aggregate``'s metrics of ``records`` plus their question count and total drafts."""
    stats = [s["stats"] for r in records for s in r["samples"]]
    return {"questions": len(records),
            **aggregate([r["num_correct"] for r in records], k, stats),
            "drafts": sum(s["drafts"] for s in stats)}


def cell_metrics(result: ResultSet) -> dict[str, Any]:
    """One cell's metrics: ``file``, ``questions``, ``avg@k``, ``pass@k``, ``mean_tokens``,
    ``commit_rate``, ``tokens_per_pass``, ``finished_rate``, ``drafts`` (total, 0 for AR),
    ``max_new_tokens`` (the header's budget, None if absent) and ``budget_used`` (mean tokens
    / budget; None without a budget)."""
    m = _metrics(result.records, result.k)
    budget = result.header.get("max_new_tokens")
    has_budget = isinstance(budget, int) and not isinstance(budget, bool) and budget > 0
    return {"file": str(result.path), **m, "max_new_tokens": budget,
            "budget_used": m["mean_tokens"] / budget if has_budget else None}


def _model_rank(model: str) -> tuple[int, str]:
    return (_MODEL_ORDER.index(model), "") if model in _MODEL_ORDER else (len(_MODEL_ORDER), model)


def _detailed(key: RowKey, level: int) -> str:
    """``key``'s label at a level of detail: 0 the model, 1 with stage and step, 2 with the
    run's directory name too, 3 with the run's whole path."""
    model, run, stage, step = key
    base = _MODEL_LABELS.get(model, model.upper())
    parts = []
    if level >= 2 and run is not None:
        parts.append(str(run) if level >= 3 else (Path(str(run)).name or str(run)))
    if level >= 1:
        parts += [str(stage)] if stage is not None else []
        parts += [f"step {step}"] if step is not None else []
    return f"{base} ({', '.join(parts)})" if parts else base


def row_labels(keys: Sequence[RowKey]) -> dict[RowKey, str]:
    """A unique label per row: the model alone where no other row shares it, else the least
    detail (stage and step, then the run) that tells the rows apart."""
    groups: dict[str, list[RowKey]] = {}
    for key in keys:
        groups.setdefault(_detailed(key, 0), []).append(key)
    labels: dict[RowKey, str] = {}
    for group in groups.values():
        for level in range(4):
            names = [_detailed(key, level) for key in group]
            if len(set(names)) == len(names):
                break
        else:  # keys that differ only in how run/stage/step print: number them
            names = [f"{name} #{i + 1}" for i, name in enumerate(names)]
        labels.update(zip(group, names, strict=True))
    return labels


def _check_compatible(results: Sequence[ResultSet]) -> None:
    """One k for all, one file per (row, benchmark), one benchmark version per name."""
    first = results[0]
    for r in results[1:]:
        if r.k != first.k:
            raise BenchError(
                f"{first.path} has {first.k} samples per question but {r.path} has {r.k}; "
                "avg@k and pass@k are only comparable at one k: report them separately or "
                f"re-evaluate with --samples {first.k}")
    owner: dict[tuple[RowKey, str], ResultSet] = {}
    digest: dict[str, ResultSet] = {}
    for r in results:
        other = owner.setdefault((r.row_key, r.benchmark), r)
        if other is not r:
            raise BenchError(
                f"{other.path} and {r.path} both hold {r.model} results of run {r.row_key[1]!r} "
                f"(stage {r.row_key[2]!r}, step {r.row_key[3]!r}) on benchmark "
                f"{r.benchmark!r}; pass only one of them")
        sha = r.header.get("benchmark_sha256")
        if sha is None:
            continue
        other = digest.setdefault(r.benchmark, r)
        if other.header["benchmark_sha256"] != sha:
            raise BenchError(
                f"{other.path} and {r.path} were evaluated on different files named "
                f"{r.benchmark!r} (sha256 {other.header['benchmark_sha256'][:12]}… vs "
                f"{sha[:12]}…); rename one benchmark file or report them separately")


def _tag_breakdown(results: Sequence[ResultSet], benchmarks: Sequence[str],
                   labels: dict[RowKey, str], order: Sequence[str]) -> list[dict[str, Any]]:
    """avg@k and pass@k per (benchmark, tag, value, row) over the records that carry the tag;
    benchmarks in table order, tags and values sorted, rows in table order."""
    grouped: dict[tuple[str, str, str], dict[str, list[dict[str, Any]]]] = {}
    for r in results:
        for record in r.records:
            for name, value in (record.get("tags") or {}).items():
                cell = grouped.setdefault((r.benchmark, name, value), {})
                cell.setdefault(labels[r.row_key], []).append(record)
    k = results[0].k
    rank = {b: i for i, b in enumerate(benchmarks)}
    out = []
    for bench, name, value in sorted(grouped, key=lambda t: (rank[t[0]], t[1], t[2])):
        per_row = grouped[(bench, name, value)]
        for label in order:
            if label in per_row:
                m = _metrics(per_row[label], k)
                out.append({"benchmark": bench, "tag": name, "value": value, "row": label,
                            "questions": m["questions"], f"avg@{k}": m[f"avg@{k}"],
                            f"pass@{k}": m[f"pass@{k}"]})
    return out


def build_report(results: Sequence[ResultSet]) -> Report:
    """The report of loaded result files (``load_results``). Raises ``BenchError`` for files of
    different k, two files of one (row, benchmark), or one benchmark name with two digests."""
    if not results:
        raise BenchError(f"no result files; {_HOW_TO_FIX}")
    _check_compatible(results)
    k = results[0].k
    benchmarks = list(dict.fromkeys(r.benchmark for r in results))
    first_seen = list(dict.fromkeys(r.row_key for r in results))
    keys = sorted(first_seen, key=lambda key: (_model_rank(key[0]), first_seen.index(key)))
    labels = row_labels(keys)
    rows = [Row(key, labels[key]) for key in keys]
    cells = {(labels[r.row_key], r.benchmark): cell_metrics(r) for r in results}
    overall: dict[str, dict[str, float] | None] = {}
    for row in rows:
        have = [cells.get((row.label, b)) for b in benchmarks]
        overall[row.label] = None if None in have else {
            metric: statistics.fmean(c[metric] for c in have if c is not None)
            for metric in (f"avg@{k}", f"pass@{k}")}
    notes = []
    for b in benchmarks:
        ids = {r.row_key: frozenset(str(q["id"]) for q in r.records)
               for r in results if r.benchmark == b}
        if len(set(ids.values())) > 1:
            counts = ", ".join(f"{labels[key]} {len(v)}" for key, v in
                               sorted(ids.items(), key=lambda kv: keys.index(kv[0])))
            notes.append(f"the rows of {b} were evaluated on different questions ({counts}); "
                         "compare its cells with care")
    order = [row.label for row in rows]
    return Report(k, benchmarks, rows, cells, overall,
                  _tag_breakdown(results, benchmarks, labels, order), notes)


# --- output ----------------------------------------------------------------------------------


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], left: int) -> list[str]:
    """A markdown table whose first ``left`` columns are left-aligned, the rest right-aligned."""
    align = ["---"] * left + ["---:"] * (len(header) - left)
    return ["| " + " | ".join(map(_md, header)) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(map(_md, r)) + " |" for r in rows)]


def _pct(x: float | None) -> str:
    return MISSING if x is None else f"{100 * x:.2f}"


def format_markdown(report: Report) -> str:
    """The report as markdown: the accuracy table (avg@k / pass@k in %, one column per
    benchmark, then Overall), its notes, the decode statistics per (row, benchmark) and, when
    records carry tags, avg@k per tag value. Returns the text, ending with a newline."""
    k = report.k
    avg, pas = f"avg@{k}", f"pass@{k}"
    lines = [f"**{avg} / {pas} (%)**, {k} samples per question", ""]
    body = []
    for row in report.rows:
        cells = [report.cells.get((row.label, b)) for b in report.benchmarks]
        cells.append(report.overall[row.label])
        body.append([row.label, *(MISSING if c is None else f"{_pct(c[avg])} / {_pct(c[pas])}"
                                  for c in cells)])
    lines += _table(["model", *report.benchmarks, "Overall"], body, left=1)
    if report.notes:
        lines += ["", *(f"Note: {n}." for n in report.notes)]

    lines += ["", "**Decode statistics** (per response: real tokens; budget used = mean real "
              "tokens / max_new_tokens; tokens per backbone pass; committed drafts / drafts; "
              "responses that ended with EOS)", ""]
    body = []
    for row in report.rows:
        for b in report.benchmarks:
            c = report.cells.get((row.label, b))
            if c is None:
                continue
            budget = MISSING if c["budget_used"] is None else f"{_pct(c['budget_used'])}%"
            commit = f"{_pct(c['commit_rate'])}%" if c["drafts"] else MISSING
            body.append([row.label, b, str(c["questions"]), f"{c['mean_tokens']:.1f}", budget,
                         f"{c['tokens_per_pass']:.2f}", commit,
                         f"{_pct(c['finished_rate'])}%"])
    lines += _table(["model", "benchmark", "questions", "mean tokens", "budget used",
                     "tokens / pass", "commit rate", "finished"], body, left=2)

    if report.tags:
        labels = [row.label for row in report.rows]
        by_key: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
        for t in report.tags:
            by_key.setdefault((t["benchmark"], t["tag"], t["value"]), {})[t["row"]] = t
        body = [[b, name, value, *(f"{_pct(cell[lab][avg])} ({cell[lab]['questions']})"
                                   if lab in cell else MISSING for lab in labels)]
                for (b, name, value), cell in by_key.items()]
        lines += ["", f"**{avg} (%) by tag** (questions in parentheses)", ""]
        lines += _table(["benchmark", "tag", "value", *labels], body, left=3)
    return "\n".join(lines) + "\n"


def report_json(report: Report) -> dict[str, Any]:
    """The report as a JSON-ready dict, every number unrounded: ``k``, ``benchmarks``,
    ``rows`` (label, model, run, stage, step, overall: mean avg@k and pass@k or None),
    ``cells`` (row, benchmark and ``cell_metrics``), ``tags`` and ``notes``."""
    return {
        "k": report.k,
        "benchmarks": report.benchmarks,
        "rows": [{"label": row.label, "model": row.key[0], "run": row.key[1],
                  "stage": row.key[2], "step": row.key[3], "overall": report.overall[row.label]}
                 for row in report.rows],
        "cells": [{"row": row.label, "benchmark": b, **report.cells[(row.label, b)]}
                  for row in report.rows for b in report.benchmarks
                  if (row.label, b) in report.cells],
        "tags": report.tags,
        "notes": report.notes,
    }


def write_text(text: str, path: str | Path) -> None:
    """Writes ``text`` to ``path`` through a temporary sibling and ``os.replace``, so a reader
    (or an interrupt) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with reporting(path, elsewhere="choose another path"):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the write's error is the one to report
            tmp.unlink(missing_ok=True)
        raise

"""``python -m pipo_jax.bench report``: one table across benchmarks from hand-written result files.

The files hold k = 2 samples per question with numbers chosen to be checked by hand:

- AR (run /runs/r, stage ar, step 10), in ``a/``: aime c = [1, 0] → 25 / 50; longbench
  c = [2, 1] → 75 / 100; Overall 50 / 75. Every sample: 40 tokens, 40 passes, no drafts.
- PIPO step 10 (stage opd), in ``a/``: aime c = [2, 2] → 100 / 100; no longbench → Overall "–".
  Samples: tokens 60, 40, 80, 20 (mean 50 of a budget of 100), 20 passes each (2.5 tokens per
  pass), 10 drafts each with 5, 5, 10, 0 commits (50%), the last one unfinished (75%).
- PIPO step 20, in ``b/``: aime c = [0, 1] → 25 / 50; longbench c = [1, 1] → 50 / 100;
  Overall 37.5 / 75. Every sample: 30 tokens, 20 passes (1.5 per pass), 10 of 10 drafts
  committed.
- longbench questions carry tags: q1 easy/short, q2 hard/short.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from pipo_jax.bench import __main__ as report_cli
from pipo_jax.bench.report import (
    MISSING,
    build_report,
    format_markdown,
    load_results,
    read_result_file,
    row_labels,
)
from pipo_jax.cli import run_main
from pipo_jax.errors import BenchError

K = 2
AR_STATS = {"tokens": 40, "backbone_passes": 40, "drafts": 0, "commits": 0, "finished": True}


def pipo_stats(tokens: int, commits: int, finished: bool = True) -> dict[str, Any]:
    return {"tokens": tokens, "backbone_passes": 20, "drafts": 10, "commits": commits,
            "finished": finished}


def header(benchmark: str, model: str, step: int, samples: int = K,
           stage: str | None = None) -> dict[str, Any]:
    h = {"format": 1, "benchmark": benchmark, "benchmark_sha256": f"sha-{benchmark}",
         "model": model, "run": "/runs/r", "stage": stage or ("ar" if model == "ar" else "opd"),
         "step": step, "samples": samples, "system_prompt": "", "max_new_tokens": 100,
         "temperature": 0.6, "top_k": 20, "top_p": 0.95, "presence_penalty": 0.0, "seed": 0}
    if model == "pipo":
        h["threshold"] = 0.9
    return h


def record(qid: str, correct: list[bool], stats: list[dict[str, Any]],
           tags: dict[str, str] | None = None) -> dict[str, Any]:
    c = sum(correct)
    r = {"id": qid, "answer": "1", "num_correct": c, "accuracy": c / len(correct),
         "any_correct": c > 0, "extra_key": "ignored",
         "samples": [{"seed": i, "text": "t", "extracted": "1", "correct": ok, "stats": s,
                      "elapsed_s": 0.1}
                     for i, (ok, s) in enumerate(zip(correct, stats, strict=True))]}
    if tags is not None:
        r["tags"] = tags
    return r


def write_result(path: Path, head: dict[str, Any], records: list[dict[str, Any]],
                 tail: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"header": head})] + [json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n" + tail)
    return path


EASY = {"difficulty": "easy", "length": "short"}
HARD = {"difficulty": "hard", "length": "short"}


@pytest.fixture
def results(tmp_path: Path) -> dict[str, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    ar = [AR_STATS, AR_STATS]
    p20 = [pipo_stats(30, 10), pipo_stats(30, 10)]
    files = {
        # The unterminated last line (a write cut short) would make aime AR 75 / 100.
        "aime_ar": write_result(a / "aime.ar.jsonl", header("aime", "ar", 10),
                                [record("q1", [True, False], ar),
                                 record("q2", [False, False], ar)],
                                tail=json.dumps(record("q2", [True, True], ar))[:-3]),
        "long_ar": write_result(a / "longbench.ar.jsonl", header("longbench", "ar", 10),
                                [record("q1", [True, True], ar, EASY),
                                 record("q2", [True, False], ar, HARD)]),
        "aime_pipo10": write_result(
            a / "aime.pipo.jsonl", header("aime", "pipo", 10),
            [record("q1", [True, True], [pipo_stats(60, 5), pipo_stats(40, 5)]),
             record("q2", [True, True], [pipo_stats(80, 10), pipo_stats(20, 0, False)])]),
        "aime_pipo20": write_result(b / "aime.pipo.jsonl", header("aime", "pipo", 20),
                                    [record("q1", [False, False], p20),
                                     record("q2", [False, True], p20)]),
        "long_pipo20": write_result(b / "longbench.pipo.jsonl", header("longbench", "pipo", 20),
                                    [record("q1", [True, False], p20, EASY),
                                     record("q2", [False, True], p20, HARD)]),
    }
    # A benchmark file and a summary next to the results: a directory skips them.
    (a / "questions.jsonl").write_text('{"question": "q", "answer": "1", "kind": "boxed"}\n')
    (a / "summary.json").write_text("{}\n")
    files["a"], files["b"], files["questions"] = a, b, a / "questions.jsonl"
    return files


ACCURACY_TABLE = [
    "| model | aime | longbench | Overall |",
    "|---|---:|---:|---:|",
    "| AR | 25.00 / 50.00 | 75.00 / 100.00 | 50.00 / 75.00 |",
    f"| PIPO (opd, step 10) | 100.00 / 100.00 | {MISSING} | {MISSING} |",
    "| PIPO (opd, step 20) | 25.00 / 50.00 | 50.00 / 100.00 | 37.50 / 75.00 |",
]


def test_markdown_tables_from_directories(results, tmp_path, capsys):
    md, js = tmp_path / "out" / "table.md", tmp_path / "out" / "table.json"
    argv = ["report", str(results["a"]), str(results["b"]), "--markdown", str(md),
            "--json", str(js)]
    assert run_main(report_cli.main, argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "**avg@2 / pass@2 (%)**, 2 samples per question"
    assert lines[2:7] == ACCURACY_TABLE
    stats = lines[lines.index("| model | benchmark | questions | mean tokens | budget used | "
                              "tokens / pass | commit rate | finished |"):]
    assert stats[2:7] == [
        "| AR | aime | 2 | 40.0 | 40.00% | 1.00 | – | 100.00% |",
        "| AR | longbench | 2 | 40.0 | 40.00% | 1.00 | – | 100.00% |",
        "| PIPO (opd, step 10) | aime | 2 | 50.0 | 50.00% | 2.50 | 50.00% | 75.00% |",
        "| PIPO (opd, step 20) | aime | 2 | 30.0 | 30.00% | 1.50 | 100.00% | 100.00% |",
        "| PIPO (opd, step 20) | longbench | 2 | 30.0 | 30.00% | 1.50 | 100.00% | 100.00% |",
    ]
    assert "**avg@2 (%) by tag** (questions in parentheses)" in lines
    tags = lines[lines.index("| benchmark | tag | value | AR | PIPO (opd, step 10) | "
                             "PIPO (opd, step 20) |"):]
    assert tags[2:] == [
        "| longbench | difficulty | easy | 100.00 (1) | – | 50.00 (1) |",
        "| longbench | difficulty | hard | 50.00 (1) | – | 50.00 (1) |",
        "| longbench | length | short | 75.00 (2) | – | 50.00 (2) |",
    ]
    assert "Note:" not in out  # every row of a benchmark has the same questions
    assert md.read_text() == out
    assert sorted(p.name for p in md.parent.iterdir()) == ["table.json", "table.md"]

    data = json.loads(js.read_text())
    assert data["k"] == 2 and data["benchmarks"] == ["aime", "longbench"]
    assert [(r["label"], r["model"], r["stage"], r["step"]) for r in data["rows"]] == [
        ("AR", "ar", "ar", 10), ("PIPO (opd, step 10)", "pipo", "opd", 10),
        ("PIPO (opd, step 20)", "pipo", "opd", 20)]
    assert [r["overall"] for r in data["rows"]] == [
        {"avg@2": 0.5, "pass@2": 0.75}, None, {"avg@2": 0.375, "pass@2": 0.75}]
    cells = {(c["row"], c["benchmark"]): c for c in data["cells"]}
    assert set(cells) == {("AR", "aime"), ("AR", "longbench"), ("PIPO (opd, step 10)", "aime"),
                          ("PIPO (opd, step 20)", "aime"), ("PIPO (opd, step 20)", "longbench")}
    assert cells[("PIPO (opd, step 10)", "aime")] == {
        "row": "PIPO (opd, step 10)", "benchmark": "aime", "file": str(results["aime_pipo10"]),
        "questions": 2, "avg@2": 1.0, "pass@2": 1.0,
        "mean_tokens": 50.0, "commit_rate": 0.5, "tokens_per_pass": 2.5, "finished_rate": 0.75,
        "drafts": 40, "max_new_tokens": 100, "budget_used": 0.5}
    assert cells[("AR", "aime")]["avg@2"] == 0.25 and cells[("AR", "aime")]["pass@2"] == 0.5
    assert {(t["tag"], t["value"], t["row"]): (t["questions"], t["avg@2"], t["pass@2"])
            for t in data["tags"]} == {
        ("difficulty", "easy", "AR"): (1, 1.0, 1.0),
        ("difficulty", "hard", "AR"): (1, 0.5, 1.0),
        ("length", "short", "AR"): (2, 0.75, 1.0),
        ("difficulty", "easy", "PIPO (opd, step 20)"): (1, 0.5, 1.0),
        ("difficulty", "hard", "PIPO (opd, step 20)"): (1, 0.5, 1.0),
        ("length", "short", "PIPO (opd, step 20)"): (2, 0.5, 1.0)}
    assert all(t["benchmark"] == "longbench" for t in data["tags"]) and data["notes"] == []


def test_files_given_one_by_one_set_the_column_order(results, capsys):
    argv = ["report", str(results["long_pipo20"]), str(results["aime_ar"])]
    assert run_main(report_cli.main, argv) == 0
    lines = capsys.readouterr().out.splitlines()
    # One PIPO row now: no stage or step in its label; AR comes first whatever the order given.
    assert lines[2:6] == ["| model | longbench | aime | Overall |", "|---|---:|---:|---:|",
                          f"| AR | {MISSING} | 25.00 / 50.00 | {MISSING} |",
                          f"| PIPO | 50.00 / 100.00 | {MISSING} | {MISSING} |"]
    assert lines[-5:] == ["| benchmark | tag | value | AR | PIPO |", "|---|---|---|---:|---:|",
                          f"| longbench | difficulty | easy | {MISSING} | 50.00 (1) |",
                          f"| longbench | difficulty | hard | {MISSING} | 50.00 (1) |",
                          f"| longbench | length | short | {MISSING} | 50.00 (2) |"]


def test_truncated_last_line_is_ignored(results):
    r = read_result_file(results["aime_ar"])
    assert r is not None and [q["num_correct"] for q in r.records] == [1, 0]
    assert read_result_file(results["questions"], required=False) is None


def test_rows_on_different_questions_get_a_note(results, tmp_path):
    shutil.copy(results["aime_ar"], tmp_path / "aime.ar.jsonl")
    short = write_result(tmp_path / "aime.pipo.jsonl", header("aime", "pipo", 10),
                         [record("q1", [True, True], [AR_STATS, AR_STATS])])
    text = format_markdown(build_report(load_results([tmp_path / "aime.ar.jsonl", short])))
    assert ("Note: the rows of aime were evaluated on different questions (AR 2, PIPO 1); "
            "compare its cells with care.") in text.splitlines()


def test_labels_add_only_the_detail_that_tells_rows_apart():
    ar = ("ar", "/runs/r", "ar", 10)
    spec = ("spec", "/runs/r", "mtp", 10)
    assert row_labels([ar, spec]) == {ar: "AR", spec: "SPEC"}
    a, b = ("pipo", "/x/run1", "opd", 40), ("pipo", "/x/run2", "opd", 40)
    assert row_labels([a, b, ar]) == {a: "PIPO (run1, opd, step 40)",
                                      b: "PIPO (run2, opd, step 40)", ar: "AR"}
    c, d = ("pipo", "/x/default", "opd", 40), ("pipo", "/y/default", "opd", 40)
    assert row_labels([c, d]) == {c: "PIPO (/x/default, opd, step 40)",
                                  d: "PIPO (/y/default, opd, step 40)"}
    e, f = ("pipo", "/runs/r", "opd", 40), ("pipo", "/runs/r", "sft", 40)
    assert row_labels([e, f]) == {e: "PIPO (opd, step 40)", f: "PIPO (sft, step 40)"}


def test_rows_are_ordered_ar_spec_pipo(tmp_path):
    files = [write_result(tmp_path / f"aime.{m}.jsonl", header("aime", m, 1),
                          [record("q1", [True, False], [AR_STATS, AR_STATS])])
             for m in ("pipo", "spec", "ar")]
    report = build_report(load_results(files))
    assert [row.label for row in report.rows] == ["AR", "SPEC", "PIPO"]


def _bad_inputs(results: dict[str, Path], tmp: Path) -> dict[str, tuple[list[str], str]]:
    k3 = write_result(tmp / "k3" / "aime.ar.jsonl", header("gpqa", "ar", 10, samples=3),
                      [record("q1", [True] * 3, [AR_STATS] * 3)])
    dup = tmp / "dup" / "aime.ar.copy.jsonl"
    dup.parent.mkdir()
    shutil.copy(results["aime_ar"], dup)
    (tmp / "empty").mkdir()
    other_sha = header("aime", "pipo", 30)
    other_sha["benchmark_sha256"] = "sha-other-file"
    sha = write_result(tmp / "sha" / "aime.pipo.jsonl", other_sha,
                       [record("q1", [True, True], [AR_STATS, AR_STATS])])
    corrupt = write_result(tmp / "corrupt" / "aime.ar.jsonl", header("aime", "ar", 1),
                           [record("q1", [True, True], [AR_STATS, AR_STATS])], tail="{oops\n")
    no_records = write_result(tmp / "none" / "aime.ar.jsonl", header("aime", "ar", 1), [])
    wrong_k = write_result(tmp / "wrongk" / "aime.ar.jsonl", header("aime", "ar", 1),
                           [record("q1", [True], [AR_STATS])])
    a = str(results["a"])
    return {
        "not a result file": ([str(results["questions"])],
                              re.escape(str(results["questions"])) + r": not a result file"),
        "mixed k": ([a, str(k3)], re.escape(str(results["aime_ar"])) + r" has 2 samples per "
                    r"question but " + re.escape(str(k3)) + r" has 3; .*--samples 2"),
        "duplicate": ([a, str(dup)], re.escape(str(results["aime_ar"])) + " and "
                      + re.escape(str(dup)) + r" both hold ar results .* on benchmark 'aime'"),
        "no results": ([str(tmp / "empty")], r"no result files in .*empty; pass the result "
                       r"files written by decode\.py --bench"),
        "missing path": ([str(tmp / "nope.jsonl")], r"nope\.jsonl: no such file or directory"),
        "two benchmark versions": ([a, str(sha)], r"were evaluated on different files named "
                                   r"'aime'"),
        "corrupt line": ([str(corrupt)], r"aime\.ar\.jsonl:3: corrupt result line"),
        "no records": ([str(no_records)], r"no finished question yet"),
        "samples unlike k": ([str(wrong_k)], r":2: question 'q1': expected 2 samples"),
    }


@pytest.mark.parametrize("case", ["not a result file", "mixed k", "duplicate", "no results",
                                  "missing path", "two benchmark versions", "corrupt line",
                                  "no records", "samples unlike k"])
def test_bad_input_is_one_line_error(results, tmp_path, capsys, case):
    paths, message = _bad_inputs(results, tmp_path / "bad")[case]
    out = tmp_path / "never.json"
    assert run_main(report_cli.main, ["report", *paths, "--json", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and re.match(r"error: .*" + message, err), err
    assert captured.out == "" and not out.exists()


def test_the_same_file_twice_is_read_once(results):
    report = build_report(load_results([results["a"], results["aime_ar"]]))
    assert len(report.cells) == 3


def test_build_report_of_nothing_is_an_error():
    with pytest.raises(BenchError, match="no result files"):
        build_report([])


def test_report_needs_no_jax(results):
    code = ("import sys; import pipo_jax.bench.report, pipo_jax.bench.__main__; "
            "assert 'jax' not in sys.modules, 'jax imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)

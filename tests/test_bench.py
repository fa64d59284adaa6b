"""Benchmark-file evaluation (pipo_jax/bench, decode.py --bench).

Scoring, schema, converters, metrics and result files are tested on hand-written inputs. The
integration tests decode with a micro run of random parameters saved as step-0 checkpoints
(accuracy is ~0; they check the mechanics: resume, refusal of changed options, truncated lines,
the command line). All decoding uses one set of shapes and sampling options, so the decode
functions compile once for the module.
"""

from __future__ import annotations

import csv
import json
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import random_params

import decode
from pipo_jax.cli import run_main
from pipo_jax.config import ConfigError, load_config, save_config
from pipo_jax.data.loader import test_examples
from pipo_jax.decode.runner import Generation, PipoRunner, load
from pipo_jax.eval import __main__ as bench_cli
from pipo_jax.eval import harness
from pipo_jax.eval.aggregate import pass_at_k
from pipo_jax.eval.harness import evaluate_benchmarks, question_record, summarise
from pipo_jax.eval.protocol import PRESETS, resolve_options, sample_seed
from pipo_jax.eval.schema import (
    BenchError,
    Question,
    load_benchmark,
    load_benchmarks,
    to_messages,
    user_prompt,
)
from pipo_jax.eval.scoring import (
    MAX_ANSWER_CHARS,
    extract_boxed_answer,
    extract_choice,
    last_boxed,
    math_equal,
)
from pipo_jax.eval.scoring import score as score_text
from pipo_jax.eval.sources import aime25_questions, gpqa_questions, write_jsonl
from pipo_jax.eval.store import ResultFile
from pipo_jax.io import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]


def write_lines(path: Path, objs: list) -> Path:
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


# --------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\sqrt{\frac{a}{b}}} end", r"\sqrt{\frac{a}{b}}"),
    (r"first \boxed{1}, then \boxed{2}", "2"),
    (r"\fbox{7}", "7"),
    (r"the answer is \boxed 5.", "5."),
    (r"$\boxed {9}$", "9"),
    (r"\boxed{1} and a cut-off \boxed{12", None),
    (r"\boxed{3} then a bare \boxed", "3"),
    ("no box at all", None),
    (r"\boxedx{3}", None),
])
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_boxed_answer_after_think_is_preferred():
    assert extract_boxed_answer(r"draft \boxed{3}</think> final \boxed{4}") == "4"
    # no box after </think>: the reasoning's last box is still the answer
    assert extract_boxed_answer(r"draft \boxed{3}</think> so that is it") == "3"
    assert extract_boxed_answer(r"\boxed{1}</think>a</think>\boxed{2}") == "2"


@pytest.mark.parametrize("text, expected", [
    (r"\boxed{C}", "C"),
    (r"\boxed{(B)}", "B"),
    (r"\boxed{\text{D}}", "D"),
    (r"\boxed{A) the first}", "A"),
    ("Answer: C", "C"),
    ("so the answer is (B).", "B"),
    ("The answer is **C**", "C"),
    ("thinking (A)...</think>\nAnswer: D", "D"),
    ("blah blah\n(D)", "D"),
    ("blah blah\nA", "A"),
    (r"\boxed{42} Answer: B", "B"),  # a box without a letter falls back to the patterns
    ("Answer: E", None),  # E is not one of 4 options
    ("The answer: I think B is wrong", None),
    ("no letter here", None),
])
def test_extract_choice(text, expected):
    assert extract_choice(text, 4) == expected


# ---------------------------------------------------------------------- math (math-verify)

# The old hand-written normaliser's cases: math-verify must pass every one of them.
OLD_NORMALISER_EQUAL = [
    (r"$\dfrac{1}{2}$", "0.5"), (r"\frac12", "1/2"), (r"\tfrac{3}{4}", "0.75"),
    ("007", "7"), ("+7", "7"), (r"90^\circ", "90"), (r"90^{\circ}", "90"),
    (r"\text{(C)}", "(C)"), ("x = 5", "5"), ("1,000", "1000"), ("1{,}000", "1000"),
    (r"\left(1, 2\right)", "(1,2)"), ("5.", "5"), (r"-\frac{3}{4}", "-0.75"),
    (r"\frac{-3}{4}", "-0.75"), ("3.0", "3"), (r"\!10", "10"), (r"\sqrt2", r"\sqrt{2}"),
    ("0.1", "1/10"), (r"\frac{1}{3}", "0.3333333333333333"), (r"\mathrm{70}", "70"),
]
# Equivalent forms the old normaliser could not see (it called them out of scope).
EQUIVALENT_FORMS = [
    (r"2\sqrt{2}", r"\sqrt{8}"), (r"5\text{ cm}", "5"), (r"10\text{ dollars}", "10"),
    (r"50\%", "0.5"), (r"\dfrac{3}{6}", r"\frac{1}{2}"), ("1/2", r"\frac{2}{4}"),
    ("12,345,678", "12345678"), ("[1,2)", "[1, 2)"), (r"(-\infty, 3]", r"(-\infty,3]"),
    (r"\{1,2\}", r"\{2,1\}"), ("x+1", "1+x"), (r"\text{B}", "B"),
]


@pytest.mark.parametrize("a, b", OLD_NORMALISER_EQUAL + EQUIVALENT_FORMS)
def test_math_equal(a, b):
    assert math_equal(a, b) and math_equal(b, a)


@pytest.mark.parametrize("a, b", [
    ("1/0", "0"), ("0.333", r"\frac{1}{3}"), ("70", "700"), ("x=5", "x=6"), ("(1,2)", "(2,1)"),
    ("[1,2]", "(1,2)"), (r"\frac{1}{2}", "2"), ("", "0"), ("5", ""),
    (r"[0, 1]", r"(0, 1)"), (r"\sqrt{2}", "1.41"),
])
def test_math_not_equal(a, b):
    assert not math_equal(a, b)


def test_math_pathological_answer_times_out():
    """A power tower sympy would evaluate for ever: refused within the timeout."""
    t = time.monotonic()
    assert not math_equal("9^{9^{9^{9}}}", "1", timeout_s=1)
    assert time.monotonic() - t < 10
    assert not math_equal("1" * (MAX_ANSWER_CHARS + 1), "1" * MAX_ANSWER_CHARS)


def test_score_kinds():
    assert score_text(r"</think>\boxed{\dfrac{1}{2}}", "boxed", "0.5") == (r"\dfrac{1}{2}", True)
    assert score_text("no answer", "boxed", "1") == (None, False)
    assert score_text(r"\boxed{b}", "choice", "B", 4) == (None, False)  # letters are uppercase
    assert score_text("Answer: (B)", "choice", "B", 4) == ("B", True)
    with pytest.raises(ValueError, match="kind"):
        score_text("x", "free", "x")


# ------------------------------------------------------------------------------- schema


def test_schema_reads_defaults_choices_and_system(tmp_path):
    path = write_lines(tmp_path / "mix.jsonl", [
        {"question": "What is 1 + 1?", "answer": 2, "kind": "boxed"},
        "",
        {"id": 7, "question": "Pick.", "choices": ["x", "y", "z"], "answer": "c",
         "kind": "choice", "system": "Be brief."},
        {"id": "q3", "question": "Options are in the text: A) 1 B) 2", "answer": "B",
         "kind": "choice"},
    ])
    bench = load_benchmark(path)
    assert bench.name == "mix" and len(bench.sha256) == 64
    q1, q2, q3 = bench.questions
    assert (q1.id, q1.answer, q1.line, q1.choices) == ("1", "2", 1, None)
    assert (q2.id, q2.answer, q2.line, q2.num_choices, q2.system) == ("7", "C", 3, 3, "Be brief.")
    assert user_prompt(q1) == ("What is 1 + 1?\nPlease reason step by step, and put your final "
                               "answer within \\boxed{}.")
    assert user_prompt(q2) == ("Pick.\n\nA) x\nB) y\nC) z\n\nPlease reason step by step, and put "
                               "the letter of the correct option (A, B or C) within \\boxed{}.")
    assert "(A, B, C, D, E, F, G, H, I, J, K, L, M, N, O, P, Q, R, S, T, U, V, W, X, Y or Z)" \
        in user_prompt(q3)
    assert to_messages(q2)[0] == {"role": "system", "content": "Be brief."}
    assert [m["role"] for m in to_messages(q1)] == ["user"]  # the runner adds its default


def test_instruction_overrides_the_default(tmp_path):
    path = write_lines(tmp_path / "instr.jsonl", [
        {"question": "What is 1 + 1?", "answer": 2, "kind": "boxed", "instruction": ""},
        {"question": "Pick.", "choices": ["x", "y"], "answer": "A", "kind": "choice",
         "instruction": "Answer with one letter."}])
    q1, q2 = load_benchmark(path).questions
    assert user_prompt(q1) == "What is 1 + 1?"
    assert user_prompt(q2) == "Pick.\n\nA) x\nB) y\n\nAnswer with one letter."
    bad = write_lines(tmp_path / "bad.jsonl", [
        {"question": "q", "answer": 1, "kind": "boxed", "instruction": 3}])
    with pytest.raises(BenchError, match=r"bad.jsonl:1: instruction must be a string"):
        load_benchmark(bad)


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "answer": "1", "kind": "boxed"', r"not valid JSON"),
    ('["question"]', r"expected a JSON object, got list"),
    ('{"question": "q", "kind": "boxed"}', r"missing field\(s\) \['answer'\]"),
    ('{"question": "q", "answer": "1", "kind": "boxed", "anwser": 1}',
     r"unknown field\(s\) \['anwser'\]"),
    ('{"question": "q", "answer": "1", "kind": "free"}', r"kind must be one of"),
    ('{"question": "", "answer": "1", "kind": "boxed"}', r"question must be a non-empty"),
    ('{"question": "q", "answer": "E", "kind": "choice", "choices": ["a", "b", "c", "d"]}',
     r"letter in A\.\.D, got 'E'"),
    ('{"question": "q", "answer": "AB", "kind": "choice"}', r"letter in A\.\.Z"),
    ('{"question": "q", "answer": "1", "kind": "boxed", "choices": ["a", "b"]}',
     r"do not apply to kind 'boxed'"),
    ('{"question": "q", "answer": "A", "kind": "choice", "choices": ["a"]}',
     r"2 to 26 strings"),
    ('{"id": "1", "question": "q", "answer": "1", "kind": "boxed"}',
     r"duplicate id '1' \(first on line 1\)"),
])
def test_schema_errors_name_file_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "b.jsonl",
                       [{"id": "1", "question": "q", "answer": "1", "kind": "boxed"}, "", line])
    with pytest.raises(BenchError, match=re.escape(f"{path}:3: ") + ".*" + message):
        load_benchmark(path)


def test_schema_file_errors(tmp_path):
    assert issubclass(BenchError, ConfigError)  # so the command line prints one line, exit 2
    with pytest.raises(BenchError, match="no such benchmark file"):
        load_benchmark(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(BenchError, match="no questions"):
        load_benchmark(tmp_path / "empty.jsonl")
    q = {"question": "q", "answer": "1", "kind": "boxed"}
    (tmp_path / "a").mkdir()
    a, b = write_lines(tmp_path / "a" / "x.jsonl", [q]), write_lines(tmp_path / "x.jsonl", [q])
    with pytest.raises(BenchError, match="same name 'x'"):
        load_benchmarks([a, b])


# ----------------------------------------------------------------------------- protocol


def test_resolve_options_preset_and_overrides():
    samples, opts = resolve_options("paper", {"samples": None, "temperature": 0.6,
                                              "max_new_tokens": 64, "seed": None})
    assert samples == 4
    assert opts == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "presence_penalty": 1.5,
                    "threshold": 0.95, "max_new_tokens": 64}
    assert PRESETS["paper"]["temperature"] == 1.0  # the preset itself is untouched
    assert resolve_options(None, {"samples": None, "top_k": None}) == (1, {})
    with pytest.raises(ConfigError, match="samples must be >= 1"):
        resolve_options("paper", {"samples": 0})
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_options("fast", {})


def test_sample_seed_is_stable_and_distinct():
    seeds = {sample_seed(0, qid, s) for qid in ("1", "2", "aime-3") for s in range(4)}
    assert len(seeds) == 12 and all(0 <= s < 2**31 for s in seeds)
    assert sample_seed(0, "1", 0) == sample_seed(0, "1", 0) != sample_seed(1, "1", 0)
    assert sample_seed(0, "1", 0) == 786494190  # fixed across processes (no salted hash())


# ------------------------------------------------------------------------------ metrics


def gen(text: str, tokens: int = 10, passes: int = 6, drafts: int = 5, commits: int = 4,
        finished: bool = True) -> Generation:
    return Generation(text, [], {"tokens": tokens, "backbone_passes": passes, "drafts": drafts,
                                 "commits": commits, "finished": finished})


def test_question_record_scores_each_sample():
    q = Question("q1", "What is half?", r"\frac{1}{2}", "boxed", None, None, "f.jsonl", 1)
    rec = question_record(q, [gen(r"</think>\boxed{0.5}"), gen("I give up"),
                              gen(r"\boxed{1/2}")], [11, 12, 13])
    assert rec["id"] == "q1" and rec["answer"] == r"\frac{1}{2}"
    assert [s["correct"] for s in rec["samples"]] == [True, False, True]
    assert [s["extracted"] for s in rec["samples"]] == ["0.5", None, "1/2"]
    assert [s["seed"] for s in rec["samples"]] == [11, 12, 13]
    assert rec["num_correct"] == 2 and rec["accuracy"] == pytest.approx(2 / 3)
    assert rec["any_correct"] is True


def record(num_correct: int, k: int, stats: dict, extracted: str | None = "1") -> dict:
    samples = [{"correct": i < num_correct, "extracted": extracted, "stats": stats}
               for i in range(k)]
    return {"id": "x", "num_correct": num_correct, "samples": samples}


def test_summarise_hand_computed():
    s1 = {"tokens": 10, "backbone_passes": 6, "drafts": 5, "commits": 4, "finished": True}
    s2 = {"tokens": 20, "backbone_passes": 20, "drafts": 0, "commits": 0, "finished": False}
    records = [record(0, 2, s1), record(1, 2, s2, None), record(2, 2, s1)]
    m = summarise(records, 2)
    assert m["num_questions"] == 3
    assert m["avg@2"] == pytest.approx((0 + 0.5 + 1) / 3)
    assert m["pass@2"] == pytest.approx(2 / 3)  # empirical: 2 of 3 questions have a hit
    assert m["mean_tokens"] == pytest.approx((4 * 10 + 2 * 20) / 6)
    assert m["tokens_per_pass"] == pytest.approx(80 / (4 * 6 + 2 * 20))
    assert m["commit_rate"] == pytest.approx(16 / 20)
    assert m["finished_rate"] == pytest.approx(4 / 6)
    assert m["answered_rate"] == pytest.approx(4 / 6)


def test_unbiased_pass_at_k_equals_empirical_when_n_is_k():
    for k in (1, 2, 4):
        for c in range(k + 1):
            assert pass_at_k(k, c, k) == float(c > 0)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)


# ------------------------------------------------------------------------- result files


def test_result_file_resume_truncation_and_refusals(tmp_path):
    path = tmp_path / "b.pipo.jsonl"
    header = {"benchmark": "b", "temperature": 1.0, "step": None}
    with ResultFile(path, header) as f:
        assert f.done == {}
        f.append([{"id": "1", "v": 1}, {"id": "2", "v": 2}])
    complete = path.read_bytes()
    with path.open("ab") as fh:
        fh.write(b'{"id": "3", "v"')  # a crash in the middle of a write
    with ResultFile(path, header) as f:
        assert f.discarded_partial_line and set(f.done) == {"1", "2"}
        assert path.read_bytes() == complete  # cut before anything is appended
        f.append([{"id": "3", "v": 3}])
    assert path.read_bytes() == complete + b'{"id": "3", "v": 3}\n'
    with pytest.raises(BenchError, match=r"different options \(temperature: 1\.0 -> 0\.5\).*"
                                         r"--restart"):
        ResultFile(path, {**header, "temperature": 0.5})
    with ResultFile(path, {**header, "temperature": 0.5}, restart=True) as f:
        assert f.done == {}
    assert len(path.read_text().splitlines()) == 1  # the header only
    path.write_text(path.read_text() + "not json\n" + '{"id": "9"}\n')
    with pytest.raises(BenchError, match=re.escape(f"{path}:2: corrupt result line")):
        ResultFile(path, {**header, "temperature": 0.5})
    path.write_text('{"head')  # the header itself cut short: start over
    with ResultFile(path, header) as f:
        assert f.done == {}
    assert json.loads(path.read_text())["header"]["benchmark"] == "b"


# --------------------------------------------------------------------------- converters


def test_convert_aime25(tmp_path):
    src = write_lines(tmp_path / "aime.jsonl", [
        {"id": 0, "problem": "Find x.", "answer": "70", "solution": "..."},
        {"id": 1, "problem": "Find y.", "answer": 588},
    ])
    out = tmp_path / "out" / "aime25.jsonl"
    assert write_jsonl(aime25_questions(src), out) == 2
    q0, q1 = load_benchmark(out).questions
    assert (q0.id, q0.question, q0.answer, q0.kind) == ("0", "Find x.", "70", "boxed")
    assert (q1.id, q1.answer) == ("1", "588")
    write_lines(src, [{"problem": "a", "answer": "1"}, {"problem": "b"}])
    with pytest.raises(BenchError, match=re.escape(f"{src}:2: missing field 'answer'")):
        aime25_questions(src)
    write_lines(src, [{"id": 3, "problem": "a", "answer": "1"},
                      {"id": 3, "problem": "b", "answer": "2"}])
    with pytest.raises(BenchError, match=re.escape(f"{src}:2: duplicate id '3'")):
        aime25_questions(src)


GPQA_COLUMNS = ["Record ID", "Question", "Correct Answer", "Incorrect Answer 1",
                "Incorrect Answer 2", "Incorrect Answer 3", "Subdomain"]


def write_gpqa(path: Path, rows: list[list[str]], columns: list[str] = GPQA_COLUMNS) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)
    return path


def test_convert_gpqa_shuffles_deterministically(tmp_path):
    rows = [[f"rec{i}", f"Question {i}?\nWith a second line.", f"right {i} ", f"wrong {i}a",
             f"wrong {i}b", f"wrong {i}c", "Physics"] for i in range(6)]
    src = write_gpqa(tmp_path / "gpqa.csv", rows)
    a, b, c = gpqa_questions(src, 0), gpqa_questions(src, 0), gpqa_questions(src, 1)
    assert a == b and a != c
    for i, q in enumerate(a):
        assert q["id"] == f"rec{i}" and q["kind"] == "choice"
        assert q["choices"][ord(q["answer"]) - ord("A")] == f"right {i}"  # stripped
        assert sorted(q["choices"]) == sorted([f"right {i}", f"wrong {i}a", f"wrong {i}b",
                                               f"wrong {i}c"])
    assert len({q["answer"] for q in a}) > 1  # the correct option does not stay in place
    # a row's order depends only on the seed and its id, not on the rows around it
    assert gpqa_questions(write_gpqa(tmp_path / "one.csv", rows[3:4]), 0)[0] == a[3]
    assert write_jsonl(a, tmp_path / "gpqa.jsonl") == 6
    assert load_benchmark(tmp_path / "gpqa.jsonl").questions[0].num_choices == 4


def test_convert_gpqa_errors(tmp_path):
    bad = write_gpqa(tmp_path / "bad.csv", [["q", "r"]], ["Question", "Correct Answer"])
    with pytest.raises(BenchError, match=r"bad\.csv:1: missing column\(s\) \['Incorrect Answer 1'"):
        gpqa_questions(bad, 0)
    empty_option = write_gpqa(tmp_path / "e.csv", [["r1", "q", "a", "b", "c", "d", "x"],
                                                    ["r2", "q", "a", " ", "c", "d", "x"]])
    with pytest.raises(BenchError, match=r"e\.csv:3: Incorrect Answer 1 must be a non-empty"):
        gpqa_questions(empty_option, 0)


def test_convert_command_line(tmp_path, capsys):
    src = write_gpqa(tmp_path / "g.csv", [["r1", "q?", "a", "b", "c", "d", "x"]])
    out = tmp_path / "g.jsonl"
    assert run_main(bench_cli.main, ["convert", "gpqa", "--in", str(src), "--out", str(out),
                                     "--seed", "3"]) == 0
    assert f"wrote 1 questions to {out}" in capsys.readouterr().out
    assert run_main(bench_cli.main, ["convert", "aime25", "--in", str(tmp_path / "no.jsonl"),
                                     "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().endswith("no.jsonl: no such input file")


def test_convert_test_split(tmp_path, capsys):
    """The embedded task's held-out problems of a run, as boxed questions."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(REPO / "configs" / "micro.yaml", [
        f"run_dir={run}", f"data.data_dir={tmp_path / 'tfds'}", "data.num_train=4",
        "data.num_test=6"])
    save_config(cfg, run / "config.json")
    out = tmp_path / "split.jsonl"
    assert run_main(bench_cli.main, ["convert", "test-split", "--run", str(run), "--out",
                                     str(out), "--num", "5"]) == 0
    assert f"wrote 5 questions to {out}" in capsys.readouterr().out
    questions = load_benchmarks([out])[0].questions
    expected = test_examples(cfg, 5)
    assert [(q.id, q.question, q.answer, q.kind) for q in questions] == [
        (f"arith-{i}", ex["question"], ex["answer"], "boxed") for i, ex in enumerate(expected)]
    # Posed as the task's model was trained: the bare question, no eval instruction.
    assert user_prompt(questions[0]) == expected[0]["question"]
    assert run_main(bench_cli.main, ["convert", "test-split", "--run", str(run), "--out",
                                     str(out), "--num", "7"]) == 2
    assert "test split has 6" in capsys.readouterr().err
    assert run_main(bench_cli.main, ["convert", "test-split", "--in", str(out), "--out",
                                     str(out)]) == 2
    assert "takes --run" in capsys.readouterr().err


# ------------------------------------------------------------- integration (random run)

# One set of decode options for every integration test: the decode functions compile once.
OPTIONS = {"temperature": 1.0, "top_p": 0.95, "top_k": 20, "presence_penalty": 1.5,
           "threshold": 0.95, "max_new_tokens": 16, "batch_size": 2}
SAMPLES = 2  # with batch_size 2: one question per chunk, so resumed chunks line up exactly
CLI_FLAGS = ["--preset", "paper", "--samples", "2", "--max-new-tokens", "16", "--batch-size",
             "2", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, compilation_cache_dir: Path) -> Path:
    """A micro run (configs/micro.yaml) of random parameters: step-0 ``ar`` and ``sft``
    checkpoints holding parameters only, as ``convert.hf_to_pipo`` writes them."""
    run = tmp_path_factory.mktemp("bench") / "run"
    cfg = load_config(REPO / "configs" / "micro.yaml", [f"run_dir={run}"])
    params = random_params(cfg.model, True, seed=0)
    ar = {"embedder": params["embedder"], "backbone": params["backbone"]}
    for stage, tree in (("ar", ar), ("sft", params)):
        with ckpt.open_manager(run / stage, keep=1) as m:
            ckpt.save(m, 0, {"step": np.int32(0), "params": tree}, cfg, stage, wait=True)
    return run


@pytest.fixture(scope="module")
def runner(run_dir: Path) -> PipoRunner:
    return load(run_dir)


@pytest.fixture(scope="module")
def math_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Prompts of similar length: all fall in one 128-token prompt bucket (one compile).
    return write_lines(tmp_path_factory.mktemp("files") / "arith.jsonl", [
        {"question": f"What is {a} + {b}?", "answer": str(a + b), "kind": "boxed"}
        for a, b in ((12, 34), (50, 17), (81, 9))])


@pytest.fixture(scope="module")
def uninterrupted(runner: PipoRunner, run_dir: Path, math_file: Path,
                  tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: 3 questions x 2 samples, both models, in one go."""
    out = tmp_path_factory.mktemp("full")
    evaluate_benchmarks(runner, load_benchmarks([math_file]), samples=SAMPLES, options=OPTIONS,
                        out_dir=out, run_dir=run_dir, progress=False)
    return out


def result_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.jsonl"))}


def test_uninterrupted_results(uninterrupted, run_dir):
    files = result_files(uninterrupted)
    assert set(files) == {"arith.pipo.jsonl", "arith.ar.jsonl"}
    lines = files["arith.pipo.jsonl"].decode().splitlines()
    header = json.loads(lines[0])["header"]
    assert header["run"] == str(run_dir.resolve()) and header["step"] == 0
    assert header["samples"] == 2 and header["threshold"] == 0.95 and header["top_k"] == 20
    assert "threshold" not in json.loads(files["arith.ar.jsonl"].splitlines()[0])["header"]
    records = [json.loads(line) for line in lines[1:]]
    assert [r["id"] for r in records] == ["1", "2", "3"]
    for r in records:
        assert len(r["samples"]) == 2
        assert all(0 < s["stats"]["tokens"] <= 16 for s in r["samples"])
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["benchmarks"]["arith"]["models"]["pipo"]["num_questions"] == 3
    assert set(summary["overall"]["ar"]) == {"avg@2", "pass@2"}


def test_resume_after_max_questions_equals_uninterrupted(runner, run_dir, math_file,
                                                         uninterrupted, tmp_path):
    benches = load_benchmarks([math_file])
    first = evaluate_benchmarks(runner, benches, samples=SAMPLES, options=OPTIONS,
                                out_dir=tmp_path, run_dir=run_dir, max_questions=1,
                                progress=False)
    assert first["benchmarks"]["arith"]["num_questions"] == 1
    assert len((tmp_path / "arith.pipo.jsonl").read_text().splitlines()) == 2
    evaluate_benchmarks(runner, benches, samples=SAMPLES, options=OPTIONS, out_dir=tmp_path,
                        run_dir=run_dir, progress=False)
    assert result_files(tmp_path) == result_files(uninterrupted)


class CrashingRunner:
    """The runner, but ``generate`` raises KeyboardInterrupt once ``questions`` questions'
    samples have finished (mid-decode: other requests are still in their slots)."""

    def __init__(self, runner: PipoRunner, questions: int) -> None:
        self.runner, self.left = runner, questions * SAMPLES

    def generate(self, *args, on_done=None, **kwargs):
        def crash_after(i, gen):
            if self.left == 0:
                raise KeyboardInterrupt
            self.left -= 1
            on_done(i, gen)

        return self.runner.generate(*args, on_done=crash_after, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self.runner, name)


def test_resume_after_crash_and_truncated_line(runner, run_dir, math_file, uninterrupted,
                                               tmp_path):
    benches = load_benchmarks([math_file])
    with pytest.raises(KeyboardInterrupt):
        evaluate_benchmarks(CrashingRunner(runner, 2), benches, samples=SAMPLES,
                            options=OPTIONS, out_dir=tmp_path, run_dir=run_dir, progress=False)
    pipo = tmp_path / "arith.pipo.jsonl"
    assert len(pipo.read_text().splitlines()) == 3  # header + the two finished questions
    with pipo.open("a") as f:  # and the third one cut off in the middle of its line
        f.write(uninterrupted.joinpath("arith.pipo.jsonl").read_text().splitlines()[3][:80])
    evaluate_benchmarks(runner, benches, samples=SAMPLES, options=OPTIONS, out_dir=tmp_path,
                        run_dir=run_dir, progress=False)
    assert result_files(tmp_path) == result_files(uninterrupted)


def test_changed_options_are_refused(runner, run_dir, math_file, uninterrupted):
    before = result_files(uninterrupted)
    with pytest.raises(BenchError, match=r"different options \(temperature: 1\.0 -> 0\.5\)"):
        evaluate_benchmarks(runner, load_benchmarks([math_file]), samples=SAMPLES,
                            options={**OPTIONS, "temperature": 0.5}, out_dir=uninterrupted,
                            run_dir=run_dir, progress=False)
    with pytest.raises(BenchError, match=r"samples: 2 -> 3"):
        evaluate_benchmarks(runner, load_benchmarks([math_file]), samples=3, options=OPTIONS,
                            out_dir=uninterrupted, run_dir=run_dir, progress=False)
    assert result_files(uninterrupted) == before


def test_too_long_prompt_names_its_line(runner, tmp_path):
    path = write_lines(tmp_path / "long.jsonl", [
        {"question": "short?", "answer": "1", "kind": "boxed"},
        {"question": "9" * 600, "answer": "1", "kind": "boxed"}])
    with pytest.raises(BenchError, match=re.escape(f"{path}:2: question '2': ") + ".*context"):
        evaluate_benchmarks(runner, load_benchmarks([path]), samples=1, options=OPTIONS,
                            out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything was decoded


def test_decode_bench_command_line(run_dir, math_file, tmp_path, capsys):
    choice = write_lines(tmp_path / "pick.jsonl", [
        {"question": "1+1?", "choices": ["2", "3"], "answer": "A", "kind": "choice",
         "system": "Brief."}])
    out = tmp_path / "out"
    argv = ["--run", str(run_dir), "--bench", str(math_file), str(choice), "--out-dir", str(out),
            "--max-questions", "2", *CLI_FLAGS]
    assert run_main(decode.main, argv) == 0
    printed = capsys.readouterr().out
    assert "avg@2 / pass@2 (%), 2 samples per question; questions: arith 2, pick 1" in printed
    header = next(line for line in printed.splitlines() if line.startswith("model"))
    assert header.split() == ["model", "arith", "pick", "overall"]
    assert re.search(r"^PIPO +\d+\.\d\d / \d+\.\d\d", printed, re.M)
    assert f"wrote {out / 'summary.json'}" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["samples"] == 2 and summary["max_questions"] == 2
    assert summary["options"]["top_k"] == 20 and summary["options"]["max_new_tokens"] == 16
    pipo = summary["benchmarks"]["arith"]["models"]["pipo"]
    assert summary["overall"]["pipo"]["avg@2"] == pytest.approx(
        (pipo["avg@2"] + summary["benchmarks"]["pick"]["models"]["pipo"]["avg@2"]) / 2)
    assert sorted(p.name for p in out.glob("*.jsonl")) == [
        "arith.ar.jsonl", "arith.pipo.jsonl", "pick.ar.jsonl", "pick.pipo.jsonl"]
    # Same command again: everything is on file, nothing is decoded, the files are unchanged.
    before = result_files(out)
    assert run_main(decode.main, argv) == 0
    assert result_files(out) == before


@pytest.mark.parametrize("args, message", [
    (["--bench", "{missing}"], r"missing\.jsonl: no such benchmark file"),
    (["--bench", "{empty}"], r"empty\.jsonl: no questions"),
    (["--bench", "{bad}", "--strict"], r"bad\.jsonl:2: not valid JSON"),
    (["--bench", "{allbad}"], r"allbad\.jsonl: no questions; refused: .*allbad\.jsonl:1: "
                              r"missing field\(s\) \['answer'\]"),
    (["--bench", "{good}", "--samples", "0"], r"--samples must be >= 1, got 0"),
    (["--bench", "{good}", "--max-questions", "0"], r"--max-questions must be >= 1"),
    (["--bench", "{good}", "--out", "x.json"], r"--out \(use --out-dir\) cannot be used"),
    (["--bench", "{good}", "--num-problems", "3"], r"--num-problems \(use --max-questions\)"),
    (["--restart"], r"--restart only apply with --bench"),
    (["--strict"], r"--strict only apply with --bench"),
])
def test_decode_bench_bad_input_is_one_line(tmp_path, capsys, args, message):
    files = {"missing": tmp_path / "missing.jsonl", "empty": tmp_path / "empty.jsonl",
             "bad": tmp_path / "bad.jsonl", "good": tmp_path / "good.jsonl",
             "allbad": tmp_path / "allbad.jsonl"}
    files["empty"].write_text("")
    files["allbad"].write_text('{"question": "q", "kind": "boxed"}\n')
    good = '{"question": "q", "answer": "1", "kind": "boxed"}\n'
    files["bad"].write_text(good + "{oops\n")
    files["good"].write_text(good)
    argv = ["--run", str(tmp_path / "no-run")] + [a.format(**files) for a in args]
    assert run_main(decode.main, argv) == 2  # refused before the (missing) run is loaded
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.match(r"error: .*" + message, err), err


# ------------------------------------------------- code and long-context benchmarks (issue #18)


def test_question_record_runs_code_answers_and_keeps_tags():
    path_line = {"question": "Print the sum of two integers.", "kind": "code",
                 "tests": {"type": "stdin", "cases": [{"input": "1 2", "output": "3"},
                                                      {"input": "2 2", "output": "4"}]},
                 "tags": {"difficulty": "easy"}, "time_limit": 1}
    (q,) = load_benchmark_lines([path_line])
    good = "</think>\n```python\na, b = map(int, input().split())\nprint(a + b)\n```"
    wrong = "```python\nprint(3)\n```"
    hang = "```python\nwhile True:\n    pass\n```"
    fork = "```python\nimport os\nwhile True:\n    os.fork()\n```"
    rec = question_record(q, [gen(good), gen(wrong), gen("no code"), gen(hang), gen(fork)],
                          [1, 2, 3, 4, 5])
    # The hostile answers are stopped at their limits and the record is complete.
    assert [s["correct"] for s in rec["samples"]] == [True, False, False, False, False]
    assert [[c["outcome"] for c in s["tests"]] for s in rec["samples"]] == [
        ["passed", "passed"], ["passed", "wrong_answer"], [], ["timeout", "skipped"],
        ["error", "skipped"]]
    assert rec["samples"][2]["extracted"] is None and rec["tags"] == {"difficulty": "easy"}
    assert rec["num_correct"] == 1


def load_benchmark_lines(objs: list) -> tuple:
    with tempfile.TemporaryDirectory() as d:
        return load_benchmarks([write_lines(Path(d) / "b.jsonl", objs)])[0].questions


def test_summary_reports_accuracy_by_tag():
    stats = {"tokens": 4, "backbone_passes": 2, "drafts": 2, "commits": 2, "finished": True}
    recs = [{**record(2, 2, stats), "tags": {"difficulty": "easy"}},
            {**record(0, 2, stats), "tags": {"difficulty": "hard"}},
            {**record(1, 2, stats), "tags": {"difficulty": "hard"}, "context_tokens_dropped": 9},
            {**record(1, 2, stats), "context_tokens_dropped": 0}]
    s = summarise(recs, 2)
    assert s["by_tag"]["difficulty"]["easy"] == {"num_questions": 1, "avg@2": 1.0, "pass@2": 1.0}
    assert s["by_tag"]["difficulty"]["hard"] == {"num_questions": 2, "avg@2": 0.25,
                                                 "pass@2": 0.5}
    assert s["truncated_rate"] == 0.5


LONG_QUESTION = ("Read the text.\n<text>\n$DOC$\n</text>\nWhich word repeats?\n(A) alpha\n"
                 "(B) beta\n(C) gamma\n(D) delta\nAnswer with \"The correct answer is (X)\".")


def long_line(qid: str, words: int) -> dict:
    context = "begin " + " ".join(f"beta{i}" for i in range(words)) + " end"
    return {"id": qid, "kind": "choice", "question": LONG_QUESTION,
            "choices": ["alpha", "beta", "gamma", "delta"], "list_choices": False,
            "instruction": "", "answer": "B", "context": context,
            "tags": {"length": "short" if words < 50 else "long"}}


def test_fit_context_cuts_the_middle_to_the_window(runner):
    (q,) = load_benchmark_lines([long_line("doc", 400)])
    fitted, dropped = harness.fit_context(runner, q, OPTIONS["max_new_tokens"])
    full = len(runner.tokenizer.encode(q.context))
    kept = len(runner.tokenizer.encode(fitted.context))
    assert dropped > 0 and kept == full - dropped
    assert fitted.context.startswith("begin beta0 ") and fitted.context.endswith(" beta399 end")
    ids = runner.encode_prompt(to_messages(fitted))
    limit = runner.config.model.max_context - OPTIONS["max_new_tokens"]
    assert len(ids) + len(ids) % 2 <= limit  # fits (PIPO prompts are parity-padded)
    # Two tokens more of window and more of the context is kept: the cut is as small as it can be.
    more, _ = harness.fit_context(runner, q, OPTIONS["max_new_tokens"] - 2)
    assert len(more.context) > len(fitted.context)
    (short,) = load_benchmark_lines([long_line("small", 10)])
    assert harness.fit_context(runner, short, OPTIONS["max_new_tokens"]) == (short, 0)


def test_decode_bench_code_and_long_context_end_to_end(run_dir, tmp_path, capsys):
    code = write_lines(tmp_path / "code.jsonl", [
        {"id": "sum", "question": "Print the sum of two integers.", "kind": "code",
         "system": "Write Python.", "tags": {"difficulty": "easy"},
         "tests": {"type": "stdin", "cases": [{"input": "1 2", "output": "3"}]}},
        {"id": "total", "question": "Return the total.", "kind": "code", "system": "Python.",
         "starter_code": "class Solution:\n    def total(self, xs):",
         "tests": {"type": "functional", "fn_name": "total",
                   "cases": [{"input": "[1, 2]", "output": "3"}]},
         "tags": {"difficulty": "hard"}},
        {"id": "broken", "question": "No tests.", "kind": "code"}])
    longctx = write_lines(tmp_path / "longctx.jsonl", [long_line("doc", 400),
                                                       long_line("small", 10)])
    out = tmp_path / "out"
    argv = ["--run", str(run_dir), "--bench", str(code), str(longctx), "--out-dir", str(out),
            "--models", "pipo", *CLI_FLAGS]  # AR's scoring path is the same code
    assert run_main(decode.main, argv) == 0
    captured = capsys.readouterr()
    assert re.search(rf"refused {re.escape(str(code))}:3: missing field\(s\) \['tests'\]",
                     captured.err)
    assert "code: 1 line(s) refused" in captured.out
    assert "longctx: context cut in the middle for 50.0% of questions" in captured.out
    assert re.search(r"^PIPO +code difficulty: easy [\d.]+ / [\d.]+ \(1\), hard", captured.out,
                     re.M)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmarks"]["code"]["num_questions"] == 2
    assert len(summary["benchmarks"]["code"]["refused"]) == 1
    lines = (out / "longctx.pipo.jsonl").read_text().splitlines()
    recs = {r["id"]: r for r in map(json.loads, lines[1:])}
    assert recs["doc"]["context_tokens_dropped"] > 0
    assert recs["small"]["context_tokens_dropped"] == 0
    assert recs["doc"]["tags"] == {"length": "long"}
    code_recs = [json.loads(x) for x in (out / "code.pipo.jsonl").read_text().splitlines()[1:]]
    assert [r["id"] for r in code_recs] == ["sum", "total"]
    for s in (s for r in code_recs for s in r["samples"]):
        # A random model writes no code block: no answer, nothing run, scored as failed.
        assert "tests" in s and s["correct"] is (s["extracted"] is not None and all(
            c["outcome"] == "passed" for c in s["tests"]))
    # Same command again resumes: nothing decoded, files unchanged.
    before = result_files(out)
    assert run_main(decode.main, argv) == 0
    assert result_files(out) == before

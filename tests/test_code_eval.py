"""Code benchmarks: the sandbox's limits, the code scorer, HumanEval's canonical solutions, and the
LiveCodeBench / HumanEval / LongBench v2 converters (pure Python, no model)."""

from __future__ import annotations

import base64
import gzip
import json
import pickle
import socket
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipo_jax.cli import run_main
from pipo_jax.errors import BenchError
from pipo_jax.eval import __main__ as bench_cli
from pipo_jax.eval.code import (
    CodeTests,
    extract_code,
    last_code_block,
    run_tests,
    score_code,
    stdout_matches,
    user_prompt,
)
from pipo_jax.eval.sandbox import Limits, network_isolation, run_python
from pipo_jax.eval.schema import load_benchmark, to_messages
from pipo_jax.eval.sources import (
    decode_lcb_cases,
    humaneval_file,
    humaneval_questions,
    livecodebench_questions,
    longbench_v2_questions,
)

FAST = Limits(time_s=2.0, memory_mb=512)


# ------------------------------------------------------------------------------- sandbox


def test_sandbox_runs_a_program_with_stdin_in_a_fresh_directory():
    first = run_python("import os\nopen('left.txt', 'w').write('x')\nprint(input()[::-1])",
                       "hello\n", FAST)
    assert (first.status, first.returncode, first.stdout) == ("ok", 0, "olleh\n")
    second = run_python("import os\nprint(sorted(os.listdir('.')))", "", FAST)
    assert "left.txt" not in second.stdout  # each run starts from a new directory


@pytest.mark.parametrize("name, script, status", [
    ("infinite loop", "while True:\n    pass", "timeout"),
    ("sleeper", "import time\ntime.sleep(60)", "timeout"),
    ("memory hog", "chunks = []\nwhile True:\n    chunks.append(bytearray(10**8))", "memory"),
    ("one huge allocation", "x = bytearray(8 << 30)", "memory"),
    ("fork bomb", "import os\nwhile True:\n    os.fork()", "error"),
    ("subprocess", "import subprocess\nsubprocess.run(['sleep', '60'])", "error"),
    ("output flood", "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
     "output_limit"),
])
def test_sandbox_stops_hostile_code_within_its_limit(name, script, status):
    # The memory cases get a longer clock: on a loaded machine filling 512 MiB can take seconds,
    # and the test is that the memory limit (not the clock) stops them.
    time_s = 10.0 if status == "memory" else 2.0
    limits = Limits(time_s=time_s, memory_mb=512, output_mb=1)
    t = time.monotonic()
    result = run_python(script, "", limits)
    elapsed = time.monotonic() - t
    assert result.status == status, (name, result)
    assert elapsed < limits.time_s + 5, (name, elapsed)  # killed at its limit, not later
    if name in ("fork bomb", "subprocess"):
        assert "starting processes is disabled" in result.stderr


@pytest.fixture()
def listener():
    """A local TCP server the sandboxed code must not reach."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    accepted = []

    def accept() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                accepted.append(srv.accept())
            except (TimeoutError, OSError):
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield srv.getsockname()[1], accepted
    srv.close()


def test_sandbox_blocks_the_socket_module(listener):
    port, accepted = listener
    result = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), "
                        "timeout=2)\nprint('connected')", "", FAST)
    assert result.status == "error" and "network access is disabled" in result.stderr
    assert "connected" not in result.stdout and not accepted


def test_sandbox_network_namespace_blocks_raw_sockets(listener):
    """``_socket`` goes around the Python guard: only the namespace stops it."""
    if network_isolation() != "namespace":
        pytest.skip("unshare --net is not permitted here: only the socket guard applies")
    port, accepted = listener
    result = run_python(f"import _socket\ns = _socket.socket()\ns.settimeout(2)\n"
                        f"s.connect(('127.0.0.1', {port}))\nprint('connected')", "", FAST)
    assert result.status == "error" and "connected" not in result.stdout and not accepted


def test_sandbox_limits_are_validated():
    with pytest.raises(ValueError, match="sandbox limits"):
        Limits(time_s=0)


# -------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("text, expected", [
    ("```python\nprint(1)\n```", "print(1)"),
    ("draft\n```\nprint(0)\n```\nfinal\n```python\nprint(2)\n```\nbye", "print(2)"),
    # The last block was cut off by the budget: no answer (not the earlier draft).
    ("```python\nprint(1)\n```\nthen\n```python\nprint(3)", None),
    ("no code at all", None),
    ("```python\nprint(1)", None),
])
def test_last_code_block(text, expected):
    assert last_code_block(text) == expected


def test_code_after_think_is_preferred():
    text = "```python\nprint('draft')\n```\n</think>\nAnswer:\n```python\nprint('final')\n```"
    assert extract_code(text) == "print('final')"
    assert extract_code("```python\nprint('only')\n```\n</think>\nno block") == "print('only')"


def test_stdout_comparison_follows_livecodebench():
    assert stdout_matches("3\n4  \n\n", "3\n4")
    assert stdout_matches("1.50 2\n", "1.5 2.0")
    assert not stdout_matches("3\n4\n5", "3\n4")
    assert not stdout_matches("1.5001", "1.5")
    assert not stdout_matches("abc", "abd")


def test_user_prompt_is_livecodebench_generic_template():
    stdin = user_prompt("Add two numbers.", None)
    assert stdin.startswith("### Question:\nAdd two numbers.\n\n### Format: Read the inputs")
    assert "```python\n# YOUR CODE HERE\n```" in stdin
    assert stdin.endswith("### Answer: (use the provided format with backticks)\n\n")
    functional = user_prompt("Add.", "class Solution:\n    def add(self, a, b):")
    assert "You will use the following starter code" in functional
    assert "```python\nclass Solution:\n    def add(self, a, b):\n```" in functional


# ------------------------------------------------------------------------------ scoring

STDIN = CodeTests("stdin", (("1 2\n", "3\n"), ("5 7\n", "12\n"), ("0 0\n", "0\n")))
FUNCTIONAL = CodeTests("functional", (("[1, 2, 3]\n2", "[3, 2]"), ("[4]\n0", "[0, 0]")),
                       fn_name="head_sum")


def fenced(code: str) -> str:
    return f"Here it is.\n```python\n{code}\n```\n"


def test_stdin_problem_passes_and_fails_by_case():
    code, ok, cases = score_code(fenced("a, b = map(int, input().split())\nprint(a + b)"),
                                 STDIN, FAST)
    assert ok and [c["outcome"] for c in cases] == ["passed"] * 3
    _, ok, cases = score_code(fenced("a, b = map(int, input().split())\nprint(a * b + 1)"),
                              STDIN, FAST)
    # 1*2+1 = 3 passes; 5*7+1 is wrong; the rest are not run.
    assert not ok and [c["outcome"] for c in cases] == ["passed", "wrong_answer", "skipped"]


def test_functional_problem_calls_the_solution_method():
    good = ("class Solution:\n    def head_sum(self, xs, k):\n        print('debug output')\n"
            "        return (sum(xs[:k]), k)")
    _, ok, cases = score_code(fenced(good), FUNCTIONAL, FAST)
    assert ok, cases
    top_level = "def head_sum(xs, k):\n    return [sum(xs[:k]), k]"
    assert score_code(fenced(top_level), FUNCTIONAL, FAST)[1]
    wrong = "class Solution:\n    def head_sum(self, xs, k):\n        return [0, k]"
    assert [c["outcome"] for c in score_code(fenced(wrong), FUNCTIONAL, FAST)[2]] == [
        "wrong_answer", "skipped"]


@pytest.mark.parametrize("text, outcome", [
    ("I would rather not write code.", None),
    (fenced("def broken(:\n    pass"), "error"),
    (fenced("raise RuntimeError('boom')"), "error"),
    (fenced("while True:\n    pass"), "timeout"),
])
def test_bad_answers_fail_and_say_why(text, outcome):
    code, ok, cases = score_code(text, STDIN, Limits(time_s=1.0, memory_mb=512))
    assert not ok
    if outcome is None:
        assert code is None and cases == []
    else:
        assert cases[0]["outcome"] == outcome
        if outcome == "error":
            assert cases[0]["error"]


def test_malformed_functional_case_is_a_bad_case_not_a_crash():
    tests = CodeTests("functional", (("not json", "1"),), fn_name="f")
    _, ok, cases = score_code(fenced("def f(x):\n    return 1"), tests, FAST)
    assert not ok and cases[0]["outcome"] == "bad_case" and "not JSON" in cases[0]["error"]


# ------------------------------------------------------------------------------ HumanEval


def wrong_result(entry: str) -> str:
    """A corrupted copy: the canonical function, its every result changed."""
    return (f"\n\n_canonical = {entry}\n\n"
            f"def {entry}(*args, **kwargs):\n"
            "    r = _canonical(*args, **kwargs)\n"
            "    if isinstance(r, bool):\n        return not r\n"
            "    if isinstance(r, (int, float)):\n        return r + 1\n"
            "    if isinstance(r, str):\n        return r + '?'\n"
            "    if isinstance(r, (list, tuple)):\n        return type(r)([*r, None])\n"
            "    return None if r is not None else 0\n")


def test_humaneval_canonical_solutions_pass_and_corrupted_copies_fail(tmp_path):
    problems = [json.loads(line) for line in gzip.open(humaneval_file(), "rt")]
    assert len(problems) == 164
    out = tmp_path / "humaneval.jsonl"
    assert run_main(bench_cli.main, ["convert", "humaneval", "--out", str(out)]) == 0
    questions = {q.id: q for q in load_benchmark(out).questions}
    limits = Limits(time_s=20.0)

    def check(problem: dict) -> tuple[str, str, str]:
        q = questions[problem["task_id"]]
        solution = problem["prompt"] + problem["canonical_solution"]
        good = run_tests(solution, q.tests, limits)[0]["outcome"]
        bad = run_tests(solution + wrong_result(problem["entry_point"]), q.tests,
                        limits)[0]["outcome"]
        return problem["task_id"], good, bad

    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(check, problems))
    assert [o for o in outcomes if o[1] != "passed"] == []
    assert [o for o in outcomes if o[2] == "passed"] == []
    # The question poses the prompt as starter code, in LiveCodeBench's template.
    q = questions["HumanEval/0"]
    messages = to_messages(q)
    assert messages[0]["content"].startswith("You are an expert Python programmer")
    assert "def has_close_elements" in messages[1]["content"]


# ------------------------------------------------------------------------- LiveCodeBench


def lcb_compress(cases: list[dict]) -> str:
    return base64.b64encode(zlib.compress(pickle.dumps(json.dumps(cases)))).decode()


def lcb_line(qid: str, date: str, cases: list[dict], private: list[dict], **extra) -> dict:
    return {"question_title": qid, "question_content": f"Problem {qid}.", "platform": "atcoder",
            "question_id": qid, "contest_id": "c1", "contest_date": date, "starter_code": "",
            "difficulty": "easy", "public_test_cases": json.dumps(cases),
            "private_test_cases": lcb_compress(private), "metadata": "{}", **extra}


def test_livecodebench_converter_reads_compressed_private_tests(tmp_path):
    stdin_case = {"input": "1 2\n", "output": "3\n", "testtype": "stdin"}
    private = {"input": "5 7\n", "output": "12\n", "testtype": "stdin"}
    functional = {"input": "[1, 2]", "output": "3", "testtype": "functional"}
    lines = [lcb_line("old", "2024-12-01T00:00:00", [stdin_case], [private]),
             lcb_line("new", "2025-03-01T00:00:00", [stdin_case], [private]),
             lcb_line("fn", "2025-04-02T00:00:00", [functional], [],
                      starter_code="class Solution:\n    def total(self, xs):",
                      metadata=json.dumps({"func_name": "total"}), platform="leetcode")]
    src = tmp_path / "test6.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "lcb.jsonl"
    assert run_main(bench_cli.main, ["convert", "livecodebench", "--in", str(src), "--out",
                                     str(out), "--since", "2025-02-01"]) == 0
    questions = load_benchmark(out).questions
    assert [q.id for q in questions] == ["new", "fn"]
    new, fn = questions
    assert new.tests.type == "stdin" and new.tests.cases == (("1 2\n", "3\n"), ("5 7\n", "12\n"))
    assert dict(new.tags) == {"difficulty": "easy", "platform": "atcoder"}
    assert fn.tests.type == "functional" and fn.tests.fn_name == "total"
    assert fn.starter_code.startswith("class Solution")
    assert score_code(fenced("a, b = map(int, input().split())\nprint(a + b)"), new.tests,
                      FAST)[1]
    assert score_code(fenced("class Solution:\n    def total(self, xs):\n        return sum(xs)"),
                      fn.tests, FAST)[1]


def test_livecodebench_unpickler_refuses_globals():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    blob = base64.b64encode(zlib.compress(pickle.dumps(Evil()))).decode()
    with pytest.raises(BenchError, match="neither JSON nor .*refused: the pickle names"):
        decode_lcb_cases(blob, "f.jsonl:1")


@pytest.mark.parametrize("change, message", [
    ({"public_test_cases": "[{\"input\": 1}]"}, "test cases must be a list"),
    ({"private_test_cases": "%%%"}, "neither JSON nor"),
    ({"metadata": "{}", "public_test_cases": json.dumps(
        [{"input": "1", "output": "1", "testtype": "functional"}])}, "needs metadata.func_name"),
    ({"contest_date": "soon"}, "contest_date must be a date"),
])
def test_livecodebench_converter_errors_name_the_line(tmp_path, change, message):
    good = lcb_line("a", "2025-03-01", [{"input": "1", "output": "1", "testtype": "stdin"}], [])
    bad = {**good, "question_id": "b", **change}
    src = tmp_path / "lcb.jsonl"
    src.write_text(json.dumps(good) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(BenchError, match=rf"lcb\.jsonl:2: .*{message}"):
        livecodebench_questions(src, since="2025-01-01")


def test_humaneval_converter_errors(tmp_path):
    src = tmp_path / "he.jsonl"
    src.write_text(json.dumps({"task_id": "x", "prompt": "def f():\n", "test": "t"}) + "\n")
    with pytest.raises(BenchError, match=r"he\.jsonl:1: missing field\(s\) \['entry_point'\]"):
        humaneval_questions(src)


# --------------------------------------------------------------------------- LongBench v2


def longbench_item(i: int, length: str, difficulty: str) -> dict:
    return {"_id": f"lb{i}", "domain": "Single-Document QA", "sub_domain": "x",
            "difficulty": difficulty, "length": length, "question": f"Which colour is item {i}?",
            "choice_A": "red", "choice_B": "blue", "choice_C": "green", "choice_D": "$Q$ text",
            "answer": "BCDA"[i % 4], "context": f"Item {i} is painted. " * 20}


def test_longbench_v2_converter_uses_the_official_template(tmp_path):
    src = tmp_path / "data.json"
    src.write_text(json.dumps([longbench_item(0, "short", "easy"),
                               longbench_item(1, "long", "hard"),
                               longbench_item(2, "short", "hard")]))
    out = tmp_path / "longbench.jsonl"
    assert run_main(bench_cli.main, ["convert", "longbench-v2", "--in", str(src), "--out",
                                     str(out), "--length", "short"]) == 0
    questions = load_benchmark(out).questions
    assert [q.id for q in questions] == ["lb0", "lb2"]
    q = questions[0]
    assert q.answer == "B" and dict(q.tags) == {"difficulty": "easy", "length": "short",
                                                "domain": "Single-Document QA"}
    prompt = to_messages(q)[-1]["content"]
    assert prompt == (
        "Please read the following text and answer the question below.\n\n<text>\n"
        + q.context + "\n</text>\n\nWhat is the correct answer to this question: Which colour "
        "is item 0?\nChoices:\n(A) red\n(B) blue\n(C) green\n(D) $Q$ text\n\nFormat your "
        "response as follows: \"The correct answer is (insert answer here)\".")


def test_longbench_v2_converter_errors(tmp_path):
    src = tmp_path / "data.json"
    item = longbench_item(0, "short", "easy")
    del item["choice_C"]
    src.write_text(json.dumps([item]))
    with pytest.raises(BenchError, match=r"data\.json:item 1: missing field\(s\) \['choice_C'\]"):
        longbench_v2_questions(src)
    assert run_main(bench_cli.main, ["convert", "gpqa", "--in", str(src), "--out",
                                     str(tmp_path / "o.jsonl"), "--length", "short"]) == 2


def test_code_schema_errors_name_file_and_line(tmp_path):
    path = tmp_path / "code.jsonl"
    lines = [{"question": "q", "kind": "code", "tests": {"type": "stdin", "cases": []}},
             {"question": "q", "kind": "code", "answer": "1",
              "tests": {"type": "stdin", "cases": [{"input": "", "output": ""}]}},
             {"question": "q", "kind": "code", "tests": {"type": "program", "program": "x",
                                                         "entry_point": "not a name"}},
             {"question": "q", "kind": "code", "time_limit": 0,
              "tests": {"type": "stdin", "cases": [{"input": "", "output": ""}]}},
             {"question": "q", "kind": "boxed", "answer": "1", "context": "c"}]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(BenchError, match="no questions; refused"):
        load_benchmark(path, skip_invalid=True)
    messages = []
    for i, line in enumerate(lines, start=1):
        one = tmp_path / f"one{i}.jsonl"
        one.write_text(json.dumps(line) + "\n")
        with pytest.raises(BenchError, match=rf"one{i}\.jsonl:1: ") as e:
            load_benchmark(one)
        messages.append(str(e.value))
    assert "tests.cases must be a non-empty list" in messages[0]
    assert "['answer'] do not apply to kind 'code'" in messages[1]
    assert "entry_point must be a Python name" in messages[2]
    assert "time_limit must be a number" in messages[3]
    assert "must contain $DOC$ exactly once" in messages[4]


def test_humaneval_default_input_is_the_package_file():
    assert Path(humaneval_file()).is_file()

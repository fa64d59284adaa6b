"""Code problems (LiveCodeBench, HumanEval): the prompt, the code answer, and its tests.

Prompt: LiveCodeBench's generic chat template (``lcb_runner/prompts/code_generation.py``): its
system message, then ``### Question:``, the problem, ``### Format:`` with the starter code (a
functional problem: complete the given class or function) or the stdin/stdout instruction, and
``### Answer: (use the provided format with backticks)``.

Answer: the LAST fenced code block (```` ``` ```` or ```` ```python ````) after the last
``</think>``, else in the whole response. LiveCodeBench takes the first block; a reasoning
model's drafts come first and its answer last, so we take the last. A block that never closes
(the budget ran out) is no answer.

Tests, three kinds, each case run in its own sandboxed process (``sandbox.run_python``):

- ``stdin``: the program reads the case's ``input`` on stdin; its stdout must equal ``output``
  line by line after stripping, or (LiveCodeBench's rule) line by line as whitespace-separated
  decimal numbers (``Decimal``: ``1.50`` equals ``1.5``);
- ``functional``: ``Solution().<fn_name>(*args)`` (or a top-level ``fn_name``), the arguments
  one JSON value per line of ``input``; the JSON of the result, a tuple read as a list, must
  equal ``output`` parsed as JSON;
- ``program`` (HumanEval): the answer, then the benchmark's test ``program``, then
  ``check(<entry_point>)``, must exit 0; ``prelude`` (the prompt's imports) runs first, since
  HumanEval's prompts import what their signatures use.

Cases run in order and stop at the first that does not pass (the rest are ``skipped``: the
sample has failed either way, and LiveCodeBench stops there too). A case whose own data is
broken (functional input that is not JSON) is ``bad_case``: the sample fails and the record says
why. Per-case outcomes go into the result file with the sample.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

from pipo_jax.eval.sandbox import Limits, RunResult, run_python
from pipo_jax.io.tokenizer import THINK_END

TEST_TYPES = ("stdin", "functional", "program")
OUTCOMES = ("passed", "wrong_answer", "error", "timeout", "memory", "output_limit", "bad_case",
            "skipped")

SYSTEM_PROMPT = ("You are an expert Python programmer. You will be given a question (problem "
                 "specification) and will generate a correct Python program that matches the "
                 "specification and passes all tests. You will NOT return anything except for "
                 "the program.")
FORMAT_WITH_STARTER = ("You will use the following starter code to write the solution to the "
                       "problem and enclose your code within delimiters.")
FORMAT_STDIN = ("Read the inputs from stdin solve the problem and write the answer to stdout (do "
                "not directly test on the sample inputs). Enclose your code within delimiters as "
                "follows.")

_FENCE = re.compile(r"^[ \t]*```")


@dataclasses.dataclass(frozen=True)
class CodeTests:
    """A problem's tests (module docstring): ``type`` is one of ``TEST_TYPES``; ``cases`` are
    ``(input, output)`` pairs (``stdin``/``functional``); ``program``, ``entry_point`` and
    ``prelude`` are HumanEval's; ``fn_name`` is the functional method."""

    type: str
    cases: tuple[tuple[str, str], ...] = ()
    fn_name: str | None = None
    program: str | None = None
    entry_point: str | None = None
    prelude: str = ""


def user_prompt(question: str, starter_code: str | None) -> str:
    """LiveCodeBench's user turn for a problem (with starter code: a functional problem)."""
    prompt = f"### Question:\n{question}\n\n"
    if starter_code:
        prompt += f"### Format: {FORMAT_WITH_STARTER}\n```python\n{starter_code}\n```\n\n"
    else:
        prompt += f"### Format: {FORMAT_STDIN}\n```python\n# YOUR CODE HERE\n```\n\n"
    return prompt + "### Answer: (use the provided format with backticks)\n\n"


def last_code_block(text: str) -> str | None:
    """The content of the last complete fenced block in ``text``, or None."""
    lines = text.split("\n")
    fences = [i for i, line in enumerate(lines) if _FENCE.match(line)]
    if len(fences) < 2:
        return None
    # Fences pair up from the start: 0-1, 2-3, ...; an odd last fence opened a block never closed.
    pairs = [(fences[i], fences[i + 1]) for i in range(0, len(fences) - 1, 2)]
    if len(fences) % 2 and fences[-1] > pairs[-1][1]:
        return None
    start, end = pairs[-1]
    return "\n".join(lines[start + 1:end])


def extract_code(text: str) -> str | None:
    """The code answer of a response: the last block after ``</think>``, else anywhere."""
    i = text.rfind(THINK_END)
    if i >= 0:
        found = last_code_block(text[i + len(THINK_END):])
        if found is not None:
            return found
    return last_code_block(text)


def _stripped_lines(text: str) -> list[str]:
    return [line.strip() for line in text.strip().split("\n")]


def _decimals(line: str) -> list[Decimal] | None:
    try:
        return [Decimal(tok) for tok in line.split()]
    except InvalidOperation:
        return None


def stdout_matches(got: str, expected: str) -> bool:
    """LiveCodeBench's stdin/stdout comparison (module docstring)."""
    a, b = _stripped_lines(got), _stripped_lines(expected)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x == y:
            continue
        dx, dy = _decimals(x), _decimals(y)
        if dx is None or dy is None or dx != dy:
            return False
    return True


# The functional harness, appended to the answer: the arguments come from args.json, the
# result's JSON is printed last after a marker (the program's own prints stay before it).
RESULT_MARKER = "\n__PIPO_RESULT__"
_CALL_HARNESS = """

def __pipo_call():
    import json as _json
    import sys as _sys
    with open("args.json", encoding="utf-8") as f:
        args = _json.load(f)
    fn_name = {fn_name!r}
    cls = globals().get("Solution")
    if cls is not None and hasattr(cls, fn_name):
        fn = getattr(cls(), fn_name)
    else:
        fn = globals()[fn_name]
    result = fn(*args)
    if isinstance(result, tuple):
        result = list(result)
    _sys.stdout.write({marker!r} + _json.dumps(result))

__pipo_call()
"""


def _outcome(run: RunResult) -> str:
    return {"ok": "passed"}.get(run.status, run.status)


def _case_record(outcome: str, run: RunResult | None, detail: str = "") -> dict[str, Any]:
    record: dict[str, Any] = {"outcome": outcome}
    if run is not None:
        record["seconds"] = round(run.seconds, 3)
        if outcome not in ("passed", "wrong_answer") and run.stderr.strip():
            record["error"] = run.stderr.strip().splitlines()[-1][:300]
    if detail:
        record["error"] = detail
    return record


def _functional_case(code: str, tests: CodeTests, inp: str, out: str,
                     limits: Limits) -> dict[str, Any]:
    try:
        args = [json.loads(line) for line in inp.split("\n") if line.strip()]
        expected = json.loads(out)
    except json.JSONDecodeError as e:
        return _case_record("bad_case", None, f"test case is not JSON: {e.msg}")
    script = code + _CALL_HARNESS.format(fn_name=tests.fn_name, marker=RESULT_MARKER)
    run = run_python(script, "", limits, files={"args.json": json.dumps(args)})
    if run.status != "ok":
        return _case_record(_outcome(run), run)
    marker = run.stdout.rfind(RESULT_MARKER)
    if marker < 0:
        return _case_record("error", run, "no result")
    try:
        got = json.loads(run.stdout[marker + len(RESULT_MARKER):])
    except json.JSONDecodeError:
        return _case_record("error", run, "result is not JSON")
    return _case_record("passed" if got == expected else "wrong_answer", run)


def run_tests(code: str, tests: CodeTests, limits: Limits) -> list[dict[str, Any]]:
    """Per-case outcome records (``{"outcome", "seconds"?, "error"?}``) of one code answer."""
    if tests.type == "program":
        script = "\n".join(p for p in (tests.prelude, code, tests.program,
                                       f"check({tests.entry_point})") if p)
        run = run_python(script, "", limits)
        return [_case_record(_outcome(run), run)]
    records: list[dict[str, Any]] = []
    for inp, out in tests.cases:
        if records and records[-1]["outcome"] != "passed":
            records.append({"outcome": "skipped"})
            continue
        if tests.type == "stdin":
            run = run_python(code, inp, limits)
            if run.status == "ok":
                ok = stdout_matches(run.stdout, out)
                records.append(_case_record("passed" if ok else "wrong_answer", run))
            else:
                records.append(_case_record(_outcome(run), run))
        else:
            records.append(_functional_case(code, tests, inp, out, limits))
    return records


def score_code(text: str, tests: CodeTests, limits: Limits) -> tuple[str | None, bool,
                                                                       list[dict[str, Any]]]:
    """``(extracted code or None, all cases passed, per-case records)`` of one response; code
    that does not parse fails without being run (its one record says so)."""
    code = extract_code(text)
    if code is None:
        return None, False, []
    try:
        compile(code, "<answer>", "exec")
    except (SyntaxError, ValueError) as e:
        return code, False, [{"outcome": "error", "error": f"does not parse: {e}"[:300]}]
    records = run_tests(code, tests, limits)
    return code, bool(records) and all(r["outcome"] == "passed" for r in records), records


def parse_tests(raw: Any, where: str) -> CodeTests:
    """A ``tests`` field of the benchmark schema as ``CodeTests``; raises ``ValueError`` with a
    message naming what is wrong (the schema adds ``file:line``)."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"tests must be an object with a 'type', got {raw!r:.80}")
    kind = raw.get("type")
    if kind not in TEST_TYPES:
        raise ValueError(f"tests.type must be one of {list(TEST_TYPES)}, got {kind!r}")
    allowed = {"stdin": {"type", "cases"}, "functional": {"type", "cases", "fn_name"},
               "program": {"type", "program", "entry_point", "prelude"}}[kind]
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ValueError(f"unknown tests field(s) {unknown} for type {kind!r}")
    if kind == "program":
        for name in ("program", "entry_point"):
            if not isinstance(raw.get(name), str) or not raw[name].strip():
                raise ValueError(f"tests.{name} must be a non-empty string")
        if not raw["entry_point"].isidentifier():
            raise ValueError(f"tests.entry_point must be a Python name, got "
                             f"{raw['entry_point']!r}")
        prelude = raw.get("prelude", "")
        if not isinstance(prelude, str):
            raise ValueError("tests.prelude must be a string")
        return CodeTests(kind, program=raw["program"], entry_point=raw["entry_point"],
                         prelude=prelude)
    cases = raw.get("cases")
    if not isinstance(cases, Sequence) or isinstance(cases, str) or not cases:
        raise ValueError("tests.cases must be a non-empty list of {input, output} objects")
    parsed = []
    for i, case in enumerate(cases):
        if (not isinstance(case, Mapping) or set(case) != {"input", "output"}
                or not all(isinstance(case[k], str) for k in ("input", "output"))):
            raise ValueError(f"tests.cases[{i}] must be an object with string 'input' and "
                             f"'output' (only), got {case!r:.80}")
        parsed.append((case["input"], case["output"]))
    fn_name = raw.get("fn_name")
    if kind == "functional" and (not isinstance(fn_name, str) or not fn_name.isidentifier()):
        raise ValueError(f"tests.fn_name must be a Python name, got {fn_name!r}")
    return CodeTests(kind, tuple(parsed), fn_name=fn_name)

"""Benchmark files: one question per JSONL line, validated on load, and the prompt each poses.

Schema (one JSON object per line; blank lines are skipped; unknown fields are errors):

==========  ========  ====================================================================
field       required  meaning
==========  ========  ====================================================================
id          no        unique string (an integer is read as its decimal string);
                      default: the 1-based line number
question    yes       the question text (non-empty string)
answer      boxed,    the reference: a math answer for ``boxed`` (an integer is accepted),
            choice    a letter ``A``–``Z`` for ``choice``; not used by ``code``
kind        yes       ``"boxed"``: compared with ``scoring.math_equal`` (math-verify);
                      ``"choice"``: the option letter must match;
                      ``"code"``: the last code block must pass ``tests`` (``eval.code``)
choices     no        ``choice`` only: 2–26 option strings, listed in the prompt as
                      ``A) ...``; ``answer`` must be the letter of one of them
system      no        a system message; without it the runner's default system prompt is used
instruction no        replaces the kind's default instruction at the end of the user turn;
                      ``""`` poses the question alone
list_choices no       ``choice``: ``false`` when ``question`` already shows the options (as
                      LongBench's template does); default ``true``
context     no        a long document: replaces the one ``$DOC$`` in ``question`` (which
                      must then hold it); cut in the middle when the prompt would not fit the
                      model's window with the budget (``harness.fit_context``)
tags        no        an object of string → string labels (``difficulty``, ``length``, ...):
                      accuracy is also reported per tag value
tests       code      the tests (``code.parse_tests``): ``{"type": "stdin" | "functional",
                      "cases": [{"input", "output"}], "fn_name"?}`` or ``{"type":
                      "program", "program", "entry_point", "prelude"?}``
starter_code no       ``code``: the code the answer completes (a functional problem)
time_limit  no        ``code``: wall seconds per test case (default 6, LiveCodeBench's)
memory_mb   no        ``code``: address-space limit of each test run (default 2048)
==========  ========  ====================================================================

Example lines::

    {"id": "aime25-1", "question": "Find the sum of ...", "answer": "70", "kind": "boxed"}
    {"id": "gpqa-7", "question": "Which ...?", "choices": ["x", "y", "z", "w"], "answer": "C",
     "kind": "choice"}
    {"id": "add", "question": "Read a and b, print a + b.", "kind": "code",
     "tests": {"type": "stdin", "cases": [{"input": "1 2", "output": "3"}]}}

Every validation error is a ``BenchError`` that names the file and the 1-based line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipo_jax.errors import BenchError
from pipo_jax.eval.code import SYSTEM_PROMPT as CODE_SYSTEM_PROMPT
from pipo_jax.eval.code import CodeTests, parse_tests
from pipo_jax.eval.code import user_prompt as code_prompt
from pipo_jax.eval.sandbox import Limits

KINDS = ("boxed", "choice", "code")
FIELDS = ("id", "question", "answer", "kind", "choices", "system", "instruction", "list_choices",
          "context", "tags", "tests", "starter_code", "time_limit", "memory_mb")
REQUIRED = {"boxed": ("question", "answer"), "choice": ("question", "answer"),
            "code": ("question", "tests")}
CODE_FIELDS = ("tests", "starter_code", "time_limit", "memory_mb")
CONTEXT_MARK = "$DOC$"  # LongBench's own placeholder for the document
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# Qwen-style evaluation instructions that end the user turn (``user_prompt``).
BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = ("Please reason step by step, and put the letter of the correct option "
                      "({letters}) within \\boxed{{}}.")


@dataclasses.dataclass(frozen=True)
class Question:
    """One validated benchmark question; ``line`` is its 1-based line in ``source``."""

    id: str
    question: str
    answer: str
    kind: str
    choices: tuple[str, ...] | None
    system: str | None
    source: str
    line: int
    # Replaces the kind's default instruction at the end of the user turn; "" poses the
    # question alone (a model trained on bare questions, such as the embedded task's).
    instruction: str | None = None
    list_choices: bool = True
    context: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    tests: CodeTests | None = None
    starter_code: str | None = None
    limits: Limits | None = None

    @property
    def num_choices(self) -> int | None:
        return None if self.choices is None else len(self.choices)


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A loaded benchmark file: ``name`` (the file stem), its questions and its sha256."""

    name: str
    path: Path
    questions: tuple[Question, ...]
    sha256: str
    # ``file:line: reason`` of each line refused by ``load_benchmark(..., skip_invalid=True)``.
    refused: tuple[str, ...] = ()


def _text(value: Any, what: str, where: str, allow_int: bool = False) -> str:
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        kind = "a non-empty string" + (" or an integer" if allow_int else "")
        raise BenchError(f"{where}: {what} must be {kind}, got {value!r}")
    return value


def _number(value: Any, what: str, where: str, low: float, high: float) -> float:
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or not low <= value <= high):
        raise BenchError(f"{where}: {what} must be a number in [{low}, {high}], got {value!r}")
    return value


def _question(obj: Any, where: str, path: Path, lineno: int) -> Question:
    if not isinstance(obj, dict):
        raise BenchError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise BenchError(f"{where}: unknown field(s) {unknown}; the fields are {list(FIELDS)}")
    if "kind" not in obj:
        raise BenchError(f"{where}: missing field(s) ['kind']")
    kind = obj["kind"]
    if kind not in KINDS:
        raise BenchError(f"{where}: kind must be one of {list(KINDS)}, got {kind!r}")
    missing = [f for f in REQUIRED[kind] if f not in obj]
    if missing:
        raise BenchError(f"{where}: missing field(s) {missing}")
    misplaced = [f for f in CODE_FIELDS if f in obj] if kind != "code" else (
        ["answer"] if "answer" in obj else [])
    misplaced += [f for f in ("choices", "list_choices") if f in obj and kind != "choice"]
    if misplaced:
        raise BenchError(f"{where}: field(s) {misplaced} do not apply to kind {kind!r}")
    qid = _text(obj["id"], "id", where, allow_int=True) if "id" in obj else str(lineno)
    question = _text(obj["question"], "question", where)
    answer = ("" if kind == "code"
              else _text(obj["answer"], "answer", where, allow_int=kind == "boxed").strip())
    choices = None
    if "choices" in obj:
        raw = obj["choices"]
        if not isinstance(raw, list) or not 2 <= len(raw) <= len(LETTERS):
            raise BenchError(f"{where}: choices must be a list of 2 to 26 strings, got {raw!r}")
        choices = tuple(_text(c, f"choices[{i}]", where) for i, c in enumerate(raw))
    if kind == "choice":
        allowed = LETTERS[:len(choices)] if choices else LETTERS
        if answer.upper() not in allowed or len(answer) != 1:
            raise BenchError(f"{where}: answer of a choice question must be a letter in "
                             f"{allowed[0]}..{allowed[-1]}, got {answer!r}")
        answer = answer.upper()
    system = _text(obj["system"], "system", where) if "system" in obj else None
    instruction = obj.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise BenchError(f"{where}: instruction must be a string, got {instruction!r}")
    list_choices = obj.get("list_choices", True)
    if not isinstance(list_choices, bool):
        raise BenchError(f"{where}: list_choices must be true or false, got {list_choices!r}")
    context = obj.get("context")
    if context is not None:
        if not isinstance(context, str):
            raise BenchError(f"{where}: context must be a string, got {type(context).__name__}")
        if question.count(CONTEXT_MARK) != 1:
            raise BenchError(f"{where}: a question with a context must contain {CONTEXT_MARK} "
                             f"exactly once (where the context goes), found "
                             f"{question.count(CONTEXT_MARK)}")
    tags = obj.get("tags", {})
    if not isinstance(tags, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and k and v for k, v in tags.items()):
        raise BenchError(f"{where}: tags must be an object of non-empty string values, got "
                         f"{tags!r:.80}")
    tests = starter_code = limits = None
    if kind == "code":
        try:
            tests = parse_tests(obj["tests"], where)
        except ValueError as e:
            raise BenchError(f"{where}: {e}") from e
        starter_code = obj.get("starter_code") or None
        if starter_code is not None and not isinstance(starter_code, str):
            raise BenchError(f"{where}: starter_code must be a string")
        limits = Limits(time_s=float(_number(obj.get("time_limit", 6), "time_limit", where,
                                             0.1, 600)),
                        memory_mb=int(_number(obj.get("memory_mb", 2048), "memory_mb", where,
                                              64, 1 << 20)))
    return Question(qid, question, answer, kind, choices, system, str(path), lineno,
                    instruction, list_choices, context, tuple(sorted(tags.items())), tests,
                    starter_code, limits)


def json_lines(text: str, path: Path) -> Iterator[tuple[int, str, Any]]:
    """``(line number, "file:line", parsed value)`` of each non-blank line of JSONL ``text``;
    a line that is not JSON is a ``BenchError`` naming ``file:line``."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            yield lineno, f"{path}:{lineno}", parse_json_line(line, f"{path}:{lineno}")


def parse_json_line(line: str, where: str) -> Any:
    """One JSONL line's value; bad JSON is a ``BenchError`` naming ``where`` (``file:line``)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise BenchError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e


def load_benchmark(path: str | Path, skip_invalid: bool = False) -> Benchmark:
    """Reads and validates a benchmark JSONL file (see the module docstring for the schema).

    Raises ``BenchError`` naming ``file:line`` for bad JSON, a missing or unknown field, a value
    of the wrong type, a duplicate id or an answer letter outside the choices; and for a missing
    or empty file. With ``skip_invalid`` a bad line is refused instead (its error kept in
    ``Benchmark.refused``) and the rest of the file loads; a file with no valid line is still
    an error.
    """
    path = Path(path)
    if not path.is_file():
        raise BenchError(f"{path}: no such benchmark file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BenchError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    questions: list[Question] = []
    refused: list[str] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            q = _question(parse_json_line(line, where), where, path, lineno)
            if q.id in first_line:
                raise BenchError(f"{where}: duplicate id {q.id!r} (first on line "
                                 f"{first_line[q.id]})")
        except BenchError as e:
            if not skip_invalid:
                raise
            refused.append(str(e))
            continue
        first_line[q.id] = lineno
        questions.append(q)
    if not questions:
        why = f"; refused: {refused[0]}" if refused else " (the file is empty)"
        raise BenchError(f"{path}: no questions{why}")
    return Benchmark(path.stem, path, tuple(questions), hashlib.sha256(raw).hexdigest(),
                     tuple(refused))


def load_benchmarks(paths: Sequence[str | Path], skip_invalid: bool = False) -> list[Benchmark]:
    """``load_benchmark`` for each path; two files with the same stem are refused, since the
    stem names their result files."""
    benches = [load_benchmark(p, skip_invalid) for p in paths]
    seen: dict[str, Path] = {}
    for b in benches:
        if b.name in seen:
            raise BenchError(f"{b.path} and {seen[b.name]} have the same name {b.name!r}; "
                             "rename one (results are stored per file name)")
        seen[b.name] = b.path
    return benches


def user_prompt(q: Question) -> str:
    """The user turn: the question, its options as ``A) ...`` lines, then the instruction.

    ``boxed`` (the Qwen math template)::

        <question>
        Please reason step by step, and put your final answer within \\boxed{}.

    ``choice``::

        <question>

        A) <option>
        B) <option>

        <CHOICE_INSTRUCTION with {letters} = "A or B">

    ``code``: LiveCodeBench's template (``code.user_prompt``) with the starter code, and
    LiveCodeBench's system message unless the question sets one; an ``instruction`` is appended.

    A question's ``instruction`` replaces the default one (``""``: none). The letters named are
    those of the options (``A`` to ``Z`` when the question lists none, its
    text holding the options itself), e.g. "(A, B, C or D)" for four options. A ``context``
    replaces ``$DOC$`` in the question first; ``list_choices: false`` leaves the options out
    (the question's text shows them).
    """
    question = (q.question if q.context is None
                else q.question.replace(CONTEXT_MARK, q.context, 1))
    if q.kind == "code":
        prompt = code_prompt(question, q.starter_code)
        return f"{prompt}{q.instruction}" if q.instruction else prompt
    if q.kind == "boxed":
        instruction = BOXED_INSTRUCTION if q.instruction is None else q.instruction
        return f"{question}\n{instruction}" if instruction else question
    parts = [question]
    letters = LETTERS[:len(q.choices)] if q.choices else LETTERS
    if q.choices and q.list_choices:
        parts.append("\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(q.choices)))
    named = f"{', '.join(letters[:-1])} or {letters[-1]}"
    instruction = (CHOICE_INSTRUCTION.format(letters=named) if q.instruction is None
                   else q.instruction)
    if instruction:
        parts.append(instruction)
    return "\n\n".join(parts)


def to_messages(q: Question) -> list[dict[str, str]]:
    """The chat that poses ``q``: its ``system`` message (if any) and the user turn. The runner
    adds its default system prompt when there is none, the chat template and ``<think>\\n``."""
    system = q.system if q.system is not None or q.kind != "code" else CODE_SYSTEM_PROMPT
    messages = [{"role": "system", "content": system}] if system is not None else []
    return [*messages, {"role": "user", "content": user_prompt(q)}]

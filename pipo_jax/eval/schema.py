"""Benchmark files: one question per JSONL line, validated on load, and the prompt each poses.

Schema (one JSON object per line; blank lines are skipped; unknown fields are errors):

==========  ========  ====================================================================
field       required  meaning
==========  ========  ====================================================================
id          no        unique string (an integer is read as its decimal string);
                      default: the 1-based line number
question    yes       the question text (non-empty string)
answer      yes       the reference: a math answer for ``boxed`` (an integer is accepted),
                      a letter ``A``–``Z`` for ``choice``
kind        yes       ``"boxed"``: compared with ``scoring.math_equal``;
                      ``"choice"``: the option letter must match
choices     no        ``choice`` only: 2–26 option strings, listed in the prompt as
                      ``A) ...``; ``answer`` must be the letter of one of them
system      no        a system message; without it the runner's default system prompt is used
instruction no        replaces the kind's default instruction at the end of the user turn;
                      ``""`` poses the question alone
==========  ========  ====================================================================

Example lines::

    {"id": "aime25-1", "question": "Find the sum of ...", "answer": "70", "kind": "boxed"}
    {"id": "gpqa-7", "question": "Which ...?", "choices": ["x", "y", "z", "w"], "answer": "C",
     "kind": "choice"}

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

KINDS = ("boxed", "choice")
FIELDS = ("id", "question", "answer", "kind", "choices", "system", "instruction")
REQUIRED = ("question", "answer", "kind")
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


def _text(value: Any, what: str, where: str, allow_int: bool = False) -> str:
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        kind = "a non-empty string" + (" or an integer" if allow_int else "")
        raise BenchError(f"{where}: {what} must be {kind}, got {value!r}")
    return value


def _question(obj: Any, where: str, path: Path, lineno: int) -> Question:
    if not isinstance(obj, dict):
        raise BenchError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - set(FIELDS))
    if unknown:
        raise BenchError(f"{where}: unknown field(s) {unknown}; the fields are {list(FIELDS)}")
    missing = [f for f in REQUIRED if f not in obj]
    if missing:
        raise BenchError(f"{where}: missing field(s) {missing}")
    kind = obj["kind"]
    if kind not in KINDS:
        raise BenchError(f"{where}: kind must be one of {list(KINDS)}, got {kind!r}")
    qid = _text(obj["id"], "id", where, allow_int=True) if "id" in obj else str(lineno)
    question = _text(obj["question"], "question", where)
    answer = _text(obj["answer"], "answer", where, allow_int=kind == "boxed").strip()
    choices = None
    if "choices" in obj:
        raw = obj["choices"]
        if kind != "choice":
            raise BenchError(f"{where}: choices are only allowed with kind 'choice'")
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
    return Question(qid, question, answer, kind, choices, system, str(path), lineno,
                    instruction)


def json_lines(text: str, path: Path) -> Iterator[tuple[int, str, Any]]:
    """``(line number, "file:line", parsed value)`` of each non-blank line of JSONL ``text``;
    a line that is not JSON is a ``BenchError`` naming ``file:line``."""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield lineno, where, json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from e


def load_benchmark(path: str | Path) -> Benchmark:
    """Reads and validates a benchmark JSONL file (see the module docstring for the schema).

    Raises ``BenchError`` naming ``file:line`` for bad JSON, a missing or unknown field, a value
    of the wrong type, a duplicate id or an answer letter outside the choices; and for a missing
    or empty file.
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
    first_line: dict[str, int] = {}
    for lineno, where, obj in json_lines(text, path):
        q = _question(obj, where, path, lineno)
        if q.id in first_line:
            raise BenchError(f"{where}: duplicate id {q.id!r} (first on line {first_line[q.id]})")
        first_line[q.id] = lineno
        questions.append(q)
    if not questions:
        raise BenchError(f"{path}: no questions (the file is empty)")
    return Benchmark(path.stem, path, tuple(questions), hashlib.sha256(raw).hexdigest())


def load_benchmarks(paths: Sequence[str | Path]) -> list[Benchmark]:
    """``load_benchmark`` for each path; two files with the same stem are refused, since the
    stem names their result files."""
    benches = [load_benchmark(p) for p in paths]
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

    A question's ``instruction`` replaces the default one (``""``: none). The letters named are
    those of the options (``A`` to ``Z`` when the question lists none, its
    text holding the options itself), e.g. "(A, B, C or D)" for four options.
    """
    if q.kind == "boxed":
        instruction = BOXED_INSTRUCTION if q.instruction is None else q.instruction
        return f"{q.question}\n{instruction}" if instruction else q.question
    parts = [q.question]
    letters = LETTERS[:len(q.choices)] if q.choices else LETTERS
    if q.choices:
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
    messages = [{"role": "system", "content": q.system}] if q.system is not None else []
    return [*messages, {"role": "user", "content": user_prompt(q)}]

"""The embedded default task: mixed column arithmetic (add, subtract, multiply by a digit) whose
worked solutions vary their wording at random.

``arith``'s addition in one fixed wording is too predictable for PIPO: the MTP head gets nearly
every second token right, so the confidence head never has to reject a draft. Here each line is
drawn from a few equivalent phrasings, so the token after a line break (and, because every
character is a token and pairs shift with line lengths, many second tokens of a pair) has real
entropy, while every phrasing still writes out the computation. Each line remains local — two
digits and a carry or borrow — so a tiny model can learn it on a CPU. Examples (``level`` 2,
seed 0; the same problems read differently with another seed)::

    Let's add 47 and 85.                  Let's take 47 from 85.
    7+5+0 gives 12; 2 down, carry 1       column: 15-7-0=8 -> 8, borrow 1
    column: 4+8+1=13 -> 3, carry 1        8-4-1 gives 3; 3 down, borrow 0
    carry out 1                           So 85-47=38.
    That makes 132.                       </think>
    </think>                              \\boxed{38}
    \\boxed{132}

    Column multiplication: 47*8.
    7*8+0=56+0=56, write 6, carry 5
    column: 4*8=32, +5=37 -> 7, carry 3
    carry out 3
    So the product is 376.
    </think>
    \\boxed{376}

A subtraction column whose top digit is too small shows it with the borrowed ten (``15-7-0``) and
passes ``borrow 1`` on; ``a >= b`` always, so no borrow is left at the end and leading zeros of
the written digits are dropped from the result. Multiplication is by one digit in 2..9.

The wording is drawn from a generator seeded by the data seed and the problem alone, so a problem
reads the same wherever it appears. Train and test are disjoint by a stable hash of the problem
(the operation and its operands, unordered for ``+`` and ``*``) that does not depend on the seed;
additions hash as ``arith.split_of`` does, so a test addition of one task is never a training
addition of the other. The verifier (``pipo_jax.eval.scoring.verify``) and chat messages
(``arith.to_messages``) are ``arith``'s.
"""

from __future__ import annotations

import hashlib
import re
import string

import numpy as np

from pipo_jax.config import MIXED_OPS
from pipo_jax.data.arith import SPLITS, TEST_ONE_IN

OPS = MIXED_OPS
SYMBOLS = {"add": "+", "sub": "-", "mul": "*"}
_OP_OF_SYMBOL = {s: op for op, s in SYMBOLS.items()}

# Equivalent phrasings of each kind of line, per operation; one is drawn per line. Fields:
# ``a``, ``b`` the operands (``b`` the digit for mul); per column ``x``, ``y`` its digits (the top
# digit plus the borrowed ten for sub), ``c`` the carry or borrow in, ``p`` the digit product
# (mul), ``s`` the column's value, ``w`` the digit written, ``o`` the carry or borrow out; ``n`` the
# result. All phrasings of a kind show the same numbers (a result line may add the operands), so
# each one carries the whole computation.
PHRASINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "add": {
        "open": ("Add {a} and {b} column by column.",
                 "Let's add {a} and {b}.",
                 "Adding {a} and {b}, right to left.",
                 "Column addition: {a}+{b}."),
        "column": ("{x}+{y}+{c}={s}, write {w}, carry {o}",
                   "{x}+{y}+{c}={s}, put {w}, carry {o}",
                   "{x}+{y}+{c}={s} -> {w}, carry {o}",
                   "{x}+{y}+{c}={s}; {w} down, carry {o}"),
        "carry": ("final carry {o}",
                  "last carry {o}",
                  "carry out {o}"),
        "result": ("So the sum is {n}.",
                   "The sum is {n}.",
                   "So {a}+{b}={n}.",
                   "That makes {n}."),
    },
    "sub": {
        "open": ("Subtract {b} from {a} column by column.",
                 "Let's take {b} from {a}.",
                 "Subtracting {b} from {a}, right to left.",
                 "Column subtraction: {a}-{b}."),
        "column": ("{x}-{y}-{c}={s}, write {w}, borrow {o}",
                   "{x}-{y}-{c}={s}, put {w}, borrow {o}",
                   "{x}-{y}-{c}={s} -> {w}, borrow {o}",
                   "{x}-{y}-{c}={s}; {w} down, borrow {o}"),
        "result": ("So the difference is {n}.",
                   "The difference is {n}.",
                   "So {a}-{b}={n}.",
                   "That leaves {n}."),
    },
    "mul": {
        "open": ("Multiply {a} by {b} column by column.",
                 "Let's multiply {a} by {b}.",
                 "Multiplying {a} by {b}, right to left.",
                 "Column multiplication: {a}*{b}."),
        "column": ("{x}*{y}+{c}={p}+{c}={s}, write {w}, carry {o}",
                   "{x}*{y}+{c}={p}+{c}={s}, put {w}, carry {o}",
                   "{x}*{y}+{c}={p}+{c}={s} -> {w}, carry {o}",
                   "{x}*{y}+{c}={p}+{c}={s}; {w} down, carry {o}"),
        "carry": ("final carry {o}",
                  "last carry {o}",
                  "carry out {o}"),
        "result": ("So the product is {n}.",
                   "The product is {n}.",
                   "So {a}*{b}={n}.",
                   "That makes {n}."),
    },
}

# Problems tried before a duplicate is accepted, and the bound on all draws for one problem
# (as in ``arith``: small levels have few distinct problems).
_MAX_DRAWS = 64
_MAX_TRIES = 100_000
# Keep the operand stream and the wording stream of one seed independent of each other and of
# ``arith``'s.
_PROBLEM_SALT = 0x3D1C
_WORDING_SALT = 0x7A0D
_BOXED = "\\boxed{"
_QUESTION = re.compile(r"What is (\d+) ([-+*]) (\d+)\?")


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")


def _check(op: str, a: int, b: int) -> None:
    _check_op(op)
    if a < 0 or b < 0:
        raise ValueError(f"operands must be non-negative, got {a} and {b}")
    if op == "sub" and a < b:
        raise ValueError(f"sub needs a >= b (results are never negative), got {a} - {b}")
    if op == "mul" and not 0 <= b <= 9:
        raise ValueError(f"mul multiplies by one digit, got {a} * {b}")


def _key(op: str, a: int, b: int) -> str:
    """The problem's identity for the split hash: ``+`` and ``*`` are unordered."""
    if op == "sub":
        return f"{a}-{b}"
    lo, hi = min(a, b), max(a, b)
    # The same string as ``arith.split_of``'s, so additions split alike in both tasks.
    return f"{lo}{SYMBOLS[op]}{hi}"


def split_of(op: str, a: int, b: int) -> str:
    """The split that owns the problem ``a <op> b``: stable across runs and seeds (``a + b``
    and ``b + a`` share one, as do ``a * b`` and ``b * a``)."""
    _check_op(op)
    return "test" if _digest(_key(op, a, b)) % TEST_ONE_IN == 0 else "train"


def question(op: str, a: int, b: int) -> str:
    """The user message that poses ``a <op> b`` (one fixed form, so that it parses back)."""
    return f"What is {a} {SYMBOLS[op]} {b}?"


def parse_question(text: str) -> tuple[str, int, int]:
    """``question``'s inverse: ``(op, a, b)``."""
    m = _QUESTION.fullmatch(text)
    if m is None:
        raise ValueError(f"not a mixed-task question: {text!r}")
    return _OP_OF_SYMBOL[m.group(2)], int(m.group(1)), int(m.group(3))


def _columns(op: str, a: int, b: int) -> tuple[list[dict[str, int]], int]:
    """Column fields (``x y c p s w o``) from the rightmost column, and the carry left at the end
    (0 for sub)."""
    cols: list[dict[str, int]] = []
    carry = 0
    if op == "mul":
        for ch in reversed(str(a)):
            x = int(ch)
            p = x * b
            s = p + carry
            cols.append({"x": x, "y": b, "c": carry, "p": p, "s": s, "w": s % 10, "o": s // 10})
            carry = s // 10
        return cols, carry
    width = max(len(str(a)), len(str(b)))
    for ca, cb in zip(reversed(str(a).zfill(width)), reversed(str(b).zfill(width)), strict=True):
        x, y = int(ca), int(cb)
        if op == "add":
            s = x + y + carry
            cols.append({"x": x, "y": y, "c": carry, "s": s, "w": s % 10, "o": s // 10})
            carry = s // 10
        else:
            borrow = int(x - y - carry < 0)
            s = x + 10 * borrow - y - carry
            cols.append({"x": x + 10 * borrow, "y": y, "c": carry, "s": s, "w": s, "o": borrow})
            carry = borrow
    return cols, carry


def _result(op: str, a: int, b: int) -> int:
    return a + b if op == "add" else a - b if op == "sub" else a * b


def worked_solution(op: str, a: int, b: int, seed: int = 0) -> tuple[str, str]:
    """Returns ``(response, answer)`` for ``a <op> b``, ending in ``</think>\\n\\boxed{answer}``.

    ``a >= b`` for sub; ``b`` is one digit for mul. The phrasing of every line is drawn from a
    generator seeded by ``seed`` and the problem, so the same ``(op, a, b, seed)`` always reads
    the same.
    """
    _check(op, a, b)
    rng = np.random.default_rng([_WORDING_SALT, seed, _digest(f"{a}{SYMBOLS[op]}{b}")])
    forms = PHRASINGS[op]

    def line(kind: str, **fields: int) -> str:
        options = forms[kind]
        return options[int(rng.integers(len(options)))].format(a=a, b=b, **fields)

    cols, carry = _columns(op, a, b)
    answer = str(_result(op, a, b))
    lines = [line("open")]
    lines.extend(line("column", **col) for col in cols)
    if "carry" in forms:
        lines.append(line("carry", o=carry))
    lines.append(line("result", n=int(answer)))
    lines.append("</think>")
    lines.append(f"{_BOXED}{answer}}}")
    return "\n".join(lines), answer


def _sample(rng: np.random.Generator, op: str, level: int) -> tuple[int, int]:
    if not 1 <= level <= 12:
        raise ValueError(f"level must be a digit count in 1..12, got {level}")
    low, high = 10 ** (level - 1), 10**level
    if op == "mul":
        return int(rng.integers(low, high)), int(rng.integers(2, 10))
    a, b = (int(v) for v in rng.integers(low, high, size=2))
    return (max(a, b), min(a, b)) if op == "sub" else (a, b)


def _problem(op: str, a: int, b: int, level: int, seed: int) -> dict:
    response, answer = worked_solution(op, a, b, seed)
    return {"question": question(op, a, b), "response": response, "answer": answer,
            "level": level}


def make_problem(rng: np.random.Generator, level: int, ops: tuple[str, ...] = OPS,
                 seed: int = 0) -> dict:
    """One random problem (either split): an operation of ``ops`` on ``level``-digit operands
    (for mul: a ``level``-digit number times a digit in 2..9), worded with ``seed``.

    Returns a dict with ``question`` (str, the user message), ``response`` (str, the worked
    solution ending in ``\\boxed{answer}``), ``answer`` (str) and ``level`` (int).
    """
    op = ops[int(rng.integers(len(ops)))]
    _check_op(op)
    return _problem(op, *_sample(rng, op, level), level, seed)


def generate_split(split: str, seed: int, n: int, levels: tuple[int, ...],
                   ops: tuple[str, ...] = OPS) -> list[dict]:
    """``n`` problems of ``split``, deterministic in ``(split, seed, n, levels, ops)``.

    Problem ``i`` has level ``levels[i % L]`` and operation ``ops[(i // L) % len(ops)]``
    (``L = len(levels)``), so every (level, operation) combination is equally common, also among
    the first few problems. Problems owned by the other split are skipped; duplicates within the
    split are avoided unless a combination runs out of fresh problems.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not levels or not ops:
        raise ValueError("levels and ops must not be empty")
    for op in ops:
        _check_op(op)
    rng = np.random.default_rng([seed, SPLITS.index(split), _PROBLEM_SALT])
    seen: set[tuple[str, int, int]] = set()
    out: list[dict] = []
    for i in range(n):
        level, op = levels[i % len(levels)], ops[(i // len(levels)) % len(ops)]
        fresh_draws = 0
        for _ in range(_MAX_TRIES):
            a, b = _sample(rng, op, level)
            if split_of(op, a, b) != split:
                continue
            fresh_draws += 1
            if (op, a, b) not in seen or fresh_draws >= _MAX_DRAWS:
                break
        else:
            raise RuntimeError(f"level {level} has no {split} problems for {op}")
        seen.add((op, a, b))
        out.append(_problem(op, a, b, level, seed))
    return out


def line_pattern(template: str) -> re.Pattern[str]:
    """A regex that matches the lines ``template`` writes, one named group of digits per field
    (a field used twice must repeat the same number): for reading worked solutions back."""
    parts: list[str] = []
    seen: set[str] = set()
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is None:
            continue
        parts.append(f"(?P={field})" if field in seen else f"(?P<{field}>\\d+)")
        seen.add(field)
    return re.compile("".join(parts))

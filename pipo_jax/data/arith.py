"""A procedurally generated reasoning task: column addition with a worked solution.

Each problem adds two ``level``-digit numbers. The response walks the columns from the right, one
line per column, so that every line depends only on two operand digits and the previous carry: a
tiny transformer trained for minutes on a CPU can learn it, and the fixed wording gives PIPO's
multi-token drafts plenty of predictable tokens. Example (``level`` 2)::

    Add 47 and 85 column by column.
    7+5+0=12, write 2, carry 1
    4+8+1=13, write 3, carry 1
    final carry 1
    So the sum is 132.
    </think>
    \\boxed{132}

The ``<think>\\n`` that opens the reasoning belongs to the prompt (``Tokenizer.think_prefix``), so
it is not part of ``response``. Everything here is pure Python + numpy and deterministic from a
seed. Train and test are disjoint: each unordered operand pair belongs to exactly one split, by a
stable hash that does not depend on the seed, so no seed can leak a test problem into training.
"""

from __future__ import annotations

import hashlib

import numpy as np

SYSTEM_PROMPT = "Solve step by step."

SPLITS = ("train", "test")
# One operand pair in TEST_ONE_IN goes to the test split; the rest are training problems.
TEST_ONE_IN = 10
# Fresh draws tried before a duplicate is accepted: small levels have few distinct problems
# (level 2: ~7,300 training pairs), so a large split cannot always be duplicate-free.
_MAX_DRAWS = 64
# Bound on all draws for one problem, so that a level without problems in a split fails loudly.
_MAX_TRIES = 100_000
_BOXED = "\\boxed{"


def split_of(a: int, b: int) -> str:
    """The split that owns the problem ``a + b`` (and ``b + a``): stable across runs and seeds."""
    lo, hi = min(a, b), max(a, b)
    digest = hashlib.blake2b(f"{lo}+{hi}".encode(), digest_size=8).digest()
    return "test" if int.from_bytes(digest, "little") % TEST_ONE_IN == 0 else "train"


def _sample_operands(rng: np.random.Generator, level: int) -> tuple[int, int]:
    if not 1 <= level <= 12:
        raise ValueError(f"level must be a digit count in 1..12, got {level}")
    low, high = 10 ** (level - 1), 10**level
    a, b = rng.integers(low, high, size=2)
    return int(a), int(b)


def worked_solution(a: int, b: int) -> tuple[str, str]:
    """Returns ``(response, answer)`` for ``a + b`` (non-negative ints), ending in ``\\boxed{}``."""
    if a < 0 or b < 0:
        raise ValueError(f"operands must be non-negative, got {a} and {b}")
    width = max(len(str(a)), len(str(b)))
    da, db = str(a).zfill(width), str(b).zfill(width)
    lines = [f"Add {a} and {b} column by column."]
    carry = 0
    for x, y in zip(reversed(da), reversed(db), strict=True):
        s = int(x) + int(y) + carry
        lines.append(f"{x}+{y}+{carry}={s}, write {s % 10}, carry {s // 10}")
        carry = s // 10
    answer = str(a + b)
    lines.append(f"final carry {carry}")
    lines.append(f"So the sum is {answer}.")
    lines.append("</think>")
    lines.append(f"{_BOXED}{answer}}}")
    return "\n".join(lines), answer


def _problem(a: int, b: int, level: int) -> dict:
    response, answer = worked_solution(a, b)
    return {"question": f"What is {a} + {b}?", "response": response, "answer": answer,
            "level": level}


def make_problem(rng: np.random.Generator, level: int) -> dict:
    """One random problem of ``level``-digit operands (either split).

    Returns a dict with ``question`` (str, the user message), ``response`` (str, the worked
    solution ending in ``\\boxed{answer}``), ``answer`` (str) and ``level`` (int).
    """
    a, b = _sample_operands(rng, level)
    return _problem(a, b, level)


def generate_split(split: str, seed: int, n: int, levels: tuple[int, ...]) -> list[dict]:
    """``n`` problems of ``split``, deterministic in ``(split, seed, n, levels)``.

    Problem ``i`` has level ``levels[i % len(levels)]``. Problems owned by the other split are
    skipped; duplicates within the split are avoided unless a level runs out of fresh problems.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not levels:
        raise ValueError("levels must not be empty")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    seen: set[tuple[int, int]] = set()
    out: list[dict] = []
    for i in range(n):
        level = levels[i % len(levels)]
        fresh_draws = 0
        for _ in range(_MAX_TRIES):
            a, b = _sample_operands(rng, level)
            if split_of(a, b) != split:
                continue
            fresh_draws += 1
            if (a, b) not in seen or fresh_draws >= _MAX_DRAWS:
                break
        else:
            raise RuntimeError(f"level {level} has no {split} problems")
        seen.add((a, b))
        out.append(_problem(a, b, level))
    return out


def to_messages(example: dict) -> list[dict[str, str]]:
    """The chat messages (system + user) that pose ``example``'s question."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": str(example["question"])}]

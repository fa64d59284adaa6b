"""Answer extraction and checking for benchmark responses (pure Python, no model).

Extraction. The answer is the content of the LAST ``\\boxed{...}`` or ``\\fbox{...}`` (braces
matched, so ``\\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``), or the first word after
``\\boxed `` (``\\boxed 5`` gives ``5``). When the response closes its reasoning with
``</think>``, the text after the last ``</think>`` is searched first and the whole response only
if that part has no box: a box inside the reasoning is a draft, the one after it the answer.
A last box whose braces never close (a response cut off by the token budget) gives no answer.

Multiple choice. The letter comes from the box (``C``, ``(C)``, ``C) text``, ``\\text{C}``),
or, when there is no usable box, from the answer part of the response: the last
``answer: C`` / ``answer is (C)``, else a ``(C)`` that ends the response, else a last line that
is just the letter. Only letters of the question's options count.

Math answers (``math_equal``) are checked by ``math-verify`` (Hugging Face; the checker of
open-r1 and lighteval): each side is wrapped as ``\\boxed{..}``, parsed to a sympy object, and
the two compared symbolically and numerically (fractions, ``\\dfrac``, decimals, thousands
separators, percentages, units in ``\\text{}``, intervals, sets in any order, ``x = 5`` against
``5``, algebraically equal forms such as ``2\\sqrt{2}`` and ``\\sqrt{8}``). Before that, ``$``
delimiters and one trailing period are removed and identical strings are equal at once (no
sympy: the embedded task's integer answers never reach the parser when right).

Bounded time: a pathological answer (``9^{9^{9^{9}}}``) cannot hang an evaluation. Parsing and
comparison each run under ``math-verify``'s own timeout (``timeout_s``, default 5 s), which uses
``SIGALRM`` and so works only in the main thread; in another thread the timeout cannot be set,
and the length cap (``MAX_ANSWER_CHARS``: longer answers are compared as strings only) is the
guard. A timed-out or unparsable comparison is "not equal".
"""

from __future__ import annotations

import re
import threading

from pipo_jax.eval.latex import braced
from pipo_jax.io.tokenizer import THINK_END

MAX_ANSWER_CHARS = 1000
TIMEOUT_S = 5

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{")


# ------------------------------------------------------------------------------ extraction


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{..}`` / ``\\fbox{..}`` / ``\\boxed x`` in ``text``, or None.

    A ``\\boxed`` followed by neither a brace nor a word (e.g. at the very end) is skipped in
    favour of an earlier box; a last box whose brace group is unbalanced gives None.
    """
    for m in reversed(list(_BOX.finditer(text))):
        j = m.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            return braced(text, j)
        if j > m.end():  # "\boxed 5": the word after the space, up to whitespace or "$"
            word = re.match(r"[^\s$]+", text[j:])
            if word:
                return word.group(0)
    return None


def answer_part(text: str) -> str:
    """The text after the last ``</think>``, or all of ``text`` when the reasoning never closed."""
    i = text.rfind(THINK_END)
    return text if i < 0 else text[i + len(THINK_END):]


def extract_boxed_answer(text: str) -> str | None:
    """The final boxed answer of a response: after ``</think>`` first, else anywhere."""
    found = last_boxed(answer_part(text))
    return found if found is not None else last_boxed(text)


def _letters(num_choices: int | None) -> str:
    n = 26 if num_choices is None else num_choices
    return "".join(chr(ord("A") + i) for i in range(n))


def _strip_wrappers(s: str) -> str:
    """``\\text{X}`` → ``X`` (repeatedly, innermost groups kept intact)."""
    while True:
        m = _TEXT_WRAPPER.search(s)
        if not m:
            return s
        inner = braced(s, m.end() - 1)
        if inner is None:  # unbalanced: drop just the command
            return s[:m.start()] + s[m.end():]
        s = s[:m.start()] + inner + s[m.end() + len(inner) + 1:]


def extract_choice(text: str, num_choices: int | None = None) -> str | None:
    """The option letter a response picks (``"A"``..), or None; see the module docstring."""
    letters = _letters(num_choices)
    boxed = extract_boxed_answer(text)
    if boxed is not None:
        m = re.match(rf"^\s*\(?\s*([{letters}])\s*(?:[).:]|\s|$)",
                     _strip_wrappers(boxed).replace("*", "").strip())
        if m:
            return m.group(1)
    part = answer_part(text).replace("*", "")  # markdown bold around "Answer: **C**"
    hits = re.findall(rf"(?i:answer)\s*(?:(?i:is)\s*)?[:：]?\s*\(?\s*([{letters}])\s*\)?"
                      r"(?![A-Za-z0-9])", part)
    if hits:
        return hits[-1]
    m = re.search(rf"\(([{letters}])\)[\s.]*$", part)
    if m:
        return m.group(1)
    lines = [line.strip() for line in part.splitlines() if line.strip()]
    if lines:
        m = re.fullmatch(rf"\(?([{letters}])\)?\.?", lines[-1])
        if m:
            return m.group(1)
    return None


# ------------------------------------------------------------------------------ math


def _clean(answer: str) -> str:
    s = answer.strip()
    if len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s.strip("$").strip()
    return s[:-1].rstrip() if s.endswith(".") else s


def math_equal(predicted: str, reference: str, timeout_s: int = TIMEOUT_S) -> bool:
    """Whether two math answers (box contents) are equal, by ``math-verify`` (module docstring).

    Args:
      predicted: the model's answer, e.g. ``"\\dfrac{1}{2}"``.
      reference: the reference answer, e.g. ``"0.5"``.
      timeout_s: seconds each of parsing and comparing may take (main thread only).
    """
    a, b = _clean(predicted), _clean(reference)
    if a == b:
        return bool(a)
    if not a or not b or max(len(a), len(b)) > MAX_ANSWER_CHARS:
        return False
    # Imported here: sympy and the LaTeX grammar cost about a second, which the embedded task's
    # right answers (equal strings) never pay.
    from math_verify import parse, verify

    t = timeout_s if threading.current_thread() is threading.main_thread() else None
    try:
        gold = parse(f"\\boxed{{{b}}}", parsing_timeout=t)
        pred = parse(f"\\boxed{{{a}}}", parsing_timeout=t)
        return bool(gold) and bool(pred) and bool(verify(gold, pred, timeout_seconds=t))
    except Exception:  # math-verify raises for inputs its grammar rejects: not equal
        return False


def score(text: str, kind: str, reference: str,
          num_choices: int | None = None) -> tuple[str | None, bool]:
    """``(extracted answer or None, correct)`` of one response.

    Args:
      text: the model's response (PAD and EOS removed).
      kind: ``"boxed"`` (math, compared with ``math_equal``) or ``"choice"`` (an option letter).
      reference: the reference answer (a letter for ``"choice"``).
      num_choices: how many options a choice question lists (None: any letter A–Z).
    """
    if kind == "boxed":
        found = extract_boxed_answer(text)
        return found, found is not None and math_equal(found, reference)
    if kind == "choice":
        letter = extract_choice(text, num_choices)
        return letter, letter is not None and letter == reference.strip().upper()
    raise ValueError(f"kind must be 'boxed' or 'choice', got {kind!r}")


def verify(text: str, answer: str) -> bool:
    """Whether a response's final boxed answer equals ``answer`` (``score`` of kind ``boxed``):
    the check of the embedded task's held-out evaluation and OPD's rollout accuracy."""
    return score(text, "boxed", answer)[1]

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

Math normalisation (``normalize_math``), applied to both sides before comparing:

- ``\\text{..}``, ``\\textbf{..}``, ``\\mathrm{..}`` and ``\\mbox{..}`` become their content;
- ``$``, whitespace, ``\\left``, ``\\right`` and the spacing commands ``\\!`` ``\\,`` ``\\;``
  ``\\:`` are removed, as are a degree sign (``^\\circ``, ``^{\\circ}``) and one trailing period;
- ``\\dfrac`` and ``\\tfrac`` become ``\\frac``; ``\\frac12`` becomes ``\\frac{1}{2}`` and
  ``\\sqrt2`` becomes ``\\sqrt{2}``;
- a single leading ``x=`` (one variable name) is dropped, so ``x=5`` matches ``5``;
- thousands separators in a plain number (``1,000``, ``1{,}000``) are removed;
- an integer loses its ``+`` sign and leading zeros (``007`` is ``7``).

Two answers are equal when the normalised strings are equal, or when both parse as numbers
(decimals, ``a/b`` and ``\\frac{a}{b}`` with numeric ``a``, ``b``, optionally negated) that agree
within a relative tolerance of 1e-9.

What it does NOT handle (deliberately modest; no sympy): algebraic equivalence
(``2\\sqrt{2}`` vs ``\\sqrt{8}``, ``x+1`` vs ``1+x``), units (``5\\text{ cm}`` vs ``5``
normalises to ``5cm``), percentages (``50\\%`` vs ``0.5``), intervals, sets and tuples in a
different order, matrices, multiple answers, and numbers written in words.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from pipo_jax.eval.latex import braced
from pipo_jax.io.tokenizer import THINK_END

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{")
_SPACING = re.compile(r"\\left(?![A-Za-z])|\\right(?![A-Za-z])|\\[!,;:]|\s+|\$")
_DEGREE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?")
_FRAC_SHORT = re.compile(r"\\frac(\d)(\d)")
_FRAC_HALF_SHORT = re.compile(r"\\frac\{([^{}]*)\}(\d)")
_SQRT_SHORT = re.compile(r"\\sqrt(\d)")
_ASSIGNMENT = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?=(?!=)(.+)$")
_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(?:(?:,|\{,\})\d{3})+(?:\.\d+)?$")
_INTEGER = re.compile(r"^[+-]?\d+$")
_DECIMAL = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")
_NUM = r"\d+(?:\.\d+)?"
_SLASH_FRAC = re.compile(rf"^([+-]?{_NUM})/({_NUM})$")
_TEX_FRAC = re.compile(rf"^([+-]?)\\frac\{{([+-]?{_NUM})\}}\{{([+-]?{_NUM})\}}$")
REL_TOL = 1e-9

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


# --------------------------------------------------------------------------- normalisation


def normalize_math(answer: str) -> str:
    """Canonical string form of a math answer (the rules are in the module docstring)."""
    s = _strip_wrappers(answer.strip())
    s = _DEGREE.sub("", s)
    s = _SPACING.sub("", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", s)
    s = _FRAC_HALF_SHORT.sub(r"\\frac{\1}{\2}", s)
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    s = s[:-1] if s.endswith(".") else s
    m = _ASSIGNMENT.match(s)
    if m and "=" not in m.group(1):
        s = m.group(1)
    if _THOUSANDS.match(s):
        s = s.replace("{,}", "").replace(",", "")
    if _INTEGER.match(s):
        s = str(int(s))
    return s


def to_number(normalized: str) -> Fraction | None:
    """The value of a normalised answer that is a plain number or a numeric fraction, else None.

    Integers, decimals and fractions are exact (``Fraction``); None also for a zero denominator.
    """
    s = normalized
    try:
        if _DECIMAL.match(s):
            return Fraction(s)
        m = _SLASH_FRAC.match(s)
        if m:
            num, den = Fraction(m.group(1)), Fraction(m.group(2))
            return num / den if den else None
        m = _TEX_FRAC.match(s)
        if m:
            num, den = Fraction(m.group(2)), Fraction(m.group(3))
            if not den:
                return None
            return -num / den if m.group(1) == "-" else num / den
    except (ValueError, ZeroDivisionError):
        return None
    return None


def math_equal(predicted: str, reference: str) -> bool:
    """Whether two math answers agree after ``normalize_math`` (string or numeric equality)."""
    a, b = normalize_math(predicted), normalize_math(reference)
    if a == b:
        return True
    x, y = to_number(a), to_number(b)
    if x is None or y is None:
        return False
    if x == y:
        return True
    try:
        return math.isclose(float(x), float(y), rel_tol=REL_TOL)
    except OverflowError:  # beyond float range: only exact equality (above) counts
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

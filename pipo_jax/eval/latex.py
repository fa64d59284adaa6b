"""Small LaTeX text helpers shared by the answer checkers (the embedded task's and the
benchmarks')."""

from __future__ import annotations


def braced(text: str, open_at: int) -> str | None:
    """Content of the brace group opening at ``text[open_at] == "{"``, nested groups kept; None
    if it never closes."""
    depth = 0
    for j in range(open_at, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1:j]
    return None

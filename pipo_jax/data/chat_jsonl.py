"""Chat trajectories in JSONL: finding the files, validating each line, and the token ids of one
conversation.

One line is one trajectory::

    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "What is 2 + 3?"},
                  {"role": "assistant", "content": "<think>\\n2 + 3 = 5.\\n</think>\\n\\n5"}]}

Roles are ``system``, ``user`` and ``assistant``; every ``content`` is a string; other keys (an
``id``, a message ``name``…) are ignored. The LAST message is the assistant turn that is trained
on (the loss mask covers only it); every earlier message forms the prompt, rendered by the run's
chat template and followed by ``<think>\\n`` (``Tokenizer.think_prefix``).

Where the final turn's reasoning is, three conventions are accepted:

(a) in ``content``, opened by ``<think>`` and closed by ``</think>``: the opening tag (and one
    newline after it) is dropped, since the prompt already ends with ``<think>\\n``; the rest is
    the response verbatim. Content that holds ``</think>`` without an opening tag is taken as
    reasoning whose ``<think>`` was in the generation prompt, and kept verbatim.
(b) in a ``reasoning_content`` field of the assistant message: the response is
    ``reasoning + "\\n</think>\\n\\n" + content`` (with the Qwen3 template's trimming: newlines
    around the reasoning and before the content are stripped).
(c) no reasoning at all: the response is an empty think block, ``"\\n</think>\\n\\n" + content``,
    exactly what the Qwen3 template renders for a final assistant turn without reasoning (its
    ``<think>\\n\\n</think>\\n\\n`` prefix, whose first ``<think>\\n`` is the prompt's).

Earlier assistant turns lose their reasoning (the text up to the last ``</think>``, and any
``reasoning_content``), as the Qwen3 template renders past turns.

Every ``content`` is text: a special token's string in it (``<|im_end|>``, ``<|pad|>``…) is
tokenized as characters, never as a control id (``Tokenizer.encode``). The one exception is the
``</think>`` that ends the final turn's reasoning: the first one in (a), the separator in (b) and
(c) (``Conversation.think_end``). Any other ``</think>`` is text, and so is a ``<think>`` that
does not open the final turn's content (only an opening one makes a think block).

A line that breaks these rules is malformed: ``MalformedLines`` either raises ``ChatDataError``
naming the file, the 1-based line number and the reason, or counts and skips it. Blank lines are
ignored.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from pipo_jax.errors import ChatDataError
from pipo_jax.io.tokenizer import (
    ROLES,
    THINK,
    THINK_END,
    Tokenizer,
    reasoning_prompt,
    response_ids,
)

log = logging.getLogger(__name__)

# What closes the reasoning and opens the answer (Qwen3 template).
ANSWER_SEPARATOR = "\n" + THINK_END + "\n\n"
_GLOB_CHARS = frozenset("*?[")
# Malformed lines named in the log when they are skipped.
_LOGGED_SKIPS = 5


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One trajectory split into what is masked and what is trained on."""

    where: str  # "path:line", for error messages
    prompt: tuple[dict[str, str], ...]  # messages before the final assistant turn
    response: str  # the final turn's text after the prompt's ``<think>\n``
    # Where in ``response`` the ``</think>`` that ends the reasoning starts; the others are text.
    think_end: int


class MalformedLines:
    """Applies ``data.on_malformed`` to bad lines: raise (``"error"``) or count and skip them."""

    def __init__(self, on_malformed: Literal["error", "skip"]) -> None:
        if on_malformed not in ("error", "skip"):
            raise ValueError(f"on_malformed must be 'error' or 'skip', got {on_malformed!r}")
        self.on_malformed = on_malformed
        self.skipped = 0

    def handle(self, where: str, reason: str) -> None:
        """Raises ``ChatDataError`` for ``where`` ("path:line"), or counts a skipped line."""
        if self.on_malformed == "error":
            raise ChatDataError(f"{where}: {reason} (set data.on_malformed=skip to skip and count "
                                "such lines)")
        self.skipped += 1
        if self.skipped <= _LOGGED_SKIPS:
            log.warning("skipping malformed line %s: %s", where, reason)


def resolve_files(patterns: Sequence[str]) -> list[Path]:
    """``data.train_files`` → existing files, in the order given (a glob's matches sorted),
    without duplicates.

    Raises:
      ChatDataError: no patterns, a path that is not a file, or a glob that matches no file.
    """
    if not patterns:
        raise ChatDataError("data.train_files is empty; list the JSONL files (or glob patterns) "
                            "to train on")
    files: list[Path] = []
    for pattern in patterns:
        expanded = str(Path(pattern).expanduser())
        if _GLOB_CHARS & set(expanded):
            matches = sorted(Path(m) for m in glob.glob(expanded, recursive=True)
                             if Path(m).is_file())
            if not matches:
                raise ChatDataError(f"data.train_files pattern {pattern!r} matches no file")
        else:
            path = Path(expanded)
            if not path.is_file():
                what = "is a directory, not a file" if path.is_dir() else "does not exist"
                raise ChatDataError(f"data.train_files entry {pattern!r} {what} (working "
                                    f"directory {Path.cwd()})")
            matches = [path]
        files.extend(m.absolute() for m in matches)
    return list(dict.fromkeys(files))


class _Malformed(ValueError):
    """A line that breaks the schema; the message is the reason."""


def _strip_reasoning(content: str) -> str:
    # Past assistant turns: the Qwen3 template keeps only the answer after the last </think>.
    if THINK_END in content:
        return content.rsplit(THINK_END, 1)[1].lstrip("\n")
    return content


def _response(message: dict) -> tuple[str, int]:
    """The final assistant message → the text after the prompt's ``<think>\\n``, and where in it
    the ``</think>`` that ends the reasoning starts."""
    content = message["content"]
    reasoning = message.get("reasoning_content")
    if reasoning is not None:
        if not isinstance(reasoning, str):
            raise _Malformed("the final assistant turn's reasoning_content must be a string, "
                             f"got {type(reasoning).__name__}")
        if content.lstrip().startswith(THINK):
            # Tags elsewhere in the answer are text; a think block opening it is a second
            # copy of the reasoning.
            raise _Malformed("the final assistant turn has both reasoning_content and a <think> "
                             "block in its content; keep one")
        if not reasoning.strip() and not content.strip():
            raise _Malformed("the final assistant turn is empty")
        # The separator's </think> is the structural one even if the reasoning holds another.
        reasoning = reasoning.strip("\n")
        return (reasoning + ANSWER_SEPARATOR + content.lstrip("\n"),
                len(reasoning) + ANSWER_SEPARATOR.index(THINK_END))
    if not content.strip():
        raise _Malformed("the final assistant turn is empty")
    if THINK_END in content:
        body = content.lstrip()
        if body.startswith(THINK):
            body = body[len(THINK):]
            body = body[1:] if body.startswith("\n") else body
            return body, body.index(THINK_END)
        return content, content.index(THINK_END)
    if content.lstrip().startswith(THINK):
        raise _Malformed("the final assistant turn opens <think> but never closes it with "
                         "</think>")
    return ANSWER_SEPARATOR + content.lstrip("\n"), ANSWER_SEPARATOR.index(THINK_END)


def parse_conversation(text: str, where: str = "<line>") -> Conversation:
    """One JSONL line → a ``Conversation``.

    Raises:
      ValueError: the line is malformed; the message says why (without ``where``).
    """
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise _Malformed(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise _Malformed(f"a line must be a JSON object with a 'messages' list, got "
                         f"{type(record).__name__}")
    messages = record.get("messages")
    if messages is None:
        raise _Malformed("no 'messages' key")
    if not isinstance(messages, list) or not messages:
        raise _Malformed("'messages' must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _Malformed(f"messages[{i}] must be an object, got {type(m).__name__}")
        if m.get("role") not in ROLES:
            raise _Malformed(f"messages[{i}] has role {m.get('role')!r}; expected one of "
                             f"{', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            got = "no content" if "content" not in m else type(m["content"]).__name__
            raise _Malformed(f"messages[{i}] content must be a string, got {got}")
    if messages[-1]["role"] != "assistant":
        raise _Malformed("the last message must be the assistant turn to train on, got role "
                         f"{messages[-1]['role']!r}")
    prompt = tuple({"role": m["role"],
                    "content": _strip_reasoning(m["content"]) if m["role"] == "assistant"
                    else m["content"]} for m in messages[:-1])
    response, think_end = _response(messages[-1])
    return Conversation(where=where, prompt=prompt, response=response, think_end=think_end)


def iter_conversations(files: Sequence[Path], malformed: MalformedLines) -> Iterator[Conversation]:
    """The conversations of ``files`` in order; malformed lines go to ``malformed``.

    Blank lines are ignored; a line that is not UTF-8 is malformed.
    """
    for path in files:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    conversation = parse_conversation(raw.decode("utf-8"), where)
                except UnicodeDecodeError as e:
                    malformed.handle(where, f"not UTF-8 text ({e.reason} at byte {e.start})")
                    continue
                except _Malformed as e:
                    malformed.handle(where, str(e))
                    continue
                yield conversation


def conversation_ids(tokenizer: Tokenizer, prompt: Sequence[dict[str, str]], response: str,
                     think_end: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids of one training example: ``(prompt_ids, response_ids)``.

    The prompt is the chat template of ``prompt``'s messages with the assistant header, followed by
    ``<think>\\n``; the response is ``response`` (the text after it) followed by EOS. All message
    text is encoded as text; only the template's tokens and the ``</think>`` at ``think_end``
    (default: the first in ``response``) are control ids (``response_ids``).
    """
    return (reasoning_prompt(tokenizer, prompt),
            response_ids(tokenizer, response, think_end) + [tokenizer.eos_id])

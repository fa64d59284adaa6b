"""Tokenizers: a byte-level tokenizer with chat and thinking special tokens.

Everything else in pipo-jax sees only the ``Tokenizer`` protocol, so that a Hugging Face
``tokenizer.json`` can be plugged in later without touching the model, data or decode code.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

# Chat roles, in the order the template writes them.
ROLES = ("system", "user", "assistant")


@runtime_checkable
class Tokenizer(Protocol):
    """What pipo-jax needs from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        """Text → ids; special-token strings (``<think>``…) map to their single ids."""

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Ids → text. PAD is never shown; other specials only when ``skip_special`` is False."""

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Ids of a conversation followed by the assistant header (the generation prompt)."""

    def think_prefix(self) -> list[int]:
        """Ids that open the assistant's reasoning (``<think>\\n``)."""


class ByteTokenizer:
    """UTF-8 bytes plus a small set of special tokens.

    Ids ``0 … N_SPECIAL-1`` are special tokens; byte ``b`` is id ``N_SPECIAL + b``.
    """

    SPECIALS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>",
                "<|end|>", "<think>", "</think>")
    N_SPECIAL = 16  # room for more specials without renumbering the bytes

    def __init__(self) -> None:
        self.vocab_size = self.N_SPECIAL + 256
        self._special_ids = {s: i for i, s in enumerate(self.SPECIALS)}
        self.pad_id = self._special_ids["<|pad|>"]
        self.bos_id = self._special_ids["<|bos|>"]
        self.eos_id = self._special_ids["<|eos|>"]
        self.end_id = self._special_ids["<|end|>"]
        self.think_id = self._special_ids["<think>"]
        self.think_end_id = self._special_ids["</think>"]
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.SPECIALS) + ")")

    def token_id(self, special: str) -> int:
        return self._special_ids[special]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in self._split.split(text):
            if not piece:
                continue
            if piece in self._special_ids:
                ids.append(self._special_ids[piece])
            else:
                ids.extend(self.N_SPECIAL + b for b in piece.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        out = bytearray()
        for i in ids:
            i = int(i)
            if i == self.pad_id:
                continue
            if i < self.N_SPECIAL:
                if not skip_special and i < len(self.SPECIALS):
                    out.extend(self.SPECIALS[i].encode())
            elif i < self.vocab_size:
                out.append(i - self.N_SPECIAL)
            else:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return out.decode("utf-8", errors="replace")

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        ids = [self.bos_id]
        for m in messages:
            role = m.get("role")
            if role not in ROLES:
                raise ValueError(f"chat message role must be one of {ROLES}, got {role!r}")
            ids.append(self._special_ids[f"<|{role}|>"])
            ids.extend(self.encode(m["content"]))
            ids.append(self.end_id)
        ids.append(self._special_ids["<|assistant|>"])
        return ids

    def think_prefix(self) -> list[int]:
        return [self.think_id] + self.encode("\n")

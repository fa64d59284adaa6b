"""Tokenizers: a byte-level tokenizer and a Hugging Face ``tokenizer.json`` one, both with chat and
thinking special tokens.

Everything else in pipo-jax sees only the ``Tokenizer`` protocol, so the model, data and decode
code do not care which one a run uses. ``load_tokenizer`` turns a config string (``"byte"`` or a
path) into one.

Text is always encoded as text: ``encode`` never turns a special token's string (``<|pad|>``,
``<|im_end|>``, ``<think>``…) into its control id. Prompts, chat-JSONL data and benchmark files
are written by users, and a control id inside them would forge a chat turn or put a PAD inside
the pair sequence. Control ids are placed only by the template (``chat_prompt``,
``think_prefix``) and by ``response_ids`` for the one ``</think>`` that ends the reasoning.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:  # the ``tokenizers`` package is only needed for HFTokenizer
    import tokenizers

from pipo_jax.config import ConfigError

# Chat roles, in the order the template writes them.
ROLES = ("system", "user", "assistant")


@runtime_checkable
class Tokenizer(Protocol):
    """What pipo-jax needs from a tokenizer."""

    vocab_size: int  # rows of the model's embedding; may exceed the tokenizer's own vocabulary
    pad_id: int
    bos_id: int | None  # None: the template starts without a BOS token (Qwen)
    eos_id: int  # what generation stops on; never equal to pad_id
    think_end_id: int  # ``</think>``, which ends the reasoning (placed by ``response_ids``)

    def encode(self, text: str) -> list[int]:
        """Text → ids, as text: a special token's string (``<|pad|>``, ``<think>``…) in ``text``
        is encoded like any other characters, never as its control id, so user text cannot
        forge a turn or hold a PAD."""

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        """Ids → text. PAD is never shown; other specials only when ``skip_special`` is False."""

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Ids of a conversation followed by the assistant header (the generation prompt). The
        template's tokens are control ids; every ``content`` is encoded as text."""

    def think_prefix(self) -> list[int]:
        """Ids that open the assistant's reasoning (``<think>\\n``, its ``<think>`` a control
        id)."""


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

    def token_id(self, special: str) -> int:
        return self._special_ids[special]

    def encode(self, text: str) -> list[int]:
        # Bytes only: "<|pad|>" in the text is seven bytes, not the PAD id.
        return [self.N_SPECIAL + b for b in text.encode("utf-8")]

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
        # The template's tokens by id; the content is text.
        ids = [self.bos_id]
        for role, content in _turns(messages):
            ids += [self._special_ids[f"<|{role}|>"], *self.encode(content), self.end_id]
        return ids + [self._special_ids["<|assistant|>"]]

    def think_prefix(self) -> list[int]:
        return [self.think_id] + self.encode("\n")


# Tokens the Qwen reasoning chat template is written in; each must be one id of the vocabulary.
IM_START, IM_END, THINK, THINK_END = "<|im_start|>", "<|im_end|>", "<think>", "</think>"
DEFAULT_PAD = "<|endoftext|>"  # Qwen's padding token when tokenizer_config.json names none


def _read_json(path: Path) -> object:
    """Parses a JSON file, turning a syntax error into a ValueError that names the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); copy it again from the model's "
                         "Hugging Face repository") from e


def _text_only(tokenizer: tokenizers.Tokenizer, source: str) -> tokenizers.Tokenizer:
    """A copy of ``tokenizer`` without its added tokens, which encodes every string as text.

    ``tokenizers`` matches added tokens in the text before anything else, and its
    ``encode_special_tokens`` flag skips only those flagged special, not Qwen's ``<think>`` and
    ``</think>`` (added, special=false). Without the added tokens, the normalizer,
    pre-tokenizer and BPE model see all of the text, exactly as they see the text between added
    tokens in the original, so plain text gets the same ids. The post-processor goes too (it
    only adds BOS/EOS-style specials, which ``encode`` never asks for), and so do a file's
    truncation and padding settings: text is never cut or padded behind the caller's back.

    Raises:
      ValueError: the model itself tokenizes an added token's string to an added token's id
        (a vocabulary that holds the string and merges that build it), so text could still
        forge control tokens.
    """
    import tokenizers

    spec = json.loads(tokenizer.to_str())
    added = {t["id"]: t["content"] for t in spec.get("added_tokens", [])}
    spec.update(added_tokens=[], post_processor=None, truncation=None, padding=None)
    text_tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    for content in added.values():
        forged = set(text_tok.encode(content, add_special_tokens=False).ids) & added.keys()
        if forged:
            raise ValueError(f"{source}: the text {content!r} encodes to the added token id(s) "
                             f"{sorted(forged)}, so user text could hold control tokens; this "
                             "tokenizer.json cannot be used")
    return text_tok


def _token_content(value: object) -> str | None:
    """``pad_token`` is a string, or an AddedToken dict ``{"content": …}`` in older configs."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (read locally with ``tokenizers``) and the Qwen template.

    A conversation is ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message followed by
    ``<|im_start|>assistant\\n``; the reasoning opens with ``<think>\\n``. There is no BOS
    (``bos_id`` is None), EOS is ``<|im_end|>`` (the end of the assistant's turn) and PAD is
    tokenizer_config.json's ``pad_token`` (default ``<|endoftext|>``).

    Build one with ``HFTokenizer.from_dir``; nothing is ever fetched from the hub.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, pad_token: str = DEFAULT_PAD,
                 model_vocab_size: int | None = None, source: str = "tokenizer.json") -> None:
        """Wraps a loaded ``tokenizers.Tokenizer``.

        Args:
          tokenizer: the loaded tokenizer.
          pad_token: the padding token's string; must be in the vocabulary and differ from EOS.
          model_vocab_size: rows of the model's embedding (Qwen pads its vocabulary to 248320);
            default: the tokenizer's own vocabulary size. Must not be smaller than it.
          source: the file(s) the tokenizer came from, for error messages.
        """
        self._tok = tokenizer  # decodes, and is what to_json() fingerprints
        self._text_tok = _text_only(tokenizer, source)  # encodes: text only, no added tokens
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # Ids past the last one the tokenizer knows are embedding padding rows, never text.
        self.tokenizer_vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True),
                                        max(vocab.values(), default=-1) + 1)
        if model_vocab_size is None:
            model_vocab_size = self.tokenizer_vocab_size
        if model_vocab_size < self.tokenizer_vocab_size:
            raise ValueError(f"model vocab size {model_vocab_size} is smaller than the "
                             f"{self.tokenizer_vocab_size} ids of {source}: the model cannot "
                             "embed every token; use the tokenizer that belongs to the model")
        self.vocab_size = model_vocab_size

        def single_id(token: str, what: str) -> int:
            i = tokenizer.token_to_id(token)
            if i is None:
                raise ValueError(f"{source} has no {token!r} token ({what}); the Qwen chat "
                                 "template needs it: use a Qwen tokenizer.json")
            return i

        self.im_start_id = single_id(IM_START, "the start of a chat turn")
        self.eos_id = single_id(IM_END, "the end of a chat turn, which ends generation")
        self.think_id = single_id(THINK, "the start of the reasoning")
        self.think_end_id = single_id(THINK_END, "the end of the reasoning")
        self.pad_id = single_id(pad_token, "the padding token")
        if self.pad_id == self.eos_id:
            # Decoding drops PAD and stops on EOS: the two cannot share an id.
            raise ValueError(f"{source}: pad_token {pad_token!r} is the end-of-turn token "
                             f"{IM_END!r}, so padding would stop generation; set pad_token to "
                             f"{DEFAULT_PAD!r} in tokenizer_config.json")
        self.bos_id: int | None = None
        self.end_id = self.eos_id  # the end of any turn, as ByteTokenizer.end_id
        # Hidden by decode(skip_special=True): what the file flags special, and the template's
        # own tokens even where the file does not flag them (Qwen leaves <think> unflagged).
        flagged = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        self._special_ids = frozenset(flagged | {self.im_start_id, self.eos_id, self.think_id,
                                                 self.think_end_id})

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str],
                 model_vocab_size: int | None = None) -> HFTokenizer:
        """Loads ``tokenizer.json`` from a directory (or the file itself) without the hub.

        tokenizer_config.json beside it, if present, gives ``pad_token``. Other files of a
        model directory (config.json, generation_config.json) are allowed there and not read:
        the embedding size comes from ``model_vocab_size``, and generation stops on the chat
        turn end ``<|im_end|>`` whatever the model's default EOS is.

        Raises:
          FileNotFoundError: no such path, or no tokenizer.json in the directory.
          ValueError: corrupt JSON, or a vocabulary without the template's tokens.
          ImportError: the ``tokenizers`` package is not installed.
        """
        path = Path(path).expanduser()
        file = path / "tokenizer.json" if path.is_dir() else path
        if not path.exists():
            raise FileNotFoundError(f"tokenizer path {path} does not exist: give a directory "
                                    "holding the model's tokenizer.json, or the file itself")
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}: copy the model's "
                                    "tokenizer.json (and tokenizer_config.json) there")
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError("HFTokenizer needs the 'tokenizers' package: "
                              "pip install tokenizers") from e
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            _read_json(file)  # a JSON syntax error gets its own message
            raise ValueError(f"{file} is not a Hugging Face tokenizer.json ({e}); copy it again "
                             "from the model's repository") from e
        pad_token, source = DEFAULT_PAD, str(file)
        config_file = file.parent / "tokenizer_config.json"
        if config_file.is_file():
            config = _read_json(config_file)
            named = _token_content(config.get("pad_token")) if isinstance(config, dict) else None
            if named is not None:
                pad_token, source = named, f"{file} with {config_file}"
        return cls(tok, pad_token, model_vocab_size, source)

    def to_json(self) -> str:
        """The loaded ``tokenizer.json`` (vocabulary, merges, normalizer, added tokens) as
        text: what a cache of tokenized data must be keyed on."""
        return self._tok.to_str()

    def token_id(self, special: str) -> int:
        """The id of a token that must be a single id of the vocabulary (``"<think>"``…)."""
        i = self._tok.token_to_id(special)
        if i is None:
            raise KeyError(f"{special!r} is not a token of this vocabulary")
        return i

    def encode(self, text: str) -> list[int]:
        # The tokenizer without added tokens: "<|im_end|>" in the text is text. No BOS/EOS
        # either: the chat template and the data pipeline place those themselves.
        return self._text_tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        keep = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.tokenizer_vocab_size:
                # tokenizers would silently drop it; an embedding padding row is never text.
                raise ValueError(f"token id {i} is outside the tokenizer's vocabulary "
                                 f"(size {self.tokenizer_vocab_size})")
            if i == self.pad_id or (skip_special and i in self._special_ids):
                continue
            keep.append(i)
        return self._tok.decode(keep, skip_special_tokens=False)

    def chat_text(self, messages: Sequence[dict[str, str]]) -> str:
        """The template as text (what HF's ``apply_chat_template`` renders), for display."""
        return "".join(f"{IM_START}{role}\n{content}{IM_END}\n"
                       for role, content in _turns(messages)) + f"{IM_START}assistant\n"

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> list[int]:
        # The template's tokens by id, the rest as text. tokenizers cuts a string at its added
        # tokens before pre-tokenizing, so this equals encoding ``chat_text`` with specials
        # recognised whenever no content holds an added token's string.
        ids: list[int] = []
        for role, content in _turns(messages):
            ids += [self.im_start_id, *self.encode(f"{role}\n{content}"), self.eos_id,
                    *self.encode("\n")]
        return ids + [self.im_start_id, *self.encode("assistant\n")]

    def think_prefix(self) -> list[int]:
        return [self.think_id, *self.encode("\n")]

    def __repr__(self) -> str:
        return (f"HFTokenizer(tokenizer_vocab_size={self.tokenizer_vocab_size}, "
                f"vocab_size={self.vocab_size}, pad_id={self.pad_id}, eos_id={self.eos_id})")


def _turns(messages: Sequence[dict[str, str]]) -> list[tuple[str, str]]:
    """Chat messages → ``(role, content)`` pairs, checked."""
    turns = []
    for m in messages:
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"chat message role must be one of {ROLES}, got {role!r}")
        if "content" not in m:
            raise ValueError(f"chat message {m!r} has no 'content'")
        turns.append((role, m["content"]))
    return turns


def response_ids(tokenizer: Tokenizer, text: str, think_end: int | None = None) -> list[int]:
    """Ids of a response (the text after the prompt's ``<think>\\n``, ``reasoning</think>answer``)
    without EOS: the ``</think>`` that ends the reasoning is the control id, all else is text.

    Args:
      tokenizer: the run's tokenizer.
      text: the response.
      think_end: where in ``text`` the ``</think>`` that ends the reasoning starts; default: its
        first occurrence (none: all of ``text`` is text). Every other ``</think>`` is text.

    Raises:
      ValueError: ``think_end`` does not point at a ``</think>``.
    """
    if think_end is None:
        think_end = text.find(THINK_END)
        if think_end < 0:
            return tokenizer.encode(text)
    if think_end < 0 or text[think_end:think_end + len(THINK_END)] != THINK_END:
        raise ValueError(f"think_end={think_end} does not point at {THINK_END!r} in the response")
    return (tokenizer.encode(text[:think_end]) + [tokenizer.think_end_id]
            + tokenizer.encode(text[think_end + len(THINK_END):]))


def reasoning_prompt(tokenizer: Tokenizer, messages: Sequence[dict[str, str]]) -> list[int]:
    """Prompt ids of a chat: the chat template with the assistant header, then ``<think>\n`` that
    opens the reasoning. Training data and generation both build prompts here, so the model is
    always asked the way it was trained."""
    return tokenizer.chat_prompt(messages) + tokenizer.think_prefix()


def load_tokenizer(spec: str, run_dir: str | os.PathLike[str] | None = None,
                   model_vocab_size: int | None = None) -> Tokenizer:
    """A config's tokenizer string → a tokenizer.

    Args:
      spec: ``"byte"`` for ``ByteTokenizer``, else the path of a directory holding
        tokenizer.json (or of the file). A relative path is looked up in ``run_dir`` first (so a
        run directory can carry its tokenizer), then in the current directory.
      run_dir: the run directory, if any.
      model_vocab_size: rows of the model's embedding (``model.vocab_size``); default: the
        tokenizer's own vocabulary size.

    Raises:
      FileNotFoundError: the path is in none of the places tried (the message lists them).
      ValueError: an empty spec, or a byte tokenizer for a model of another vocabulary size.
    """
    if spec == "byte":
        tok = ByteTokenizer()
        if model_vocab_size is not None and model_vocab_size != tok.vocab_size:
            raise ValueError(f"the byte tokenizer has {tok.vocab_size} ids but the model's "
                             f"vocab size is {model_vocab_size}: set model.vocab_size to "
                             f"{tok.vocab_size} or give the model's tokenizer.json directory")
        return tok
    if not spec:
        raise ValueError("empty tokenizer spec: give 'byte' or a directory holding "
                         "tokenizer.json")
    path = tokenizer_path(spec, run_dir)
    if path is not None:
        return HFTokenizer.from_dir(path, model_vocab_size)
    raise FileNotFoundError(f"tokenizer {spec!r} not found; tried "
                            + ", ".join(str(p) for p in _candidates(spec, run_dir))
                            + ": give 'byte' or a directory holding tokenizer.json")


def _candidates(spec: str, run_dir: str | os.PathLike[str] | None) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_absolute():
        return [path]
    return ([Path(run_dir) / path] if run_dir is not None else []) + [Path.cwd() / path]


def tokenizer_path(spec: str, run_dir: str | os.PathLike[str] | None = None) -> Path | None:
    """Where a config's tokenizer path points (a relative one is looked up in ``run_dir``
    first, then in the current directory); None for ``"byte"``, empty or nothing found."""
    if spec == "byte" or not spec:
        return None
    return next((c for c in _candidates(spec, run_dir) if c.exists()), None)


def run_tokenizer(spec: str, run_dir: str | os.PathLike[str] | None,
                  model_vocab_size: int) -> Tokenizer:
    """``load_tokenizer`` for a run's config: failures become a ``ConfigError`` naming the
    ``tokenizer`` key, so the command-line tools report them as one line."""
    try:
        return load_tokenizer(spec, run_dir, model_vocab_size)
    except (ValueError, OSError, ImportError) as e:
        raise ConfigError(f"tokenizer {spec!r} cannot be used: {e}") from e

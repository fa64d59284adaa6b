"""TFDS builder for the user's chat-JSONL trajectories, tokenized once at build time and written as
array_record for random access (no TF).

Each record holds ``prompt`` (int32 [P], the chat template up to and including ``<think>\\n``),
``response`` (int32 [R], the trained-on text plus EOS) and ``length`` (int32, the pair-sequence
length ``pairs.pair_length(P, R)``). Only a ``train`` split is built, in the order of the input
lines.

The builder config name encodes everything that changes the content, so that no setting ever
reuses stale records: a SHA-256 of the input files' bytes (in order), a fingerprint of the
tokenizer (its ``tokenizer.json`` content, PAD/EOS ids and the ids of a probe conversation and
response, which catch a change of the chat template code or of how text is encoded),
``max_len``, ``overlength`` and ``on_malformed``. Bump ``ChatTrajectories.VERSION`` when
``chat_jsonl`` changes how a line becomes text.

Every example's length and the build's counts (malformed lines skipped, over-long examples
dropped) are TFDS metadata (``ChatMetadata``): ``metadata.json`` plus ``lengths-train.npy`` in
the dataset directory. TFDS writes them into its ``incomplete.*`` directory with the records,
before the one rename that publishes the dataset, so a built dataset always has both; build
locking and crash safety are ``tfds_builder.build_once``'s.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import tensorflow_datasets as tfds

from pipo_jax.config import DataConfig
from pipo_jax.data.chat_jsonl import (
    ChatDataError,
    MalformedLines,
    conversation_ids,
    iter_conversations,
    resolve_files,
)
from pipo_jax.data.tfds_builder import LocalBuilderMixin, build_once
from pipo_jax.io.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, response_ids
from pipo_jax.model import pairs

log = logging.getLogger(__name__)

NAME = "pipo_chat"
LENGTHS_FILE = "lengths-train.npy"
_PROGRESS_EVERY = 10_000
# A conversation whose ids pin down the chat template, the think prefix and special tokens,
# and a response whose ids pin down how its </think> and text are encoded. Both hold special
# tokens' strings, so how text with them is encoded (as text, since issue #19) is in the key.
_PROBE = ({"role": "system", "content": "s"},
          {"role": "user", "content": "u <think>\n</think>\n\n 12 + 30?"},
          {"role": "assistant", "content": "a"})
_PROBE_RESPONSE = "r <|pad|><|im_end|>\n</think>\n\n 42 </think>"


def files_digest(files: Sequence[Path]) -> str:
    """SHA-256 (hex) of the files' contents in order; paths and timestamps do not count."""
    outer = hashlib.sha256()
    for path in files:
        inner = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                inner.update(chunk)
        outer.update(inner.digest())
    return outer.hexdigest()


def tokenizer_digest(tokenizer: Tokenizer) -> str:
    """SHA-256 (hex) of everything about ``tokenizer`` that the records depend on.

    Raises:
      TypeError: a tokenizer other than ``ByteTokenizer`` and ``HFTokenizer``, whose vocabulary
        cannot be fingerprinted.
    """
    h = hashlib.sha256(type(tokenizer).__qualname__.encode())
    if isinstance(tokenizer, HFTokenizer):
        # The loaded tokenizer.json itself (vocabulary, merges, normalizer, added tokens);
        # HFTokenizer keeps no path, and a path would not say whether the file changed.
        h.update(tokenizer.to_json().encode())
    elif not isinstance(tokenizer, ByteTokenizer):
        raise TypeError(f"chat_jsonl data needs a ByteTokenizer or HFTokenizer, got "
                        f"{type(tokenizer).__name__}")
    h.update(json.dumps([tokenizer.vocab_size, tokenizer.pad_id, tokenizer.eos_id,
                         tokenizer.chat_prompt(_PROBE), tokenizer.think_prefix(),
                         response_ids(tokenizer, _PROBE_RESPONSE)]).encode())
    return h.hexdigest()


class ChatMetadata(tfds.core.Metadata):
    """Build counts (``metadata.json``) and per-example lengths (``lengths-train.npy``, int32
    [N]) of a chat dataset; ``self["lengths"]`` holds the array."""

    def save_metadata(self, data_dir: Any) -> None:
        path = Path(os.fspath(data_dir))
        stats = {k: v for k, v in self.items() if k != "lengths"}
        (path / "metadata.json").write_text(json.dumps(stats, indent=1) + "\n")
        np.save(path / LENGTHS_FILE, np.asarray(self["lengths"], dtype=np.int32))

    def load_metadata(self, data_dir: Any) -> None:
        path = Path(os.fspath(data_dir))
        self.clear()
        self.update(json.loads((path / "metadata.json").read_text()))
        lengths_path = path / LENGTHS_FILE
        if not lengths_path.is_file():
            raise ChatDataError(f"{lengths_path} is missing: {path} is not a complete chat "
                                "dataset; delete it to rebuild")
        self["lengths"] = np.load(lengths_path)


class ChatConfig(tfds.core.BuilderConfig):
    """One set of input files tokenized one way."""

    def __init__(self, *, files: Sequence[Path], tokenizer: Tokenizer, max_len: int,
                 overlength: Literal["truncate", "drop"],
                 on_malformed: Literal["error", "skip"], **kwargs: Any) -> None:
        files = tuple(Path(f) for f in files)
        data_hash, tok_hash = files_digest(files), tokenizer_digest(tokenizer)
        super().__init__(
            name=f"f{data_hash[:16]}_t{tok_hash[:12]}_len{max_len}_{overlength}_{on_malformed}",
            description=f"{len(files)} JSONL file(s): {', '.join(str(f) for f in files[:4])}"
                        f"{' …' if len(files) > 4 else ''}", **kwargs)
        self.files = files
        self.tokenizer = tokenizer
        self.max_len = max_len
        self.overlength = overlength
        self.on_malformed = on_malformed
        self.files_sha256 = data_hash
        self.tokenizer_sha256 = tok_hash

    @classmethod
    def from_data_config(cls, data_cfg: DataConfig, tokenizer: Tokenizer) -> ChatConfig:
        """Resolves ``data.train_files`` (errors for missing files) and hashes them."""
        return cls(files=resolve_files(data_cfg.train_files), tokenizer=tokenizer,
                   max_len=data_cfg.max_len, overlength=data_cfg.overlength,
                   on_malformed=data_cfg.on_malformed)


class ChatTrajectories(LocalBuilderMixin, tfds.core.GeneratorBasedBuilder):
    """Chat trajectories from local JSONL files (``pipo_jax.data.chat_jsonl``), as token ids."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Prompt/response ids; reasoning conventions (a) <think> in content, "
                 "(b) reasoning_content, (c) none (empty think block)."}
    name = NAME

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "prompt": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "response": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "length": tfds.features.Scalar(dtype=np.int32),
            }),
            supervised_keys=None,
            # Records in input order: ``lengths-train.npy`` is indexed by record, and the loader
            # shuffles anyway.
            disable_shuffling=True,
            metadata=ChatMetadata(),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[int, dict]]]:
        del dl_manager  # local files
        return {"train": self._generate_examples()}

    def _generate_examples(self) -> Iterator[tuple[int, dict]]:
        cfg: ChatConfig = self.builder_config
        tok = cfg.tokenizer
        malformed = MalformedLines(cfg.on_malformed)
        lengths: list[int] = []
        dropped = 0
        for conv in iter_conversations(cfg.files, malformed):
            prompt, response = (np.asarray(ids, dtype=np.int32) for ids in conversation_ids(
                tok, conv.prompt, conv.response, conv.think_end))
            if (prompt == tok.pad_id).any() or (response == tok.pad_id).any():
                # PAD means "no token" to the pair logic; one inside the text would break it.
                # Text is encoded as text, so "<|pad|>" in a message is characters and cannot
                # get here; this guards the invariant against a tokenizer that breaks that rule.
                malformed.handle(conv.where, f"the text encodes to the tokenizer's padding token "
                                             f"(id {tok.pad_id}); remove it from the data")
                continue
            n = pairs.pair_length(len(prompt), len(response))
            if n > cfg.max_len and cfg.overlength == "drop":
                dropped += 1
                continue
            key = len(lengths)
            lengths.append(n)
            if len(lengths) % _PROGRESS_EVERY == 0:
                log.info("… %d trajectories tokenized", len(lengths))
            yield key, {"prompt": prompt, "response": response, "length": n}
        if not lengths:
            raise ChatDataError(
                f"no trajectory to train on in {', '.join(str(f) for f in cfg.files)}: "
                f"{malformed.skipped} malformed line(s) skipped, {dropped} longer than "
                f"data.max_len={cfg.max_len} dropped")
        self.info.metadata.update(
            files=[str(f) for f in cfg.files], files_sha256=cfg.files_sha256,
            tokenizer_sha256=cfg.tokenizer_sha256, examples=len(lengths),
            malformed_skipped=malformed.skipped, overlength_dropped=dropped,
            lengths=np.asarray(lengths, dtype=np.int32))


@dataclasses.dataclass(frozen=True)
class ChatSource:
    """The built ``train`` split.

    ``records[i]`` is a dict with ``prompt`` int32 [P], ``response`` int32 [R] and ``length``;
    ``lengths`` int32 [N] holds every record's ``length`` without reading the records.
    ``stats`` has the build's counts (``examples``, ``malformed_skipped``,
    ``overlength_dropped``) and inputs (``files``, ``files_sha256``, ``tokenizer_sha256``).
    """

    records: Any
    lengths: np.ndarray
    stats: dict[str, Any]
    directory: Path


def load_train(data_cfg: DataConfig, tokenizer: Tokenizer) -> ChatSource:
    """The ``train`` split of ``data_cfg.train_files`` tokenized by ``tokenizer``, building it into
    ``data_cfg.data_dir`` first if needed.

    Raises:
      ChatDataError: missing files, a malformed line (``on_malformed: error``), or no example
        left.
    """
    config = ChatConfig.from_data_config(data_cfg, tokenizer)
    data_dir = os.fspath(Path(data_cfg.data_dir).absolute())
    make_builder = lambda: ChatTrajectories(config=config, data_dir=data_dir)
    directory = build_once(make_builder)
    builder = make_builder()
    metadata = dict(builder.info.metadata)
    records = builder.as_data_source(split="train")
    lengths = np.asarray(metadata.pop("lengths"), dtype=np.int32)
    if len(lengths) != len(records):
        raise ChatDataError(f"{directory} has {len(records)} records but {len(lengths)} "
                            "lengths; delete it to rebuild")
    if metadata["malformed_skipped"] or metadata["overlength_dropped"]:
        log.warning("chat data %s: %d trajectories; skipped %d malformed line(s) and dropped %d "
                    "longer than max_len %d", directory, len(lengths),
                    metadata["malformed_skipped"], metadata["overlength_dropped"],
                    data_cfg.max_len)
    return ChatSource(records=records, lengths=lengths, stats=metadata, directory=directory)

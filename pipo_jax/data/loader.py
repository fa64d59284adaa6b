"""Training batches and evaluation examples over the TFDS sources (grain ``MapDataset``).

Training data is the arithmetic task or the user's chat-JSONL trajectories (``data.source``);
both become ``(prompt_ids, response_ids)`` examples and go through the same batching.

A training dataset is indexed by step: ``ds[step]`` is a pure function of the data settings, the
stage's seed and ``step``. Resuming at step ``s`` therefore reproduces exactly the batches an
uninterrupted run would have seen, with no iterator state to checkpoint. Examples are reshuffled
every epoch (grain reseeds its shuffle per epoch) and batches may straddle epoch boundaries.

Length bucketing (``data.buckets``), after Hugging Face's ``group_by_length``: the shuffled
example stream is cut into windows of ``bucket_window × batch_size`` examples; each window is
sorted by length and cut into ``bucket_window`` batches, whose order is shuffled per window. A
batch is padded to the smallest bucket length (or ``max_len``) that holds its longest row after
PAD augmentation, so that short examples are not padded to ``max_len``. Every example is still
seen once per pass over the stream; only which examples share a batch changes. Sequences are never
packed: pairs and attention (and the DeltaNet/conv states) would have to stop at document
boundaries, which needs segment-aware masks and state resets in the model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from pipo_jax.config import PIPO_STAGES, STAGES, Config, DataConfig
from pipo_jax.data import chat_builder
from pipo_jax.data.arith import to_messages
from pipo_jax.data.chat_jsonl import conversation_ids
from pipo_jax.data.tfds_builder import load_source
from pipo_jax.io.tokenizer import Tokenizer
from pipo_jax.model import pairs

# Salts that keep the streams derived from one stage seed independent of each other.
_SHUFFLE_SALT = 0x5F1E
_PAD_SALT = 0x9AD5
_BUCKET_SALT = 0xB0C7

Ids = tuple[list[int], list[int]]  # (prompt_ids, response_ids)


def example_to_ids(tokenizer: Tokenizer, example: dict) -> Ids:
    """Token ids of one arithmetic example: ``(prompt_ids, response_ids)``.

    The prompt is the chat template of the system + user messages followed by the assistant header
    and ``<think>\\n``; the response is the worked solution followed by EOS.
    """
    return conversation_ids(tokenizer, to_messages(example), example["response"])


def _record_ids(record: dict) -> Ids:
    """A chat dataset record (ids stored at build time) → ``(prompt_ids, response_ids)``."""
    return record["prompt"].tolist(), record["response"].tolist()


@dataclasses.dataclass(frozen=True)
class _TrainExamples:
    """The training split: random-access records, how one becomes ids, and every record's
    pair-sequence length [N] when the dataset stores it (None: tokenize to measure)."""

    records: Sequence[Any]
    to_ids: Callable[[Any], Ids]
    lengths: np.ndarray | None


def _train_examples(data_cfg: DataConfig, tokenizer: Tokenizer) -> _TrainExamples:
    if data_cfg.source == "chat_jsonl":
        chat = chat_builder.load_train(data_cfg, tokenizer)
        return _TrainExamples(chat.records, _record_ids, chat.lengths)
    return _TrainExamples(load_source(data_cfg, "train"),
                          functools.partial(example_to_ids, tokenizer), None)


def _shuffle_seed(seed: int) -> int:
    # grain shuffles epoch e with seed + e; hashing the stage seed keeps seeds s and s + 1 from
    # sharing all but one epoch order.
    return int(np.random.SeedSequence([seed, _SHUFFLE_SALT]).generate_state(1)[0])


def _ar_row(prompt: list[int], response: list[int]) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.asarray(prompt + response, dtype=np.int32)
    mask = np.zeros(len(tokens), dtype=bool)
    mask[len(prompt):] = True
    return tokens, mask


def bucket_length(longest: int, buckets: Sequence[int], max_len: int) -> int:
    """The smallest of ``buckets`` and ``max_len`` that holds ``longest`` tokens; ``max_len`` when
    none does (longer rows are truncated)."""
    return min((b for b in (*buckets, max_len) if longest <= b <= max_len), default=max_len)


def _make_batch(step: int, examples: Sequence[Ids], *, stage: str, seed: int,
                pad_ratio_max: float, pad_augment: str, max_len: int, pad_id: int,
                buckets: Sequence[int] = (), pad_dense_frac: float = 0.0
                ) -> dict[str, np.ndarray]:
    """Stacks one step's examples into arrays.

    Returns ``tokens`` [B, T] int32, ``loss_mask`` [B, T] bool (True at prediction targets) and
    ``pad_ratio`` [] float32, the PAD-augmentation ratio drawn for this step (0 for ``ar``).
    With ``pad_dense_frac > 0`` each row is, with that probability, a *dense* row augmented at
    its own ratio ``r ~ U[pad_ratio_max, 1]`` instead: the long runs of rejections that
    thresholds near 1 decode (``pad_ratio`` stays the shared ratio of the other rows).
    ``T`` is ``max_len``, or with ``buckets`` the smallest bucket length that holds the longest
    row (``bucket_length``).
    """
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    ratio = 0.0
    if stage not in PIPO_STAGES:
        rows = [_ar_row(p, r) for p, r in examples]
    else:
        rng = np.random.default_rng([seed, step, _PAD_SALT])
        # One ratio per step shared by every row (as in the paper), so the step's extra length is
        # roughly uniform across the batch.
        ratio = float(rng.uniform(0.0, pad_ratio_max))
        for p, r in examples:
            tokens, mask = pairs.build_pair_sequence(p, r, pad_id)
            row_ratio = ratio
            # Drawn only when enabled, so runs without dense rows keep their random stream.
            if pad_dense_frac > 0 and rng.random() < pad_dense_frac:
                row_ratio = float(rng.uniform(pad_ratio_max, 1.0))
            rows.append(pairs.random_pad_augment(tokens, mask, row_ratio, rng, pad_id,
                                                 pad_augment))
    length = bucket_length(max(len(t) for t, _ in rows), buckets, max_len)
    fitted = [pairs.fit_to_length(t, m, length, pad_id) for t, m in rows]
    return {"tokens": np.stack([t for t, _ in fitted]),
            "loss_mask": np.stack([m for _, m in fitted]),
            "pad_ratio": np.asarray(ratio, dtype=np.float32)}


class _LengthGroupedSteps:
    """Step → the record indices of its batch (int [B]), grouped by length; a ``Sequence`` for
    ``grain.MapDataset.source``.

    Window ``w`` holds positions ``[w·W·B, (w+1)·W·B)`` of the shuffled, repeated record stream
    (the stream without bucketing, so a pass still sees every record once). It is sorted by
    length (stable: ties keep the shuffled order), cut into ``W`` batches of ``B``, and the batch
    order is shuffled with a per-window seed. The plan of the latest window is cached, so the
    ``W`` steps of a window measure their lengths once.
    """

    def __init__(self, n_records: int, lengths: Callable[[np.ndarray], np.ndarray],
                 batch_size: int, window: int, seed: int) -> None:
        """``lengths`` maps record indices [K] to their pair-sequence lengths [K]."""
        self._order = grain.MapDataset.range(n_records).shuffle(
            seed=_shuffle_seed(seed)).repeat()
        self._lengths = lengths
        self._batch_size = batch_size
        self._window = window
        self._seed = seed
        self._cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self._order) // self._batch_size

    def __getitem__(self, step: int) -> np.ndarray:
        window, slot = divmod(int(step), self._window)
        cache = self._cache
        if cache is None or cache[0] != window:
            cache = self._cache = (window, self._plan(window))
        return cache[1][slot]

    def _plan(self, window: int) -> np.ndarray:
        """Record indices [W, B] of the window's batches, in step order."""
        size = self._window * self._batch_size
        indices = np.asarray([self._order[p] for p in range(window * size, (window + 1) * size)])
        by_length = indices[np.argsort(self._lengths(indices), kind="stable")]
        batches = by_length.reshape(self._window, self._batch_size)
        rng = np.random.default_rng([self._seed, window, _BUCKET_SALT])
        return batches[rng.permutation(self._window)]


def _measured_lengths(records: Sequence[Any], to_ids: Callable[[Any], Ids],
                      indices: np.ndarray) -> np.ndarray:
    """Pair-sequence lengths [K] of records whose dataset stores none (tokenizes them)."""
    return np.asarray([pairs.pair_length(*map(len, to_ids(records[int(i)])))
                       for i in indices], dtype=np.int64)


def _fetch(records: Sequence[Any], to_ids: Callable[[Any], Ids], indices: np.ndarray) -> list[Ids]:
    return [to_ids(records[int(i)]) for i in indices]


def make_train_dataset(cfg: Config, tokenizer: Tokenizer, stage: str) -> grain.MapDataset:
    """Infinite step-indexed training batches for ``stage`` (``"teacher"``/``"ar"``: AR rows,
    ``"sft"``: pair rows).

    ``ds[step]`` is a dict with ``tokens`` [B, T] int32, ``loss_mask`` [B, T] bool and
    ``pad_ratio`` [] float32, where ``B = cfg.<stage>.batch_size`` and ``T = cfg.data.max_len``
    (with ``cfg.data.buckets``: the batch's bucket length, see the module docstring). ``ar`` rows
    are prompt + response; ``sft`` rows are pair sequences with parity PADs and random PAD
    augmentation. Longer rows are truncated, shorter ones right-padded with PAD (no loss).
    Builds the dataset of ``cfg.data.source`` into ``cfg.data.data_dir`` first if needed.
    """
    if stage not in STAGES or stage == "opd":
        raise ValueError(f"stage must be one of {STAGES[:-1]} (opd trains on prompts: "
                         f"opd_prompts), got {stage!r}")
    train_cfg = getattr(cfg, stage)
    data = cfg.data
    pipo = stage in PIPO_STAGES  # AR rows are not augmented
    make_batch = functools.partial(
        _make_batch, stage=stage, seed=train_cfg.seed,
        pad_ratio_max=train_cfg.pad_ratio_max if pipo else 0.0,
        pad_augment=train_cfg.pad_augment if pipo else "split",
        pad_dense_frac=train_cfg.pad_dense_frac if pipo else 0.0,
        max_len=data.max_len, pad_id=tokenizer.pad_id, buckets=data.buckets)
    examples = _train_examples(data, tokenizer)
    if not data.buckets:
        return (grain.MapDataset.source(examples.records)
                .shuffle(seed=_shuffle_seed(train_cfg.seed))
                .repeat()
                .map(examples.to_ids)
                .batch(train_cfg.batch_size, batch_fn=list)
                .map_with_index(make_batch))
    lengths = (functools.partial(np.take, examples.lengths) if examples.lengths is not None
               else functools.partial(_measured_lengths, examples.records, examples.to_ids))
    steps = _LengthGroupedSteps(len(examples.records), lengths, train_cfg.batch_size,
                                data.bucket_window, train_cfg.seed)
    return (grain.MapDataset.source(steps)
            .map(functools.partial(_fetch, examples.records, examples.to_ids))
            .map_with_index(make_batch))


_PROMPT_SALT = 0x0BD5


def _prompt_of(examples: _TrainExamples, record: Any) -> dict[str, Any]:
    prompt, _ = examples.to_ids(record)
    answer = record.get("answer") if isinstance(record, dict) else None
    return {"prompt": prompt, "answer": None if answer is None else str(answer)}


def _prompt_batch(batch: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {"prompts": [r["prompt"] for r in batch], "answers": [r["answer"] for r in batch]}


def make_prompt_dataset(cfg: Config, tokenizer: Tokenizer) -> grain.MapDataset:
    """Infinite step-indexed prompt batches for the ``opd`` stage.

    ``ds[step]`` is a dict with ``prompts`` (B lists of token ids: the chat template, assistant
    header and ``<think>\n``, as the SFT rows' prompts) and ``answers`` (B reference answers of
    the arithmetic task, None for chat data), ``B = cfg.opd.batch_size``. The prompts are the
    training split's, in an order of their own (``opd.seed``); like the training batches, a
    batch is a pure function of the step, so a resumed run sees the same prompts.
    """
    oc = cfg.opd
    examples = _train_examples(cfg.data, tokenizer)
    return (grain.MapDataset.source(examples.records)
            .shuffle(seed=_shuffle_seed(oc.seed ^ _PROMPT_SALT))
            .repeat()
            .map(functools.partial(_prompt_of, examples))
            .batch(oc.batch_size, batch_fn=list)
            .map(_prompt_batch))


def test_examples(cfg: Config | DataConfig, n: int | None = None) -> list[dict]:
    """The first ``n`` (all when None) test examples, as dicts with str ``question``,
    ``response``, ``answer`` and int ``level``. Builds the dataset first if needed."""
    data_cfg = cfg.data if isinstance(cfg, Config) else cfg
    source = load_source(data_cfg, "test")
    if n is None:
        n = len(source)
    if not 0 <= n <= len(source):
        raise ValueError(f"asked for {n} test examples but the test split has {len(source)}; "
                         "raise data.num_test")
    return [source[i] for i in range(n)]


# Not a pytest test, although its name says so: keeps test modules that import it clean.
test_examples.__test__ = False  # type: ignore[attr-defined]

"""Training batches and evaluation examples over the TFDS source (grain ``MapDataset``).

A training dataset is indexed by step: ``ds[step]`` is a pure function of the data settings, the
stage's seed and ``step``. Resuming at step ``s`` therefore reproduces exactly the batches an
uninterrupted run would have seen, with no iterator state to checkpoint. Examples are reshuffled
every epoch (grain reseeds its shuffle per epoch) and batches may straddle epoch boundaries.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import grain
import numpy as np

from pipo_jax import pairs
from pipo_jax.config import STAGES, Config, DataConfig
from pipo_jax.data.arith import to_messages
from pipo_jax.data.tfds_builder import load_source
from pipo_jax.tokenizer import Tokenizer

# Salts that keep the streams derived from one stage seed independent of each other.
_SHUFFLE_SALT = 0x5F1E
_PAD_SALT = 0x9AD5


def example_to_ids(tokenizer: Tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """Token ids of one example: ``(prompt_ids, response_ids)``.

    The prompt is the chat template of the system + user messages followed by the assistant header
    and ``<think>\\n``; the response is the worked solution followed by EOS.
    """
    prompt = tokenizer.chat_prompt(to_messages(example)) + tokenizer.think_prefix()
    response = tokenizer.encode(example["response"]) + [tokenizer.eos_id]
    return prompt, response


def _shuffle_seed(seed: int) -> int:
    # grain shuffles epoch e with seed + e; hashing the stage seed keeps seeds s and s + 1 from
    # sharing all but one epoch order.
    return int(np.random.SeedSequence([seed, _SHUFFLE_SALT]).generate_state(1)[0])


def _ar_row(prompt: list[int], response: list[int]) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.asarray(prompt + response, dtype=np.int32)
    mask = np.zeros(len(tokens), dtype=bool)
    mask[len(prompt):] = True
    return tokens, mask


def _make_batch(step: int, examples: Sequence[tuple[list[int], list[int]]], *, stage: str,
                seed: int, pad_ratio_max: float, max_len: int,
                pad_id: int) -> dict[str, np.ndarray]:
    """Stacks one step's examples into fixed-shape arrays.

    Returns ``tokens`` [B, T] int32, ``loss_mask`` [B, T] bool (True at prediction targets) and
    ``pad_ratio`` [] float32, the PAD-augmentation ratio drawn for this step (0 for ``ar``).
    """
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    ratio = 0.0
    if stage == "ar":
        rows = [_ar_row(p, r) for p, r in examples]
    else:
        rng = np.random.default_rng([seed, step, _PAD_SALT])
        # One ratio per step shared by every row (as in the paper), so the step's extra length is
        # roughly uniform across the batch.
        ratio = float(rng.uniform(0.0, pad_ratio_max))
        for p, r in examples:
            tokens, mask = pairs.build_pair_sequence(p, r, pad_id)
            rows.append(pairs.random_pad_split(tokens, mask, ratio, rng, pad_id))
    fitted = [pairs.fit_to_length(t, m, max_len, pad_id) for t, m in rows]
    return {"tokens": np.stack([t for t, _ in fitted]),
            "loss_mask": np.stack([m for _, m in fitted]),
            "pad_ratio": np.asarray(ratio, dtype=np.float32)}


def make_train_dataset(cfg: Config, tokenizer: Tokenizer, stage: str) -> grain.MapDataset:
    """Infinite step-indexed training batches for ``stage`` (``"ar"`` or ``"sft"``).

    ``ds[step]`` is a dict with ``tokens`` [B, T] int32, ``loss_mask`` [B, T] bool and
    ``pad_ratio`` [] float32, where ``B = cfg.<stage>.batch_size`` and ``T = cfg.data.max_len``.
    ``ar`` rows are prompt + response; ``sft`` rows are pair sequences with parity PADs and random
    PAD augmentation. Longer rows are truncated, shorter ones right-padded with PAD (no loss).
    Builds the dataset into ``cfg.data.data_dir`` first if needed.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    train_cfg = getattr(cfg, stage)
    if train_cfg.seed < 0:
        raise ValueError(f"{stage}.seed must be non-negative, got {train_cfg.seed}")
    make_batch = functools.partial(
        _make_batch, stage=stage, seed=train_cfg.seed, pad_ratio_max=train_cfg.pad_ratio_max,
        max_len=cfg.data.max_len, pad_id=tokenizer.pad_id)
    return (grain.MapDataset.source(load_source(cfg.data, "train"))
            .shuffle(seed=_shuffle_seed(train_cfg.seed))
            .repeat()
            .map(functools.partial(example_to_ids, tokenizer))
            .batch(train_cfg.batch_size, batch_fn=list)
            .map_with_index(make_batch))


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

"""Pair bookkeeping on the host: parity PADs and random PAD augmentation (SPEC §2, §4).

These run in numpy on the data side because they change sequence lengths; the device only ever
sees fixed-shape batches. The single rule they protect: PAD only ever occupies the second slot of
a pair (an odd position).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def assert_pad_at_odd(tokens: Sequence[int] | np.ndarray, pad_id: int,
                      length: int | None = None) -> None:
    """Raises if a PAD sits at an even position among the first ``length`` tokens."""
    arr = np.asarray(tokens)[: length if length is not None else None]
    even_pads = np.flatnonzero(arr[0::2] == pad_id) * 2
    if even_pads.size:
        raise AssertionError(
            f"PAD at even position(s) {even_pads[:8].tolist()}: pair invariant broken")


def parity_pad(ids: Sequence[int], pad_id: int) -> list[int]:
    """Appends one PAD when ``ids`` has odd length, so that pairs never straddle its end."""
    ids = list(ids)
    return ids + [pad_id] if len(ids) % 2 else ids


def build_pair_sequence(prompt_ids: Sequence[int], response_ids: Sequence[int],
                        pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompt and response → an even-length PIPO token sequence and its loss mask.

    Returns ``tokens_T`` (int32) and ``loss_mask_T`` (bool, True where the token is a training
    target: response tokens that are not PAD). The prompt is parity-padded so that no pair
    straddles the prompt/response boundary; the whole sequence is parity-padded at the end.
    """
    if not prompt_ids:
        raise ValueError("empty prompt: a PIPO sequence needs at least one prompt token")
    if pad_id in prompt_ids or pad_id in response_ids:
        raise ValueError("prompt and response must not contain PAD before pairing")
    prompt = parity_pad(prompt_ids, pad_id)
    tokens = parity_pad(prompt + list(response_ids), pad_id)
    mask = np.zeros(len(tokens), dtype=bool)
    mask[len(prompt): len(prompt) + len(response_ids)] = True
    out = np.asarray(tokens, dtype=np.int32)
    assert_pad_at_odd(out, pad_id)
    return out, mask


def pair_length(prompt_len: int, response_len: int) -> int:
    """Length of ``build_pair_sequence``'s output (parity PADs after the prompt and at the end)
    for a prompt and a response of these lengths, before PAD augmentation."""
    n = prompt_len + prompt_len % 2 + response_len
    return n + n % 2


def random_pad_split(tokens: np.ndarray, loss_mask: np.ndarray, ratio: float,
                     rng: np.random.Generator, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Random PAD augmentation (SPEC §4) of one even-length pair sequence.

    Eligible pairs are pairs whose second token is a target. ``max(1, round(ratio · n))`` of them
    (none when ``ratio`` is 0 or nothing is eligible) are split: ``(a, b)`` becomes ``(a, PAD),
    (b, PAD)``. Order of real tokens is kept; PADs land at odd positions and carry no loss.
    Returns the longer ``tokens`` and ``loss_mask``.
    """
    if len(tokens) % 2:
        raise ValueError(f"pair sequence must have even length, got {len(tokens)}")
    pairs_tok = np.asarray(tokens).reshape(-1, 2)
    pairs_mask = np.asarray(loss_mask).reshape(-1, 2)
    eligible = np.flatnonzero(pairs_mask[:, 1] & (pairs_tok[:, 1] != pad_id))
    if ratio <= 0 or eligible.size == 0:
        return np.asarray(tokens), np.asarray(loss_mask)
    n_split = min(eligible.size, max(1, int(round(ratio * eligible.size))))
    split = np.zeros(len(pairs_tok), dtype=bool)
    split[rng.choice(eligible, size=n_split, replace=False)] = True
    # Each pair becomes one row (unsplit) or two rows (split); build with a repeat and fix-ups.
    reps = np.where(split, 2, 1)
    out_tok = np.repeat(pairs_tok, reps, axis=0)
    out_mask = np.repeat(pairs_mask, reps, axis=0)
    first_rows = np.cumsum(reps) - reps  # row index where each original pair starts
    s_first = first_rows[split]
    out_tok[s_first + 1, 0] = pairs_tok[split, 1]
    out_mask[s_first + 1, 0] = pairs_mask[split, 1]
    out_tok[s_first, 1] = pad_id
    out_tok[s_first + 1, 1] = pad_id
    out_mask[s_first, 1] = False
    out_mask[s_first + 1, 1] = False
    return out_tok.reshape(-1), out_mask.reshape(-1)


def fit_to_length(tokens: np.ndarray, loss_mask: np.ndarray, length: int,
                  pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Truncates or right-pads (with PAD, no loss) one sequence to ``length`` tokens.

    Right padding lies after the sequence's end; causal attention never lets it reach a real
    position, so it may hold PADs at even positions without breaking the pair invariant.
    """
    out_tok = np.full(length, pad_id, dtype=np.int32)
    out_mask = np.zeros(length, dtype=bool)
    n = min(length, len(tokens))
    out_tok[:n] = tokens[:n]
    out_mask[:n] = loss_mask[:n]
    return out_tok, out_mask

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


PAD_AUGMENT_MODES = ("split", "shift", "mix")


def random_pad_augment(tokens: np.ndarray, loss_mask: np.ndarray, ratio: float,
                       rng: np.random.Generator, pad_id: int,
                       mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Random PAD augmentation (SPEC §4, issue #13) of one even-length pair sequence.

    The response is re-paired as the decoder would emit it with random rejections: every output
    pair takes the next real token as its first slot; its second slot is the following real token
    (a committed draft) or, with probability ``ratio`` per pair whose candidate second token is
    a target, a *rejection event*:

    * ``shift``: one rejection, ``(a, PAD)``; the rest of the sequence moves by one token, exactly
      the state after a rejected draft at inference: ``(a, PAD), (b, c), (d, e), …``. The MTP
      target at the ``(a, PAD)`` latent is the token after ``b``, a trained label.
    * ``split`` (the reference form): two rejections in a row, ``(a, PAD), (b, PAD)``; the pairing
      of the rest is unchanged, so each eligible original pair ``(a, b)`` is split independently
      with probability ``ratio``.
    * ``mix``: each event is a ``shift`` or a ``split`` with probability 1/2.

    Tokens before the first target (the prompt and its parity PAD) are kept as they are; the
    response's PADs (a trailing parity PAD, earlier augmentation) are dropped and re-made, and a
    final odd length gets its parity PAD. Order and loss mask of real tokens are kept; PADs land
    at odd positions and carry no loss. Returns the new ``tokens`` and ``loss_mask`` (1-D).
    """
    if mode not in PAD_AUGMENT_MODES:
        raise ValueError(f"pad augmentation mode must be one of {PAD_AUGMENT_MODES}, "
                         f"got {mode!r}")
    if len(tokens) % 2:
        raise ValueError(f"pair sequence must have even length, got {len(tokens)}")
    tokens, loss_mask = np.asarray(tokens), np.asarray(loss_mask)
    targets = np.flatnonzero(loss_mask)
    if ratio <= 0 or targets.size == 0:
        return tokens, loss_mask
    start = int(targets[0]) // 2 * 2  # the first pair that holds a target
    rest = tokens[start:]
    real = rest != pad_id
    rest_tok, rest_mask = rest[real].tolist(), loss_mask[start:][real].tolist()
    out_tok, out_mask = tokens[:start].tolist(), loss_mask[:start].tolist()
    n, i, pending = len(rest_tok), 0, 0
    while i < n:
        out_tok.append(rest_tok[i])
        out_mask.append(rest_mask[i])
        i += 1
        if i < n and pending == 0 and rest_mask[i] and rng.random() < ratio:
            split = mode == "split" or (mode == "mix" and rng.random() < 0.5)
            pending = 2 if split else 1
        if i < n and pending == 0:
            out_tok.append(rest_tok[i])
            out_mask.append(rest_mask[i])
            i += 1
        else:  # a rejected draft, or the parity PAD after the last token
            out_tok.append(pad_id)
            out_mask.append(False)
            pending = max(0, pending - 1)
    out = np.asarray(out_tok, dtype=tokens.dtype)
    assert_pad_at_odd(out, pad_id)
    return out, np.asarray(out_mask, dtype=bool)


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

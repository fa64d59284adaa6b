"""Pair bookkeeping (SPEC §2 parity rules, §4 random PAD augmentation), property-style.

hypothesis is not installed, so the properties run over many numpy-random cases instead.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipo_jax.model import pairs

PAD = 0
V = 40


def _rand_ids(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(1, V, n).tolist()


def _cases(n_cases: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(n_cases):
        prompt = _rand_ids(rng, int(rng.integers(1, 12)))
        yield rng, prompt, _rand_ids(rng, int(rng.integers(0, 25)))


# ------------------------------------------------------------------------------- parity rules


def test_parity_pad():
    assert pairs.parity_pad([5, 6, 7], PAD) == [5, 6, 7, PAD]
    assert pairs.parity_pad([5, 6], PAD) == [5, 6]
    assert pairs.parity_pad([], PAD) == []


@pytest.mark.parametrize(("prompt", "response", "tokens", "mask"), [
    # even prompt, even total: no PAD
    ([1, 2], [3, 4], [1, 2, 3, 4], [0, 0, 1, 1]),
    # odd prompt: one PAD after the prompt; total then even
    ([1, 2, 3], [4, 5], [1, 2, 3, PAD, 4, 5], [0, 0, 0, 0, 1, 1]),
    # even prompt, odd total: one PAD at the end
    ([1, 2], [3, 4, 5], [1, 2, 3, 4, 5, PAD], [0, 0, 1, 1, 1, 0]),
    # odd prompt and odd response: both PADs
    ([1], [2], [1, PAD, 2, PAD], [0, 0, 1, 0]),
    # empty response
    ([1, 2, 3], [], [1, 2, 3, PAD], [0, 0, 0, 0]),
])
def test_build_pair_sequence_examples(prompt, response, tokens, mask):
    t, m = pairs.build_pair_sequence(prompt, response, PAD)
    assert t.dtype == np.int32 and m.dtype == bool
    np.testing.assert_array_equal(t, tokens)
    np.testing.assert_array_equal(m, np.asarray(mask, bool))


def test_build_pair_sequence_properties():
    for _, prompt, response in _cases(300, 0):
        t, m = pairs.build_pair_sequence(prompt, response, PAD)
        p_len = len(prompt) + len(prompt) % 2
        expected_pads = len(prompt) % 2 + (p_len + len(response)) % 2
        assert len(t) % 2 == 0
        assert len(t) == len(prompt) + len(response) + expected_pads
        assert int((t == PAD).sum()) == expected_pads
        assert not (t[0::2] == PAD).any()  # PAD only at odd positions
        # The prompt, then the response starting at a pair boundary.
        np.testing.assert_array_equal(t[:len(prompt)], prompt)
        np.testing.assert_array_equal(t[p_len:p_len + len(response)], response)
        # Loss mask: exactly the response tokens; never the prompt, never a PAD.
        want = np.zeros(len(t), bool)
        want[p_len:p_len + len(response)] = True
        np.testing.assert_array_equal(m, want)
        assert not m[t == PAD].any()


def test_build_pair_sequence_rejects_bad_input():
    with pytest.raises(ValueError, match="empty prompt"):
        pairs.build_pair_sequence([], [1, 2], PAD)
    with pytest.raises(ValueError, match="PAD"):
        pairs.build_pair_sequence([1, PAD], [2], PAD)
    with pytest.raises(ValueError, match="PAD"):
        pairs.build_pair_sequence([1], [2, PAD, 3], PAD)


# ---------------------------------------------------------------------- random PAD augmentation


def _parse_split(t_in, m_in, t_out, m_out) -> list[int]:
    """Walks the output pair by pair against the input; returns the indices of split pairs.

    An input pair ``(a, b)`` must come out either unchanged (with its mask) or as
    ``(a, PAD), (b, PAD)`` with mask ``(m_a, False), (m_b, False)``; anything else fails.
    """
    pin, min_ = t_in.reshape(-1, 2), m_in.reshape(-1, 2)
    pout, mout = t_out.reshape(-1, 2), m_out.reshape(-1, 2)
    j, split = 0, []
    for i, ((a, b), (ma, mb)) in enumerate(zip(pin, min_, strict=True)):
        if tuple(pout[j]) == (a, b) and tuple(mout[j]) == (ma, mb):
            j += 1
        else:
            assert b != PAD, f"pair {i} ({a}, PAD) was changed"
            assert tuple(pout[j]) == (a, PAD) and tuple(pout[j + 1]) == (b, PAD), i
            assert tuple(mout[j]) == (ma, False) and tuple(mout[j + 1]) == (mb, False), i
            split.append(i)
            j += 2
    assert j == len(pout), "extra output pairs"
    return split


def _decoder_targets(t_out) -> None:
    """Brute force: replays ``t_out`` as a decoder would emit it, one pair per backbone pass,
    and checks that every latent's training targets are the tokens that decoder needs next.

    The emitted stream of real tokens is the response with its PADs removed. After latent ``i``
    (pairs ``0..i`` consumed) the decoder must produce ``token1`` = the first real token it has
    not emitted yet (the backbone target ``t[2i+2]``), and the MTP head must draft the real token
    after that one (``t[2i+3]``), unless that draft is rejected there (PAD: no label). This holds
    at ``(x, PAD)`` latents too: that is where the decoder runs after every rejection.
    """
    real = [int(x) for x in t_out if x != PAD]
    pairs_out = t_out.reshape(-1, 2)
    emitted = 0
    for i in range(len(pairs_out) - 1):
        emitted += int(pairs_out[i, 0] != PAD) + int(pairs_out[i, 1] != PAD)
        nxt_a, nxt_b = pairs_out[i + 1]
        assert nxt_a == real[emitted], f"latent {i}: backbone target is not the next token"
        if nxt_b != PAD:
            assert nxt_b == real[emitted + 1], f"latent {i}: MTP target skips a token"


@pytest.mark.parametrize("mode", pairs.PAD_AUGMENT_MODES)
def test_random_pad_augment_properties(mode):
    n_events = 0
    for rng, prompt, response in _cases(400, 1):
        t, m = pairs.build_pair_sequence(prompt, response, PAD)
        ratio = float(rng.choice([0.0, rng.random() * 0.5, rng.random(), 1.0]))
        t2, m2 = pairs.random_pad_augment(t, m, ratio, rng, PAD, mode)
        assert len(t2) % 2 == 0 and len(t2) == len(m2)
        assert not (t2[0::2] == PAD).any(), "PAD at an even position"
        # Real tokens in the same order, with the same loss mask; PAD labels ignored.
        np.testing.assert_array_equal(t2[t2 != PAD], t[t != PAD])
        np.testing.assert_array_equal(m2[t2 != PAD], m[t != PAD])
        assert not m2[t2 == PAD].any()
        # The prompt and its parity PAD are untouched.
        p_len = len(prompt) + len(prompt) % 2
        np.testing.assert_array_equal(t2[:p_len], t[:p_len])
        _decoder_targets(t2[p_len:])
        if mode == "split":
            split = _parse_split(t, m, t2, m2)
            pin, min_ = t.reshape(-1, 2), m.reshape(-1, 2)
            eligible = [i for i in range(len(pin)) if min_[i, 1] and pin[i, 1] != PAD]
            assert set(split) <= set(eligible), "split a pair whose second token is not a target"
            if ratio == 1.0:
                assert split == eligible
        n_events += int((t2 == PAD).sum() > (t == PAD).sum())
    assert n_events > 100  # the loop really exercised augmentation


def test_random_pad_augment_zero_ratio_or_no_target_is_identity():
    rng = np.random.default_rng(0)
    for mode in pairs.PAD_AUGMENT_MODES:
        t, m = pairs.build_pair_sequence([1, 2, 3, 4], [], PAD)  # prompt only
        for ratio in (0.0, 0.5, 1.0):
            t2, m2 = pairs.random_pad_augment(t, m, ratio, rng, PAD, mode)
            np.testing.assert_array_equal(t2, t)
            np.testing.assert_array_equal(m2, m)
        t, m = pairs.build_pair_sequence([1, 2], [3, 4, 5, 6], PAD)
        t2, m2 = pairs.random_pad_augment(t, m, 0.0, rng, PAD, mode)
        np.testing.assert_array_equal(t2, t)
        # A response of one token has no second token to reject.
        t, m = pairs.build_pair_sequence([1, 2], [3], PAD)
        t2, _ = pairs.random_pad_augment(t, m, 1.0, rng, PAD, mode)
        np.testing.assert_array_equal(t2, t)


def test_random_pad_augment_full_ratio_examples():
    t, m = pairs.build_pair_sequence([7, 8, 9], [1, 2, 3, 4, 5], PAD)  # 7 8 | 9 P | 1 2 | 3 4 | 5 P
    rng = np.random.default_rng(0)
    # split: every response pair (a, b) -> (a, PAD), (b, PAD).
    t2, m2 = pairs.random_pad_augment(t, m, 1.0, rng, PAD, "split")
    np.testing.assert_array_equal(t2, [7, 8, 9, PAD, 1, PAD, 2, PAD, 3, PAD, 4, PAD, 5, PAD])
    np.testing.assert_array_equal(m2, [0, 0, 0, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0])
    # shift at ratio 1 rejects every draft: one real token per pair, as decoding at tau = 1.
    t2, m2 = pairs.random_pad_augment(t, m, 1.0, rng, PAD, "shift")
    np.testing.assert_array_equal(t2, [7, 8, 9, PAD, 1, PAD, 2, PAD, 3, PAD, 4, PAD, 5, PAD])


def test_random_pad_augment_shift_moves_the_rest_by_one():
    t, m = pairs.build_pair_sequence([7, 8], [1, 2, 3, 4, 5, 6], PAD)  # 7 8 | 1 2 | 3 4 | 5 6

    class FirstOnly:  # rejects only the first eligible draft
        def __init__(self) -> None:
            self.calls = 0

        def random(self) -> float:
            self.calls += 1
            return 0.0 if self.calls == 1 else 1.0

    t2, m2 = pairs.random_pad_augment(t, m, 0.5, FirstOnly(), PAD, "shift")
    # (1, PAD), (2, 3), (4, 5), (6, PAD): the MTP target at the (1, PAD) latent is 3, trained.
    np.testing.assert_array_equal(t2, [7, 8, 1, PAD, 2, 3, 4, 5, 6, PAD])
    np.testing.assert_array_equal(m2, [0, 0, 1, 0, 1, 1, 1, 1, 1, 0])
    t3, _ = pairs.random_pad_augment(t, m, 0.5, FirstOnly(), PAD, "split")
    np.testing.assert_array_equal(t3, [7, 8, 1, PAD, 2, PAD, 3, 4, 5, 6])


@pytest.mark.parametrize("mode", pairs.PAD_AUGMENT_MODES)
def test_random_pad_augment_is_a_per_pair_bernoulli_draw(mode):
    """Each eligible pair holds an event with probability ``ratio``, independently: the event
    count over many rows matches a binomial, and any number of events (zero too) occurs."""
    t, m = pairs.build_pair_sequence([1, 2], list(range(3, 43)), PAD)  # 20 response pairs
    ratio, counts = 0.2, []
    for seed in range(400):
        t2, _ = pairs.random_pad_augment(t, m, ratio, np.random.default_rng(seed), PAD, mode)
        counts.append(int((t2 == PAD).sum()))
    counts = np.asarray(counts)
    assert (counts == 0).any() and len(set(counts.tolist())) > 4
    if mode == "split":  # frame kept: 20 pairs, 2 PADs per split, none otherwise
        np.testing.assert_allclose(counts.mean() / 2, 20 * ratio, rtol=0.1)


def test_random_pad_augment_rejects_bad_input():
    with pytest.raises(ValueError, match="even length"):
        pairs.random_pad_augment(np.arange(1, 4), np.ones(3, bool), 0.5,
                                 np.random.default_rng(0), PAD, "shift")
    t, m = pairs.build_pair_sequence([1, 2], [3, 4], PAD)
    with pytest.raises(ValueError, match="split"):
        pairs.random_pad_augment(t, m, 0.5, np.random.default_rng(0), PAD, "insert")


# ------------------------------------------------------------------------ pair invariant check


def test_assert_pad_at_odd():
    pairs.assert_pad_at_odd([1, PAD, 2, PAD], PAD)
    pairs.assert_pad_at_odd(np.array([1, 2, 3, 4]), PAD)
    with pytest.raises(AssertionError, match=r"even position\(s\) \[2\]"):
        pairs.assert_pad_at_odd([1, PAD, PAD, 3], PAD)
    with pytest.raises(AssertionError, match=r"\[0\]"):
        pairs.assert_pad_at_odd([PAD, 1], PAD)
    # ``length`` limits the check to the real part (right padding may hold even PADs).
    pairs.assert_pad_at_odd([1, 2, 3, PAD, PAD, PAD], PAD, length=4)
    with pytest.raises(AssertionError):
        pairs.assert_pad_at_odd([1, 2, 3, PAD, PAD, PAD], PAD, length=5)


def test_assert_pad_at_odd_random():
    rng = np.random.default_rng(3)
    for _ in range(200):
        t = rng.integers(0, 4, int(rng.integers(1, 20)))  # PAD is frequent
        if (t[0::2] == PAD).any():
            with pytest.raises(AssertionError):
                pairs.assert_pad_at_odd(t, PAD)
        else:
            pairs.assert_pad_at_odd(t, PAD)


# ----------------------------------------------------------------------------- fit_to_length


def test_fit_to_length():
    t, m = pairs.build_pair_sequence([1, 2, 3], [4, 5, 6], PAD)  # 1 2 3 P 4 5 6 P
    t8, m8 = pairs.fit_to_length(t, m, 12, PAD)
    assert t8.dtype == np.int32 and m8.dtype == bool and t8.shape == m8.shape == (12,)
    np.testing.assert_array_equal(t8, [1, 2, 3, PAD, 4, 5, 6, PAD, PAD, PAD, PAD, PAD])
    np.testing.assert_array_equal(m8, [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0])
    t5, m5 = pairs.fit_to_length(t, m, 6, PAD)
    np.testing.assert_array_equal(t5, [1, 2, 3, PAD, 4, 5])
    np.testing.assert_array_equal(m5, [0, 0, 0, 0, 1, 1])
    te, me = pairs.fit_to_length(t, m, len(t), PAD)
    np.testing.assert_array_equal(te, t)
    np.testing.assert_array_equal(me, m)


@pytest.mark.parametrize("prompt_len", [1, 2, 5, 8])
@pytest.mark.parametrize("response_len", [0, 1, 4, 7])
def test_pair_length_is_the_length_of_the_pair_sequence(prompt_len, response_len):
    tokens, _ = pairs.build_pair_sequence(list(range(1, prompt_len + 1)),
                                          list(range(100, 100 + response_len)), pad_id=0)
    assert pairs.pair_length(prompt_len, response_len) == len(tokens)

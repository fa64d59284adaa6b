"""The Bayes ceiling of MTP top-1 on the mixed task (``benchmarks.mtp_ceiling``)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.mtp_ceiling import ceiling, line_ceiling, response_ceiling
from pipo_jax.data import mixed


def test_line_ceiling_by_hand() -> None:
    # After "a" three phrasings remain: "b" twice, "c" once, so the best guess is "b"; after
    # "ab" the line ends or goes on with "!", a tie.
    assert line_ceiling(["ab", "ab!", "ac"], "ab") == [1.0, 1.0, 0.5]
    assert line_ceiling(["ab", "ab!", "ac"], "ac") == [1.0, 0.0, 1.0]
    assert line_ceiling(["x", "y"], "y") == [0.5, 1.0]  # a tie: either guess, right half the time
    with pytest.raises(ValueError, match="phrasings"):
        line_ceiling(["ab"], "zz")


def test_response_ceiling_covers_every_character_and_one_phrasing_is_certain(
        monkeypatch: pytest.MonkeyPatch) -> None:
    probs = response_ceiling("add", 47, 85, seed=0)
    assert len(probs) == len(mixed.worked_solution("add", 47, 85, 0)[0])
    assert 0.0 <= probs.min() and probs.max() == 1.0 and probs.mean() < 1.0
    # With one phrasing per line nothing is uncertain.
    single = {op: {k: v[:1] for k, v in forms.items()} for op, forms in mixed.PHRASINGS.items()}
    monkeypatch.setattr(mixed, "PHRASINGS", single)
    np.testing.assert_array_equal(response_ceiling("add", 47, 85, 0), 1.0)
    assert ceiling(6, ("add",)) == {"mtp_ceiling": 1.0, "backbone_ceiling": 1.0}

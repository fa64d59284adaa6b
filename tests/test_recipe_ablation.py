"""The ablation's recipe list (``benchmarks.recipe_ablation.arms``): every arm differs from the
run's own recipe in one setting."""

from __future__ import annotations

import dataclasses

from benchmarks.recipe_ablation import Arm, arms
from pipo_jax.config import Config, OpdConfig, SftConfig


def _base(dense: float, mode: str = "shift") -> Config:
    return Config(sft=SftConfig(pad_augment=mode, pad_dense_frac=dense),
                  opd=OpdConfig(rollout_threshold=0.9))


def test_arms_without_dense_rows() -> None:
    got = arms(_base(0.0), 0.9, with_split_opd=False)
    assert [a.name for a in got] == ["sft:split", "sft:shift", "sft:mix", "opd:ungated",
                                     "opd:gated"]
    assert {a.pad_dense_frac for a in got} == {0.0}


def test_dense_arms() -> None:
    got = {a.name: a for a in arms(_base(0.0), 0.9, with_split_opd=True, dense_frac=0.25)}
    assert got["sft:shift-dense0.25"] == Arm("sft:shift-dense0.25", "shift", 0.25)
    assert got["opd:gated-dense0.25"] == Arm("opd:gated-dense0.25", "shift", 0.25, 0.9)
    # Every other arm keeps the run's own (no) dense rows.
    for name, arm in got.items():
        if "dense" not in name:
            assert arm.pad_dense_frac == 0.0, name
    assert got["opd:gated"] == Arm("opd:gated", "shift", 0.0, 0.9)
    assert got["opd:ungated"].rollout_threshold == -1.0
    assert got["opd:gated-from-split"] == Arm("opd:gated-from-split", "split", 0.0, 0.9)
    assert got["sft:mix"].stage == "sft" and got["opd:gated"].stage == "opd"
    # A run with dense rows gets the control without them; the run's own setting adds nothing.
    names = [a.name for a in arms(_base(0.25), 0.9, False, dense_frac=0.0)]
    assert "sft:shift-no-dense" in names and "opd:gated-no-dense" in names
    assert not [a for a in arms(_base(0.25), 0.9, False, dense_frac=0.25) if "dense" in a.name]


def test_arms_name_the_runs_own_mode() -> None:
    got = [a.name for a in arms(dataclasses.replace(_base(0.5, "mix")), 0.9, False)]
    assert "opd:gated-from-split" not in got and "sft:mix" in got


def test_per_row_arm() -> None:
    got = {a.name: a for a in arms(_base(0.25), 0.9, False, (0.9, 0.99, 1.0))}
    assert got["opd:per-row"] == Arm("opd:per-row", "shift", 0.25, 0.9, (0.9, 0.99, 1.0))
    assert "opd:per-row" not in {a.name for a in arms(_base(0.25), 0.9, False)}
    # A run that gates per row gets its own recipe as the arm (linked, not retrained).
    base = _base(0.0)
    base = dataclasses.replace(base, opd=dataclasses.replace(base.opd,
                                                             rollout_thresholds=(0.9, 0.99)))
    assert {a.name: a for a in arms(base, 0.9, False)}["opd:per-row"].rollout_thresholds == (
        0.9, 0.99)

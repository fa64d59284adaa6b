"""Gradient accumulation (``<stage>.grad_accum``) and per-sample loss averaging
(``<stage>.loss_average``), issue #17: one step over ``n`` scanned micro-batches is the step on
the whole batch (loss, metrics, parameters and optimizer state after it), for the SFT and AR
objectives and both averages (OPD's accumulated step: ``tests/test_opd.py``)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipo_jax.config import ConfigError, load_config
from pipo_jax.model import lora as lora_lib
from pipo_jax.model import sharding
from pipo_jax.train import losses, supervised
from pipo_jax.train.state import TrainState, make_optimizer

REPO = Path(__file__).resolve().parents[1]
MICRO = REPO / "configs" / "micro.yaml"
B, T = 8, 48
# Rows of very different target counts (the prompt masked, the rest of each row a PAD tail):
# a mean of micro-batch means weighs a short row's tokens more than the batch's mean does.
TARGETS = (40, 3, 25, 8, 44, 0, 17, 30)  # a row with no target: the sample mean skips it


def _batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(16, 272, size=(B, T)).astype(np.int32)
    mask = np.zeros((B, T), bool)
    for i, n in enumerate(TARGETS):
        mask[i, 4:4 + n] = True
    return {"tokens": tokens, "loss_mask": mask}


def _setup(objective: str, *overrides: str):
    stage = objective  # each objective's own stage
    extra = ["mtp.tuner=mtp"] if objective == "mtp" else []
    cfg = load_config(MICRO, [f"{stage}.batch_size={B}", f"{stage}.learning_rate=1e-2",
                              f"{stage}.warmup_frac=0.0", *extra, *overrides])
    tc = getattr(cfg, stage)
    pipo = objective == "sft"
    params = helpers.random_params(cfg.model, pipo, seed=3, drafter=objective == "mtp")
    return cfg, tc, pipo, params


def _step(cfg, tc, pipo, params, batch):
    tx = make_optimizer(tc)
    state = TrainState(step=jnp.int32(0), params=params,
                       opt_state=tx.init(_trained(params, tc)))
    fn = jax.jit(functools.partial(supervised.train_step, mcfg=cfg.model, tc=tc, pipo=pipo,
                                   tx=tx))
    return jax.device_get(fn(state, batch))


def _trained(params, tc):
    return lora_lib.partition(params, tc.tuner)[0]


@pytest.mark.parametrize("objective,average,splits", [("sft", "token", (4,)),
                                                      ("sft", "sample", (2,)),
                                                      ("ar", "sample", (2,))])
def test_accumulated_step_equals_the_big_batch_step(objective: str, average: str,
                                                    splits: tuple[int, ...]):
    cfg, tc, pipo, params = _setup(objective, f"{objective}.loss_average={average}")
    batch = _batch()
    want_state, want = _step(cfg, tc, pipo, params, batch)
    for n in splits:
        tc_n = dataclasses.replace(tc, grad_accum=n)
        got_state, got = _step(cfg, tc_n, pipo, params, batch)
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=1e-7,
                                       err_msg=f"grad_accum {n}: {key}")
        chex.assert_trees_all_close(got_state.params, want_state.params, rtol=1e-5, atol=1e-6)
        # Adam's moments: float32 sums in another order (|g| ≲ 0.1: a 1e-6 absolute slack).
        chex.assert_trees_all_close(got_state.opt_state, want_state.opt_state, rtol=1e-4,
                                    atol=1e-6)
        assert int(got_state.step) == 1
    # The test has power: the mean of the micro-batches' own means is another number.
    loss = jax.jit(functools.partial(supervised.stage_loss, mcfg=cfg.model, tc=tc, pipo=pipo))
    halves = [float(loss(params, {}, batch={k: v[i::2] for k, v in batch.items()})[0])
              for i in (0, 1)]
    assert abs(np.mean(halves) - float(want["loss"])) > 1e-4 * float(want["loss"])  # ≫ fp32


def test_sample_average_is_the_mean_of_row_means():
    x = jnp.asarray([[1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 0.0, 0.0], [5.0, 5.0, 0.0, 0.0]])
    mask = jnp.asarray([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    np.testing.assert_allclose(losses.masked_mean(x, mask, "sample"), (2.5 + 10.0) / 2)
    np.testing.assert_allclose(losses.masked_mean(x, mask, "token"), 20.0 / 5)
    # Split into micro-batches with the whole batch's denominator, the parts add up.
    for average in ("token", "sample"):
        total = losses.mask_total(mask, average)
        parts = [losses.masked_mean(x[i:i + 1], mask[i:i + 1], average, total) for i in range(3)]
        np.testing.assert_allclose(sum(parts), losses.masked_mean(x, mask, average), rtol=1e-6)


def test_bad_accumulation_settings_are_one_line_errors():
    with pytest.raises(ConfigError, match=r"batch_size \(4\) must be a multiple of grad_accum "
                                          r"\(3"):
        load_config(MICRO, ["sft.grad_accum=3"])
    with pytest.raises(ConfigError, match="grad_accum"):
        load_config(MICRO, ["sft.grad_accum=0"])
    with pytest.raises(ConfigError, match="loss_average"):
        load_config(MICRO, ["ar.loss_average=row"])
    with pytest.raises(ConfigError, match="opd.loss_average must be token"):
        load_config(MICRO, ["opd.loss_average=sample"])
    with pytest.raises(ConfigError, match=r"batch_size \(4\) must be a multiple of grad_accum"):
        load_config(MICRO, ["opd.grad_accum=3"])


def test_default_settings_keep_the_unaccumulated_step():
    """``grad_accum: 1`` and ``loss_average: token`` are the defaults and trace the step that
    existed before them (no scan), so earlier runs reproduce bit for bit."""
    cfg = load_config(MICRO, [])
    for stage in ("teacher", "ar", "mtp", "sft", "opd"):
        tc = getattr(cfg, stage)
        assert (tc.grad_accum, tc.loss_average) == (1, "token")
    cfg, tc, pipo, params = _setup("sft")
    tx = make_optimizer(tc)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
    fn = functools.partial(supervised.train_step, mcfg=cfg.model, tc=tc, pipo=pipo, tx=tx)
    jaxpr = str(jax.make_jaxpr(fn)(state, _batch()))
    accumulated = functools.partial(supervised.train_step, mcfg=cfg.model,
                                    tc=dataclasses.replace(tc, grad_accum=2), pipo=pipo, tx=tx)
    assert str(jax.make_jaxpr(accumulated)(state, _batch())).count("scan") > jaxpr.count("scan")


class _Crash(Exception):
    pass


def test_an_accumulated_run_resumes_bit_exact_mid_run(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An AR stage with ``grad_accum=2`` killed after step 5 (checkpoint 3 on disk) and resumed
    logs the uninterrupted run's losses and ends on its parameters and optimizer state, bit for
    bit: the accumulated step is atomic, its micro-batches a pure function of the batch."""
    from pipo_jax.io import checkpoint as ckpt
    from pipo_jax.train.metrics import read_jsonl
    from pipo_jax.train.pipeline import train_stage
    from pipo_jax.train.state import state_shardings

    def config(name: str):
        return load_config(MICRO, [f"run_dir={tmp_path / name}",
                                   f"data.data_dir={tmp_path / 'tfds'}", "ar.steps=6",
                                   "ar.ckpt_every=3", "ar.log_every=1", "ar.batch_size=4",
                                   "ar.grad_accum=2"])

    straight = train_stage(config("a"), "ar", progress=False)
    real = supervised.make_train_dataset

    class Crashing:
        def __init__(self, data) -> None:
            self._data = data

        def __getitem__(self, step: int):
            if step == 5:
                raise _Crash("killed before step 6")
            return self._data[step]

    with monkeypatch.context() as mp:
        mp.setattr(supervised, "make_train_dataset", lambda *a, **k: Crashing(real(*a, **k)))
        with pytest.raises(_Crash):
            train_stage(config("b"), "ar", progress=False)
    assert ckpt.all_steps(tmp_path / "b" / "ar") == [3]
    resumed = train_stage(config("b"), "ar", progress=False)
    assert straight.steps == resumed.steps == 6

    def by_step(name: str) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_jsonl(tmp_path / name / "ar")}

    assert by_step("b") == by_step("a")
    cfg = config("a")
    tx = make_optimizer(cfg.ar)
    abstract, shardings = state_shardings(cfg.model, False, tx, sharding.build_mesh(cfg.mesh))
    target = ckpt.abstract_target(abstract, shardings)
    a, _ = ckpt.restore(tmp_path / "a" / "ar", target)
    b, _ = ckpt.restore(tmp_path / "b" / "ar", target)
    chex.assert_trees_all_equal(a.params, b.params)
    chex.assert_trees_all_equal(a.opt_state, b.opt_state)

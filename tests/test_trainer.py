"""Training stages end to end on the micro config: learning, checkpoints, resume, failure modes.

One micro run (AR then SFT, 30 steps each on a fixed set of 8 examples) is trained once per
module; the other tests copy its AR stage or read it. Runs that share its config reuse its
compiled train step through a persistent compilation cache shared by this test session, so a
resumed or failing run only pays for its own steps.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
from pathlib import Path
from typing import Any

import chex
import jax
import numpy as np
import pytest

import pipo_jax
from pipo_jax.config import Config, load_config
from pipo_jax.data.loader import make_train_dataset
from pipo_jax.decode.runner import PipoRunner
from pipo_jax.errors import TrainingError
from pipo_jax.io import checkpoint as ckpt
from pipo_jax.io.tokenizer import ByteTokenizer
from pipo_jax.model import sharding
from pipo_jax.train import supervised
from pipo_jax.train.loop import StageResult
from pipo_jax.train.metrics import read_jsonl

# A failed restore can leave tensorstore callbacks that Python reports later as "unraisable";
from pipo_jax.train.pipeline import train_stage
from pipo_jax.train.state import TrainState, make_optimizer, state_shardings

# A failed restore can leave tensorstore callbacks that Python reports later as "unraisable";
# they are harmless (see tests/test_checkpoint.py).
pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.usefixtures("compilation_cache_dir")]

REPO = Path(__file__).resolve().parents[1]
MICRO = REPO / "configs" / "micro.yaml"
STEPS = 30
CKPT_EVERY = 10
QUESTIONS = ["What is 12 + 34?", "What is 71 - 5?"]


def micro_config(run_dir: Path, data_dir: Path, *overrides: str) -> Config:
    """configs/micro.yaml learning a fixed batch: 8 training examples, batch size 8.

    Every step sees the same 8 examples (in a new order and, for sft, with new PAD
    augmentation), so both cross-entropies fall quickly and reliably.
    """
    stage_overrides = [f"{stage}.{k}={v}" for stage in ("ar", "sft") for k, v in
                       (("steps", STEPS), ("batch_size", 8), ("log_every", 1),
                        ("ckpt_every", CKPT_EVERY))]
    return load_config(MICRO, [f"run_dir={run_dir}", f"data.data_dir={data_dir}",
                               "data.num_train=8", "data.max_len=128", *stage_overrides,
                               *overrides])


@dataclasses.dataclass
class TrainedRun:
    cfg: Config
    run_dir: Path
    data_dir: Path
    results: dict[str, StageResult]
    # Host copies of every state handed to checkpoint.save, keyed by (stage, step).
    saved: dict[tuple[str, int], TrainState]


def _host_copy(tree: Any) -> Any:
    # A real copy: the next step donates the device buffers this state lives in.
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """The micro run, trained once; records the in-memory state of every checkpoint."""
    root = tmp_path_factory.mktemp("trained")
    cfg = micro_config(root / "run", root / "tfds")
    saved: dict[tuple[str, int], Any] = {}
    real_save = ckpt.save

    def recording_save(manager: Any, step: int, state: Any, cfg: Config, stage: str,
                       **kw: Any) -> bool:
        saved[(Path(manager.directory).parent.name, step)] = _host_copy(state)
        return real_save(manager, step, state, cfg, stage, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ckpt, "save", recording_save)
        results = {stage: train_stage(cfg, stage, progress=False) for stage in ("ar", "sft")}
    return TrainedRun(cfg, root / "run", root / "tfds", results, saved)


def _abstract_state(cfg: Config, stage: str) -> Any:
    tx = make_optimizer(getattr(cfg, stage))
    mesh = sharding.build_mesh(cfg.mesh)
    abstract, shardings = state_shardings(cfg.model, stage == "sft", tx, mesh)
    return ckpt.abstract_target(abstract, shardings)


def _by_step(records: list[dict]) -> dict[int, dict]:
    """Metric records by step; a step logged twice (before and after a resume) keeps the later."""
    return {r["step"]: r for r in records}


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _copy_ar_stage(trained: TrainedRun, run_dir: Path) -> None:
    shutil.copytree(trained.run_dir / "ar", run_dir / "ar")


class _StepIndexedData:
    """Wraps ``make_train_dataset``'s result; ``hook(step)`` runs before each batch is read."""

    def __init__(self, data: Any, hook: Any) -> None:
        self._data, self._hook = data, hook

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        return self._hook(step, self._data[step])


def _patch_data(monkeypatch: pytest.MonkeyPatch, hook: Any) -> None:
    real = supervised.make_train_dataset
    monkeypatch.setattr(supervised, "make_train_dataset",
                        lambda *a, **kw: _StepIndexedData(real(*a, **kw), hook))


class SimulatedCrash(Exception):
    pass


# --------------------------------------------------------------------------- learning


def test_run_trains_both_stages_and_checkpoints(trained):
    for stage in ("ar", "sft"):
        result = trained.results[stage]
        assert result.stage_dir == trained.run_dir / stage
        assert result.steps == STEPS
        assert math.isfinite(result.final_metrics["loss"])
        # keep_checkpoints=2: the two newest of 10, 20, 30.
        assert ckpt.all_steps(result.stage_dir) == [2 * CKPT_EVERY, STEPS]
        records = read_jsonl(result.stage_dir)
        assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # log_every=1
    assert (trained.run_dir / "config.json").is_file()


@pytest.mark.parametrize("stage,keys", [("ar", ["loss_backbone"]),
                                        ("sft", ["loss_backbone", "loss_mtp"])])
def test_training_lowers_cross_entropy(trained, stage, keys):
    records = read_jsonl(trained.run_dir / stage)
    for key in keys:
        values = [r[key] for r in records]
        assert all(v is not None and math.isfinite(v) for v in values), (stage, key)
        early, late = np.mean(values[:3]), np.mean(values[-3:])
        assert late < 0.85 * early, f"{stage} {key} did not fall: {early:.3f} -> {late:.3f}"


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("stage", ["ar", "sft"])
def test_checkpoint_restore_gives_identical_state(trained, stage):
    abstract = _abstract_state(trained.cfg, stage)
    for step in ckpt.all_steps(trained.run_dir / stage):
        state, cfg = ckpt.restore(trained.run_dir / stage, abstract, step=step)
        assert int(state.step) == step
        chex.assert_trees_all_equal(state, trained.saved[(stage, step)])
        assert cfg == trained.cfg


def test_loaded_runner_matches_in_memory_params(trained):
    loaded = pipo_jax.load(trained.run_dir)
    final_sft = trained.saved[("sft", STEPS)].params
    final_ar = trained.saved[("ar", STEPS)].params
    chex.assert_trees_all_equal(loaded.params, final_sft)
    chex.assert_trees_all_equal(loaded.ar_params, final_ar)
    assert loaded.config == trained.cfg

    in_memory = PipoRunner(trained.cfg, jax.device_put(final_sft), jax.device_put(final_ar))
    # threshold -1 commits every draft, so the MTP head's tokens are compared too.
    for model, options in (("pipo", {}), ("pipo", {"threshold": -1.0}), ("ar", {})):
        a = in_memory.generate(QUESTIONS, model=model, temperature=0.0, **options)
        b = loaded.generate(QUESTIONS, model=model, temperature=0.0, **options)
        assert [g.tokens for g in a] == [g.tokens for g in b], (model, options)
        assert [g.stats for g in a] == [g.stats for g in b], (model, options)
        assert all(g.stats["tokens"] > 0 for g in a)


# --------------------------------------------------------------------------- resume


def test_batches_are_a_pure_function_of_step(trained):
    tok = ByteTokenizer()
    for stage in ("ar", "sft"):
        first = make_train_dataset(trained.cfg, tok, stage)
        second = make_train_dataset(trained.cfg, tok, stage)
        for step in (13, 0, 29, 13):  # out of order and repeated: no iterator state
            chex.assert_trees_all_equal(first[step], second[step])
    sft = make_train_dataset(trained.cfg, tok, "sft")
    assert not np.array_equal(sft[0]["tokens"], sft[1]["tokens"])  # steps differ


def test_resume_after_crash_matches_uninterrupted_run(trained, tmp_path, monkeypatch):
    """Run B crashes while reading the batch of step 17 and resumes from checkpoint 10; its
    steps 11-30 must reproduce run A's (the module run) losses and final parameters."""
    crash_index = 16  # 0-based: steps 1-16 ran, checkpoint 10 is the last one on disk
    cfg = dataclasses.replace(trained.cfg, run_dir=str(tmp_path / "run"))
    _copy_ar_stage(trained, tmp_path / "run")
    stage_dir = tmp_path / "run" / "sft"

    def crash(step: int, batch: dict) -> dict:
        if step == crash_index:
            raise SimulatedCrash(f"killed before step {step + 1}")
        return batch

    with monkeypatch.context() as mp:
        _patch_data(mp, crash)
        with pytest.raises(SimulatedCrash):
            train_stage(cfg, "sft", progress=False)
    assert ckpt.all_steps(stage_dir) == [CKPT_EVERY]
    logged_before = [r["step"] for r in read_jsonl(stage_dir)]
    assert logged_before[-1] > CKPT_EVERY  # some steps after the checkpoint are redone

    result = train_stage(cfg, "sft", progress=False)
    assert result.steps == STEPS
    assert ckpt.all_steps(stage_dir) == [2 * CKPT_EVERY, STEPS]
    records = read_jsonl(stage_dir)
    # The resumed run continues the step count: its first record is step 11, not step 1.
    resumed = records[len(logged_before):]
    assert [r["step"] for r in resumed] == list(range(CKPT_EVERY + 1, STEPS + 1))

    want = _by_step(read_jsonl(trained.run_dir / "sft"))
    got = _by_step(records)
    assert sorted(got) == sorted(want)
    for step in sorted(want):
        for key in ("loss", "loss_backbone", "loss_mtp", "loss_confidence", "grad_norm",
                    "learning_rate", "pad_ratio", "target_tokens"):
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-5, atol=0,
                                       err_msg=f"step {step} {key}")

    abstract = _abstract_state(cfg, "sft")
    final, _ = ckpt.restore(stage_dir, abstract)
    assert int(final.step) == STEPS
    chex.assert_trees_all_close(final.params, trained.saved[("sft", STEPS)].params,
                                rtol=1e-5, atol=1e-6)


def test_finished_stage_is_skipped(trained):
    before = _tree_digest(trained.run_dir / "sft" / "checkpoints")
    result = train_stage(trained.cfg, "sft", progress=False)
    assert result.steps == STEPS and result.final_metrics == {}
    assert _tree_digest(trained.run_dir / "sft" / "checkpoints") == before


# --------------------------------------------------------------------------- failures


def test_nan_loss_raises_and_keeps_last_checkpoint(trained, tmp_path, monkeypatch):
    """A NaN loss stops training with a message naming the stage and step, and leaves the last
    committed checkpoint (written by an earlier, interrupted invocation) restorable.

    The NaN comes from the data: token ids beyond the vocabulary embed as NaN (``jnp.take``
    fills out-of-range rows with NaN), so the real train step computes a NaN loss; unlike a
    patched loss or learning rate, this keeps the module's compiled step usable.
    """
    cfg = dataclasses.replace(micro_config(tmp_path / "run", trained.data_dir),
                              ar=dataclasses.replace(trained.cfg.ar, ckpt_every=2))
    stage_dir = tmp_path / "run" / "ar"

    def stop_after_checkpoint_2(step: int, batch: dict) -> dict:
        if step == 2:
            raise SimulatedCrash("stopped after the checkpoint of step 2")
        return batch

    with monkeypatch.context() as mp:
        _patch_data(mp, stop_after_checkpoint_2)
        with pytest.raises(SimulatedCrash):
            train_stage(cfg, "ar", progress=False)
    assert ckpt.all_steps(stage_dir) == [2]
    committed = _tree_digest(ckpt.checkpoint_dir(stage_dir))

    def poison_step_4(step: int, batch: dict) -> dict:
        if step == 3:  # 0-based: step 3 trains normally, step 4 sees NaN
            batch = dict(batch, tokens=np.full_like(batch["tokens"], cfg.model.vocab_size + 7))
        return batch

    with monkeypatch.context() as mp:
        _patch_data(mp, poison_step_4)
        with pytest.raises(TrainingError, match=r"^ar loss is nan at step 4\b") as err:
            train_stage(cfg, "ar", progress=False)
    assert "learning_rate" in str(err.value)

    # Step 4 (due for a checkpoint with ckpt_every=2) was not saved; step 2 is as it was.
    assert ckpt.all_steps(stage_dir) == [2]
    assert _tree_digest(ckpt.checkpoint_dir(stage_dir)) == committed
    assert 4 not in _by_step(read_jsonl(stage_dir))
    state, _ = ckpt.restore(stage_dir, _abstract_state(cfg, "ar"))
    assert int(state.step) == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    # The same steps of the module run: the checkpoint holds the good step-2 state.
    assert _by_step(read_jsonl(stage_dir))[2]["loss"] == pytest.approx(
        _by_step(read_jsonl(trained.run_dir / "ar"))[2]["loss"], rel=1e-5)


def test_resume_with_other_model_config_is_refused(trained):
    cfg = micro_config(trained.run_dir, trained.data_dir, "model.d_model=48")
    before = _tree_digest(trained.run_dir)
    for stage in ("ar", "sft"):
        with pytest.raises(TrainingError, match="different model") as err:
            train_stage(cfg, stage, progress=False)
        assert "d_model" in str(err.value) and str(trained.run_dir / stage) in str(err.value)
    assert _tree_digest(trained.run_dir) == before  # nothing written


def test_sft_without_ar_checkpoint_says_to_train_ar(trained, tmp_path):
    cfg = micro_config(tmp_path / "run", trained.data_dir)
    with pytest.raises(TrainingError) as err:
        train_stage(cfg, "sft", progress=False)
    message = str(err.value)
    assert "AR model" in message and str(tmp_path / "run" / "ar") in message
    assert "train the ar stage first" in message
    assert not (tmp_path / "run" / "sft").exists()

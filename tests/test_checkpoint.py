"""Tests for pipo_jax.io.checkpoint: round trips, pruning, error messages and crash safety
(the signal handling of ``StopSignals`` is tested in test_preemption.py)."""

from __future__ import annotations

from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pipo_jax.config import Config, ConfigError, config_from_json, from_dict, to_dict
from pipo_jax.io import checkpoint as ck

# A restore that fails inside orbax once left tensorstore callbacks firing after orbax had closed
# its event loop, reported as "unraisable" at a later garbage collection; io/orbax_quirks.py
# now lets them finish first, and any that came back would fail these tests.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")

REPO = Path(__file__).resolve().parents[1]
SHARDING = jax.sharding.SingleDeviceSharding(jax.devices()[0])


def make_state(seed: int = 0, d: int = 64) -> dict:
    """A train-state-like pytree: params, Adam state (namedtuples, EmptyState) and a step.

    64x64 float32 arrays (16 KiB) are larger than OCDBT's inline limit, so their bytes live in
    separate data files that the corruption tests can damage.
    """
    key = jax.random.key(seed)
    params = {"dense": {"kernel": jax.random.normal(key, (d, d)),
                        "bias": jnp.full((d,), float(seed), jnp.bfloat16)},
              "embed": jax.random.normal(jax.random.fold_in(key, 1), (16, d))}
    opt_state = optax.adamw(1e-3).init(params)
    return {"params": params, "opt_state": opt_state, "step": jnp.asarray(seed, jnp.int32)}


def abstract_of(state: dict) -> dict:
    return ck.abstract_target(jax.eval_shape(lambda: state), SHARDING)


def small_config(steps: int = 7) -> Config:
    return from_dict({"sft": {"steps": steps}, "run_dir": "runs/test"})


def save_steps(stage_dir: Path, steps: list[int], keep: int = 5) -> dict[int, dict]:
    states = {s: make_state(s) for s in steps}
    with ck.open_manager(stage_dir, keep=keep) as manager:
        for s in steps:
            assert ck.save(manager, s, states[s], small_config(s), "ar")
    return states


# --------------------------------------------------------------------------- round trips


def test_save_restore_roundtrip_and_config_json(tmp_path):
    stage = tmp_path / "run" / "sft"
    states = save_steps(stage, [1, 2])
    restored, cfg = ck.restore(stage, abstract_of(states[2]))
    chex.assert_trees_all_equal(restored, states[2])
    assert int(restored["step"]) == 2
    assert restored["params"]["dense"]["bias"].dtype == jnp.bfloat16
    assert all(leaf.sharding == SHARDING for leaf in jax.tree.leaves(restored))
    assert cfg == small_config(2)
    # config.json beside the checkpoints is the one of the latest save, and no tmp is left.
    assert config_from_json(stage / ck.CONFIG_FILE) == small_config(2)
    assert sorted(p.name for p in stage.iterdir()) == [ck.CHECKPOINT_SUBDIR, ck.CONFIG_FILE]
    assert ck.restore_config(stage, step=1) == small_config(1)


def test_relative_run_directory(tmp_path, monkeypatch):
    """Run directories are usually relative (runs/default); orbax itself needs absolute paths."""
    monkeypatch.chdir(tmp_path)
    states = save_steps(Path("runs/default/ar"), [3])
    assert ck.latest_step("runs/default/ar") == 3
    restored, _ = ck.restore("runs/default/ar", abstract_of(states[3]))
    chex.assert_trees_all_equal(restored, states[3])


def test_keep_n_prunes_oldest(tmp_path):
    save_steps(tmp_path, [10, 20, 30, 40], keep=2)
    assert ck.all_steps(tmp_path) == [30, 40]
    assert ck.latest_step(tmp_path) == 40


def test_keep_every_also_keeps_multiples_forever(tmp_path):
    """keep=2, keep_every=20: the newest two plus every multiple of 20, also after later saves
    and across managers (a resumed run)."""
    state = make_state()
    with ck.open_manager(tmp_path, keep=2, keep_every=20) as manager:
        for step in (10, 20, 30, 40, 50):
            assert ck.save(manager, step, state, small_config(), "ar")
    assert ck.all_steps(tmp_path) == [20, 40, 50]
    with ck.open_manager(tmp_path, keep=2, keep_every=20) as manager:
        for step in (55, 60, 70):  # 55: an odd step, as a preemption save writes
            assert ck.save(manager, step, state, small_config(), "ar")
    assert ck.all_steps(tmp_path) == [20, 40, 60, 70]


def test_keep_every_config_validation():
    base = {"run_dir": "runs/test", "sft": {"ckpt_every": 50}}
    assert from_dict({**base, "sft": {"ckpt_every": 50, "keep_every": 500}}).sft.keep_every == 500
    with pytest.raises(ConfigError, match=r"keep_every must be 0 .*multiple of ckpt_every "
                                          r"\(50\), got 30"):
        from_dict({**base, "sft": {"ckpt_every": 50, "keep_every": 30}})
    with pytest.raises(ConfigError, match=r"sft\.keep_every must be >= 0 \(0 keeps none\), "
                                          r"got -50"):
        from_dict({**base, "sft": {"ckpt_every": 50, "keep_every": -50}})


def test_restore_explicit_step_and_unknown_step(tmp_path):
    states = save_steps(tmp_path, [1, 2, 3])
    restored, cfg = ck.restore(tmp_path, abstract_of(states[1]), step=2)
    chex.assert_trees_all_equal(restored, states[2])
    assert cfg.sft.steps == 2
    with pytest.raises(ck.CheckpointError, match=r"no checkpoint for step=5.*\[1, 2, 3\]"):
        ck.restore(tmp_path, abstract_of(states[1]), step=5)


def test_restore_params_only(tmp_path):
    states = save_steps(tmp_path, [4])
    params, cfg = ck.restore_params(tmp_path, abstract_of(states[4])["params"])
    chex.assert_trees_all_equal(params, states[4]["params"])
    assert cfg == small_config(4)


def test_restore_casts_to_target_dtype(tmp_path):
    states = save_steps(tmp_path, [1])
    target = abstract_of(states[1])
    kernel = target["params"]["dense"]["kernel"]
    target["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct(kernel.shape, jnp.bfloat16,
                                                               sharding=SHARDING)
    restored, _ = ck.restore(tmp_path, target)
    assert restored["params"]["dense"]["kernel"].dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(restored["params"]["dense"]["kernel"], np.float32),
        np.asarray(states[1]["params"]["dense"]["kernel"]), rtol=1e-2)


def test_save_records_the_stage_and_skips_an_existing_step(tmp_path):
    state = make_state()
    with ck.open_manager(tmp_path, keep=3) as manager:
        assert ck.save(manager, 10, state, small_config(), "ar", wait=True)
        assert ck.save(manager, 13, state, small_config(), "sft", wait=True)
        # Re-saving a committed step (a run resumed exactly there) is a no-op, not an error.
        assert not ck.save(manager, 13, state, small_config(), "sft")
        with pytest.raises(ValueError, match="stage must be one of"):
            ck.save(manager, 14, state, small_config(), "student")
    assert ck.all_steps(tmp_path) == [10, 13]
    assert ck.saved_stage(tmp_path, 10) == "ar" and ck.saved_stage(tmp_path) == "sft"


def test_open_manager_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="keep"):
        ck.open_manager(tmp_path, keep=0)
    with pytest.raises(ValueError, match="keep_every"):
        ck.open_manager(tmp_path, keep=1, keep_every=-1)


# --------------------------------------------------------------------------- errors


def test_missing_run_directory(tmp_path):
    missing = tmp_path / "nope" / "sft"
    assert ck.latest_step(missing) is None
    with pytest.raises(ck.CheckpointError, match=r"no such run directory.*python train\.py"):
        ck.restore(missing, abstract_of(make_state()))


@pytest.mark.parametrize("with_subdir", [False, True])
def test_empty_run_directory(tmp_path, with_subdir):
    if with_subdir:
        (tmp_path / ck.CHECKPOINT_SUBDIR).mkdir()
    assert ck.latest_step(tmp_path) is None
    with pytest.raises(ck.CheckpointError, match=r"python train\.py"):
        ck.restore(tmp_path, abstract_of(make_state()))
    with pytest.raises(ck.CheckpointError, match=r"python train\.py"):
        ck.restore_config(tmp_path)


def _data_files(step_dir: Path) -> list[Path]:
    return [p for p in (step_dir / "state").rglob("*")
            if p.is_file() and p.parent.name == "d"]


def _truncate_data(step_dir: Path) -> None:
    for p in _data_files(step_dir):
        p.write_bytes(p.read_bytes()[:64])


def _delete_data(step_dir: Path) -> None:
    for p in _data_files(step_dir):
        p.unlink()


def _garbage_metadata(step_dir: Path) -> None:
    (step_dir / "state" / "_METADATA").write_text("{not json")


def _garbage_config(step_dir: Path) -> None:
    (step_dir / "config" / "metadata").write_text("{not json")


@pytest.mark.parametrize("damage", [_truncate_data, _delete_data, _garbage_metadata,
                                    _garbage_config])
def test_corrupt_checkpoint_names_step_and_fallback(tmp_path, damage):
    states = save_steps(tmp_path, [1, 2])
    step_dir = tmp_path / ck.CHECKPOINT_SUBDIR / "2"
    assert _data_files(step_dir), "expected out-of-line array data files"
    damage(step_dir)
    with pytest.raises(ck.CheckpointError) as info:
        ck.restore(tmp_path, abstract_of(states[2]))
    message = str(info.value)
    assert "\n" not in message
    assert "step 2" in message and "corrupt" in message
    assert str(step_dir) in message and "fall back to step 1" in message and "step=" in message
    # The earlier checkpoint is still usable, as the message promises.
    restored, _ = ck.restore(tmp_path, abstract_of(states[1]), step=1)
    chex.assert_trees_all_equal(restored, states[1])


def test_structure_mismatch_is_reported_as_config_change(tmp_path):
    save_steps(tmp_path, [1])
    with pytest.raises(ck.CheckpointError, match=r"different model.*shape mismatch.*kernel"):
        ck.restore(tmp_path, abstract_of(make_state(d=32)))
    extra = make_state()
    extra["params"]["head"] = jnp.zeros((3,))
    extra["opt_state"] = optax.adamw(1e-3).init(extra["params"])
    with pytest.raises(ck.CheckpointError, match=r"different model.*not in checkpoint.*head"):
        ck.restore(tmp_path, abstract_of(extra))
    with pytest.raises(ck.CheckpointError, match=r"different model.*shape mismatch"):
        ck.restore_params(tmp_path, abstract_of(make_state(d=32))["params"])


def test_saved_config_that_no_longer_validates(tmp_path):
    states = save_steps(tmp_path, [1])
    (tmp_path / ck.CHECKPOINT_SUBDIR / "1" / "config" / "metadata").write_text('{"bogus": 1}')
    with pytest.raises(ck.CheckpointError, match=r"config saved with checkpoint step 1.*bogus"):
        ck.restore(tmp_path, abstract_of(states[1]))
    with pytest.raises(ck.CheckpointError, match=r"does not fit"):
        ck.restore_config(tmp_path)


def test_abstract_target_must_carry_shardings(tmp_path):
    save_steps(tmp_path, [1])
    with pytest.raises(TypeError, match="abstract_target"):
        ck.restore(tmp_path, jax.eval_shape(make_state))


# --------------------------------------------------------------------------- crash safety
# (kill -9 mid-save: tests/test_faults.py)


def test_failed_background_save_surfaces_and_keeps_previous_step(tmp_path, monkeypatch):
    """An asynchronous save that fails (here: its final rename) raises from the wait that ends
    it, not silently; the step is not committed and, although keep=1, the older step survives
    (orbax prunes only after a commit)."""
    from orbax.checkpoint._src.path import atomicity

    async def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError("disk full (simulated)")

    manager = ck.open_manager(tmp_path, keep=1)
    try:
        assert ck.save(manager, 1, make_state(1), small_config(1), "ar", wait=True)
        monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
        assert ck.save(manager, 2, make_state(2), small_config(2), "ar")  # returns at once (async)
        with pytest.raises(OSError, match="disk full"):
            manager.wait_until_finished()
    finally:
        monkeypatch.undo()
        manager.close()
    assert ck.all_steps(tmp_path) == [1]
    restored, _ = ck.restore(tmp_path, abstract_of(make_state(1)))
    chex.assert_trees_all_equal(restored, make_state(1))


def test_a_stage_restores_by_its_recorded_stage_not_its_directory_name(tmp_path):
    """The stage is in the checkpoint's metadata: a teacher saved under any directory name
    restores with ``teacher_model``'s shapes, and a PIPO loader refuses an AR checkpoint.
    A checkpoint saved before the metadata existed falls back to its directory's name."""
    import orbax.checkpoint as ocp
    from flax import linen as nn

    from pipo_jax.config import MeshConfig, load_config
    from pipo_jax.errors import CheckpointError
    from pipo_jax.io import run_dir
    from pipo_jax.model.pipo import init_params
    from pipo_jax.model.sharding import build_mesh

    cfg = load_config(REPO / "configs" / "micro.yaml")
    assert cfg.teacher_model.d_model != cfg.model.d_model
    teacher = nn.unbox(init_params(cfg.teacher_model, False, jax.random.key(0)))
    with ck.open_manager(tmp_path / "big_teacher", keep=1) as manager:
        ck.save(manager, 3, {"step": np.int32(3), "params": teacher}, cfg, "teacher", wait=True)
    mesh = build_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    assert run_dir.stage_of(tmp_path / "big_teacher", pipo=False) == "teacher"
    params, _ = run_dir.restore_stage_params(tmp_path / "big_teacher", False, mesh)
    chex.assert_trees_all_equal(params, teacher)
    with pytest.raises(CheckpointError, match="holds an AR model .stage teacher."):
        run_dir.restore_stage_params(tmp_path / "big_teacher", True, mesh)

    # Legacy: saved without the stage (as before the metadata) → the directory name decides.
    legacy = tmp_path / "old_run" / "teacher"
    with ck.open_manager(legacy, keep=1) as manager:
        manager.save(0, args=ocp.args.Composite(
            state=ocp.args.StandardSave({"step": np.int32(0), "params": teacher}),
            config=ocp.args.JsonSave(to_dict(cfg))), force=True)
        manager.wait_until_finished()
    assert ck.saved_stage(legacy) is None
    assert run_dir.stage_of(legacy, pipo=False) == "teacher"
    params, _ = run_dir.restore_stage_params(legacy, False, mesh)
    chex.assert_trees_all_equal(params, teacher)

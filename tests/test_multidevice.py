"""Sharded training and decode on 8 simulated CPU devices, against one device.

JAX fixes its device count when it starts, so the measurements run once in a subprocess
(``multidevice_worker.py`` with ``--xla_force_host_platform_device_count=8``) and the tests
below check what it wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MESHES = ("8x1x1", "2x2x2", "1x8x1")
# float32 sums in another order (a sharded reduction) differ in the last bits. Gradients are
# compared as their largest difference relative to their largest entry.
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory, compilation_cache_dir: Path) -> dict:
    work = tmp_path_factory.mktemp("multidevice")
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env = dict(os.environ, XLA_FLAGS=flags.strip(),
               JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(compilation_cache_dir))
    out = work / "report.json"
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "multidevice_worker.py"),
                           str(out), str(work)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_sharded_initialisation_draws_the_one_device_parameters(report: dict):
    assert report["sharded_init_diff"] == 0.0


# The OPD update is checked on the mesh that splits all three axes at once; its rollout on every
# mesh (below). One OPD update per mesh cost a minute of CI for no rule the SFT step and the
# 2x2x2 update do not already exercise.
@pytest.mark.parametrize(("mesh", "stage"), [(m, "sft") for m in MESHES] + [("2x2x2", "opd")])
def test_step_equals_one_device(report: dict, mesh: str, stage: str):
    got, one = report["meshes"][mesh], report["meshes"]["1x1x1"]
    assert got[stage]["loss"] == pytest.approx(one[stage]["loss"], rel=LOSS_RTOL)
    assert got[stage]["grad_norm"] == pytest.approx(one[stage]["grad_norm"], rel=GRAD_RTOL)
    assert got[f"{stage}_grads_rel_diff"] < GRAD_RTOL


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_rollout_samples_the_one_device_tokens(report: dict, mesh: str):
    got = report["meshes"][mesh]
    assert got["rollout_equal"]
    assert got["rollout_sharding"] == "P(('data', 'fsdp'),)"  # rows stay split over the batch


@pytest.mark.parametrize("mesh", MESHES)
def test_parameters_are_sharded_as_the_rules_say(report: dict, mesh: str):
    specs = report["meshes"][mesh]["specs"]
    # (vocab, embed) → (tensor, fsdp); scanned layers keep their stacking axis whole.
    assert specs["embedding"] == "P('tensor', 'fsdp')"
    assert specs["mlp_gate"] == "P(None, 'fsdp', 'tensor')"
    assert specs["attn_q"] == "P(None, 'fsdp', 'tensor', None)"
    assert specs["compressor_fc1"] == "P('fsdp', 'tensor')"


def test_per_device_bytes_fall_with_the_sharding_degree(report: dict):
    meshes = report["meshes"]
    whole = meshes["1x1x1"]["param_bytes_device0"]
    assert meshes["8x1x1"]["param_bytes_device0"] == whole  # data parallel: replicated
    for key in ("param_bytes_device0", "opt_bytes_device0"):
        # Split 1, 4 (fsdp 2 × tensor 2) and 8 ways.
        by_split = [meshes[m][key] for m in ("8x1x1", "2x2x2", "1x8x1")]
        assert by_split[0] > by_split[1] > by_split[2], key
    # Vectors (norm scales, biases) stay whole, so fsdp=8 holds a little over an eighth.
    assert meshes["1x8x1"]["param_bytes_device0"] < whole / 6


@pytest.mark.parametrize("mesh", ["1x1x1", "2x2x2"])
def test_state_saved_on_8_devices_restores_on_another_mesh(report: dict, mesh: str):
    got = report["restore"][mesh]
    assert got["params_diff"] == 0.0 and got["opt_state_diff"] == 0.0
    assert got["devices"] == (1 if mesh == "1x1x1" else 8)
    if mesh == "2x2x2":
        assert got["embedding_spec"] == "P('tensor', 'fsdp')"
    # Greedy decode of the restored model is the same on one device and on the mesh (three
    # requests on a batch split 4 ways: the runner pads the batch and drops the copies).
    assert got["decode"] == report["restore"]["1x1x1"]["decode"]
    assert all(len(tokens) > 0 for tokens in got["decode"])


def test_a_mesh_that_cannot_split_a_parameter_is_a_clear_error():
    # An abstract mesh: the check needs only axis sizes, so it runs without 8 devices.
    from jax.sharding import AbstractMesh

    from pipo_jax.config import ConfigError, load_config
    from pipo_jax.train.state import make_optimizer, state_shardings

    cfg = load_config(REPO / "configs" / "micro.yaml")  # 2 query heads, MLP 64, d_model 32
    tx = make_optimizer(cfg.sft)
    state_shardings(cfg.model, True, tx, AbstractMesh((1, 2, 2), ("data", "fsdp", "tensor")))
    with pytest.raises(ConfigError, match=r"cannot be split 4 ways over mesh axes \('tensor',\)"):
        state_shardings(cfg.model, True, tx, AbstractMesh((1, 1, 4), ("data", "fsdp", "tensor")))

"""LoRA (SPEC §4): where the adapters sit, merged = unmerged, what a LoRA step may change,
resume, and ``python -m pipo_jax.io.hf.convert merge-lora``."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import traverse_util
from helpers import random_params

from pipo_jax.config import Config, LoraConfig, load_config, save_config
from pipo_jax.decode.runner import load_params
from pipo_jax.errors import TrainingError
from pipo_jax.io import checkpoint as ckpt
from pipo_jax.io.hf import convert
from pipo_jax.io.hf.convert import ConvertError
from pipo_jax.io.run_dir import abstract_params
from pipo_jax.model import lora, sharding
from pipo_jax.model.pipo import PipoLM, init_params, lm_head
from pipo_jax.train import supervised
from pipo_jax.train.losses import ar_loss
from pipo_jax.train.pipeline import train_stage
from pipo_jax.train.state import make_optimizer, state_shardings

pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.usefixtures("compilation_cache_dir")]

REPO = Path(__file__).resolve().parents[1]
MICRO = REPO / "configs" / "micro.yaml"
CFG = load_config(MICRO).model
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.1)


def _paths(tree: Any) -> dict[str, Any]:
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def _tokens(b: int = 2, t: int = 24, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(16, CFG.vocab_size, (b, t)),
                       jnp.int32)


# --------------------------------------------------------------------------- placement


def test_adapters_sit_on_attention_mlp_and_mtp_projections_only():
    shapes = _paths(jax.eval_shape(lambda k: nn.unbox(init_params(CFG, True, k, LORA)),
                                   jax.random.key(0)))
    adapted = {p.rsplit("/", 1)[0] for p in shapes if p.endswith("lora_a")}
    mlp = ("gate_proj", "up_proj", "down_proj")
    attn = ("q_proj", "k_proj", "v_proj", "o_proj")
    # micro: layer_0 is Gated DeltaNet (only its MLP is adapted), layer_1 full attention.
    expected = ({f"backbone/layers/layer_0/mlp/{m}" for m in mlp}
                | {f"backbone/layers/layer_1/mlp/{m}" for m in mlp}
                | {f"backbone/layers/layer_1/attn/{a}" for a in attn}
                | {f"mtp_head/layer/mlp/{m}" for m in mlp}
                | {f"mtp_head/layer/attn/{a}" for a in attn})
    assert adapted == expected
    assert not any("linear_attn" in p and "lora" in p for p in shapes)
    # Stacked over the scanned blocks; A is in… × r, B is r × out….
    n = CFG.n_blocks
    q = "backbone/layers/layer_1/attn/q_proj"
    q_width = 2 * CFG.head_dim  # the gated q_proj of qwen3_5
    assert shapes[f"{q}/lora_a"].shape == (n, CFG.d_model, 4)
    assert shapes[f"{q}/lora_b"].shape == (n, 4, CFG.n_heads, q_width)
    o = "mtp_head/layer/attn/o_proj"
    assert shapes[f"{o}/lora_a"].shape == (CFG.n_heads, CFG.head_dim, 4)
    assert shapes[f"{o}/lora_b"].shape == (4, CFG.d_model)


def test_targets_select_projections():
    only_qv = dataclasses.replace(LORA, targets=("q_proj", "v_proj"))
    shapes = _paths(jax.eval_shape(lambda k: nn.unbox(init_params(CFG, True, k, only_qv)),
                                   jax.random.key(0)))
    adapted = {p.rsplit("/", 2)[-2] for p in shapes if p.endswith("lora_b")}
    assert adapted == {"q_proj", "v_proj"}


def test_trainable_set_is_the_recipes():
    params = jax.eval_shape(lambda k: nn.unbox(init_params(CFG, True, k, LORA)),
                            jax.random.key(0))
    train, frozen = lora.partition(params, "lora")
    train_paths = set(_paths(train))
    fully = {p for p in train_paths if "lora_" not in p}
    assert fully == {p for p in _paths(params) if p.startswith(
        ("compressor/", "confidence_head/", "mtp_head/fc/", "mtp_head/norm_emb/",
         "mtp_head/norm_hidden/", "mtp_head/final_norm/"))}
    frozen_paths = set(_paths(frozen))
    assert "embedder/embedding" in frozen_paths
    assert any(p.startswith("backbone/layers/layer_0/linear_attn/") for p in frozen_paths)
    assert "mtp_head/layer/input_norm/scale" in frozen_paths  # the MTP layer's own norms
    chex.assert_trees_all_equal(lora.combine(train, frozen), params)
    full_train, full_frozen = lora.partition(params, "full")
    assert full_frozen == {} and set(_paths(full_train)) == set(_paths(params))


# --------------------------------------------------------------------------- numerics


@pytest.mark.parametrize("pipo", [True, False], ids=["pipo", "ar"])
def test_merged_and_unmerged_models_give_the_same_outputs(pipo):
    params = random_params(CFG, pipo, seed=3, lora=LORA)
    tokens = _tokens()
    with_adapters = jax.jit(lambda p, t: PipoLM(CFG, pipo, LORA).apply({"params": p}, t))
    plain = jax.jit(lambda p, t: PipoLM(CFG, pipo).apply({"params": p}, t))
    merged = lora.merge(params, LORA)
    assert not lora.has_adapters(merged)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        merged, nn.unbox(init_params(CFG, pipo, jax.random.key(0))))
    out_a, out_m = with_adapters(params, tokens), plain(merged, tokens)
    # The adapters really change the model (B is random), so agreement is not vacuous.
    stripped = {k: v for k, v in _paths(params).items() if "lora_" not in k}
    out_base = plain(traverse_util.unflatten_dict(
        {tuple(k.split("/")): v for k, v in stripped.items()}), tokens)
    assert float(jnp.max(jnp.abs(out_base["h"] - out_a["h"]))) > 1e-2
    for key in out_a:
        np.testing.assert_allclose(out_m[key], out_a[key], atol=2e-5, rtol=2e-5)
    # The numpy merge (used on host trees) agrees with the jax one.
    merged_np = lora.merge(jax.tree.map(np.asarray, params), LORA)
    chex.assert_trees_all_close(merged_np, jax.tree.map(np.asarray, merged), atol=1e-6)


def test_fresh_adapters_leave_the_model_unchanged():
    base = random_params(CFG, True, seed=4)
    fresh = jax.jit(lambda k: nn.unbox(init_params(CFG, True, k, LORA)))(jax.random.key(1))
    params = lora.with_adapters(base, fresh)
    tokens = _tokens()
    a = jax.jit(lambda p, t: PipoLM(CFG, True, LORA).apply({"params": p}, t))(params, tokens)
    b = jax.jit(lambda p, t: PipoLM(CFG, True).apply({"params": p}, t))(base, tokens)
    chex.assert_trees_all_close(a, b, atol=0, rtol=0)


def test_dropout_only_when_a_dropout_rng_is_given():
    params = random_params(CFG, False, seed=5, lora=LORA)
    tokens = _tokens()
    model = PipoLM(CFG, False, LORA)
    apply = jax.jit(lambda p, t, k: model.apply({"params": p}, t, rngs={"dropout": k}))
    clean = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, tokens)["h"]
    d1 = apply(params, tokens, jax.random.key(1))["h"]
    d1_again = apply(params, tokens, jax.random.key(1))["h"]
    d2 = apply(params, tokens, jax.random.key(2))["h"]
    np.testing.assert_array_equal(d1, d1_again)
    assert float(jnp.max(jnp.abs(d1 - clean))) > 1e-4
    assert float(jnp.max(jnp.abs(d1 - d2))) > 1e-4


def test_untied_lm_head_is_what_the_loss_uses():
    cfg = dataclasses.replace(CFG, tie_embeddings=False)
    params = random_params(cfg, False, seed=6)
    tokens = _tokens(t=16)
    mask = jnp.ones_like(tokens, dtype=bool)
    out = PipoLM(cfg, False).apply({"params": params}, tokens)
    loss, _ = ar_loss(out, lm_head(params), tokens, mask, Config().ar)
    logits = PipoLM(cfg, False).apply({"params": params}, out["h"], method=PipoLM.logits)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


# --------------------------------------------------------------------------- training


STEPS = 4


def _config(run_dir: Path, data_dir: Path, *overrides: str) -> Config:
    return load_config(MICRO, [
        f"run_dir={run_dir}", f"data.data_dir={data_dir}", "data.num_train=8",
        "data.max_len=128", "stages=[sft]", f"sft.steps={STEPS}", "sft.batch_size=4",
        "sft.ckpt_every=2", "sft.log_every=1", "sft.tuner=lora", "sft.lora.rank=4",
        "sft.lora.alpha=8", "sft.lora.dropout=0.1", "sft.learning_rate=1e-2", *overrides])


def _imported_run(run_dir: Path, cfg: Config, params: Any) -> None:
    """A run directory holding only a params-only step-0 PIPO checkpoint (as hf-to-pipo writes)."""
    run_dir.mkdir(parents=True)
    base = dataclasses.replace(cfg, sft=dataclasses.replace(cfg.sft, tuner="full"))
    save_config(base, run_dir / "config.json")
    with ckpt.open_manager(run_dir / "sft", 2) as m:
        ckpt.save(m, 0, {"step": np.int32(0), "params": params}, base, "sft", wait=True)


def _raw_params(stage_dir: Path, cfg: Config, step: int | None = None) -> Any:
    """The stage's parameters as saved (adapters not merged)."""
    mesh = sharding.build_mesh(cfg.mesh)
    abstract = abstract_params(cfg.model, True, mesh, cfg.sft.lora)
    return jax.tree.map(np.asarray, ckpt.restore_params(stage_dir, abstract, step)[0])


class SimulatedCrash(Exception):
    pass


@dataclasses.dataclass
class LoraRun:
    cfg: Config
    root: Path
    run_dir: Path
    start: Any


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> LoraRun:
    """A random "imported" PIPO model fine-tuned with LoRA for a few steps."""
    root = tmp_path_factory.mktemp("lora")
    cfg = _config(root / "run", root / "tfds")
    start = jax.tree.map(np.asarray, random_params(cfg.model, True, seed=7, std=0.05))
    _imported_run(root / "fresh", cfg, start)
    shutil.copytree(root / "fresh", root / "run")
    train_stage(cfg, "sft", progress=False)
    return LoraRun(cfg, root, root / "run", start)


def test_a_lora_step_changes_only_the_trainable_parameters(lora_run):
    final = _paths(_raw_params(lora_run.run_dir / "sft", lora_run.cfg))
    start = _paths(lora_run.start)
    changed = {p for p in start if not np.array_equal(start[p], final[p])}
    expected = {p for p in start if lora.trainable(tuple(p.split("/")), "lora")}
    assert changed == expected
    adapters = [p for p in final if p.endswith("lora_b")]
    assert adapters and all(np.abs(final[p]).max() > 0 for p in adapters)


def test_optimizer_state_covers_only_the_trainable_parameters(lora_run):
    cfg = lora_run.cfg
    tx = make_optimizer(cfg.sft)
    abstract, _ = state_shardings(cfg.model, True, tx, sharding.build_mesh(cfg.mesh),
                                          "lora", cfg.sft.lora)
    train, _ = lora.partition(abstract.params, "lora")
    n_train = sum(x.size for x in jax.tree.leaves(train))
    n_all = sum(x.size for x in jax.tree.leaves(abstract.params))
    n_opt = sum(x.size for x in jax.tree.leaves(abstract.opt_state))
    # Adam's mu and nu of the trainable parameters, plus a few scalar step counts.
    assert 2 * n_train <= n_opt <= 2 * n_train + 4
    assert n_train < n_all / 2
    assert ckpt.saved_keys(lora_run.run_dir / "sft", STEPS) >= {"params", "opt_state"}


def test_resume_after_a_crash_equals_the_uninterrupted_run(lora_run, monkeypatch):
    run_dir = lora_run.root / "crashed"
    shutil.copytree(lora_run.root / "fresh", run_dir)
    cfg = dataclasses.replace(lora_run.cfg, run_dir=str(run_dir))
    real = supervised.make_train_dataset

    class Crashing:
        def __init__(self, data: Any) -> None:
            self.data = data

        def __getitem__(self, step: int) -> Any:
            if step == 3:
                raise SimulatedCrash
            return self.data[step]

    with monkeypatch.context() as mp:
        mp.setattr(supervised, "make_train_dataset", lambda *a, **k: Crashing(real(*a, **k)))
        with pytest.raises(SimulatedCrash):
            train_stage(cfg, "sft", progress=False)
    assert ckpt.latest_step(run_dir / "sft") == 2
    train_stage(cfg, "sft", progress=False)
    chex.assert_trees_all_equal(_raw_params(run_dir / "sft", cfg),
                                _raw_params(lora_run.run_dir / "sft", lora_run.cfg))


def test_changing_the_tuner_of_a_run_is_refused(lora_run):
    cfg = dataclasses.replace(lora_run.cfg, sft=dataclasses.replace(
        lora_run.cfg.sft, tuner="full", steps=STEPS + 2))
    with pytest.raises(TrainingError, match="tuner"):
        train_stage(cfg, "sft", progress=False)


def test_merge_lora_writes_a_plain_run_with_the_same_model(lora_run, tmp_path):
    out = tmp_path / "merged"
    convert.main(["merge-lora", "--run", str(lora_run.run_dir), "--out", str(out)])
    merged, merged_cfg = load_params(out / "sft", True)
    loaded, _ = load_params(lora_run.run_dir / "sft", True)  # merges on load
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, merged),
                                jax.tree.map(np.asarray, loaded))
    assert not lora.has_adapters(merged) and merged_cfg.sft.tuner == "full"
    assert ckpt.latest_step(out / "sft") == STEPS
    assert "opt_state" not in ckpt.saved_keys(out / "sft", STEPS)
    # By hand: kernel + (alpha / rank) · A·B of one adapted projection.
    raw = _paths(_raw_params(lora_run.run_dir / "sft", lora_run.cfg))
    q = "mtp_head/layer/attn/q_proj"
    expected = raw[f"{q}/kernel"] + 2.0 * np.einsum("dr,rnh->dnh", raw[f"{q}/lora_a"],
                                                    raw[f"{q}/lora_b"])
    np.testing.assert_allclose(_paths(merged)[f"{q}/kernel"], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConvertError, match="no LoRA adapters"):
        convert.main(["merge-lora", "--run", str(out), "--out", str(tmp_path / "again")])
    with pytest.raises(ConvertError, match="not empty"):
        convert.main(["merge-lora", "--run", str(lora_run.run_dir), "--out", str(out)])
    # Into the run itself (or a folder inside it): refused before anything is written.
    for into, relation in ((lora_run.run_dir, "is"), (lora_run.run_dir / "merged", "is inside")):
        with pytest.raises(ConvertError, match=f"--out .* {relation} the input --run"):
            convert.main(["merge-lora", "--run", str(lora_run.run_dir), "--out", str(into),
                          "--force"])
    assert not (lora_run.run_dir / "merged").exists()
    with pytest.raises(ConvertError, match="not a run directory"):
        convert.main(["merge-lora", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])

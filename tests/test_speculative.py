"""MTP-speculative decoding (issue #16) against the plain AR decoder it accelerates: greedy
output token for token, the sampled distribution, and the caches after rollback."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from pipo_jax.config import ModelConfig
from pipo_jax.decode import engine, speculative
from pipo_jax.decode.sampling import SamplingParams, request_keys
from pipo_jax.model.attention import CacheAttention
from pipo_jax.model.cache import AttentionCache
from pipo_jax.model.pipo import PipoLM

PAD = 0
NO_EOS = -1  # no id: rows run to the budget (the EOS test picks its own)
BUDGET = 16
ATTN, HYBRID = helpers.DECODE_ATTN, helpers.DECODE_HYBRID
CONFIGS = {"attention": ATTN, "hybrid": HYBRID}


def drafting_params(cfg: ModelConfig, seed: int, mixer_scale: float) -> dict:
    """Random AR parameters whose MTP drafter is often, not always, right.

    The backbone's mixers and MLPs are scaled down, so the next token is mostly a function of
    the current one (a bigram model) with the context still moving it; the drafter reads only
    the embedding of token t+1 through the same final norm, so it predicts that bigram. The
    verify pass then accepts some drafts and rejects others, and every cache still matters."""
    p = helpers.random_params(cfg, False, seed=seed, drafter=True)

    def scale(path: tuple, x: jax.Array) -> jax.Array:
        names = [getattr(k, "key", "") for k in path]
        if names[0] == "backbone" and names[-2] in ("o_proj", "out_proj", "down_proj"):
            return x * mixer_scale
        return x

    p = jax.tree_util.tree_map_with_path(scale, p)
    mtp = dict(p["mtp_head"])
    d = cfg.d_model
    mtp["fc"] = {"kernel": jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))], axis=0)}
    layer = jax.tree.map(lambda x: x, mtp["layer"])
    layer["attn"] = dict(layer["attn"], o_proj=jax.tree.map(jnp.zeros_like,
                                                            layer["attn"]["o_proj"]))
    layer["mlp"] = dict(layer["mlp"], down_proj=jax.tree.map(jnp.zeros_like,
                                                             layer["mlp"]["down_proj"]))
    mtp["layer"] = layer
    mtp["final_norm"] = p["backbone"]["final_norm"]
    p["mtp_head"] = mtp
    return p


@pytest.fixture(scope="module")
def params():
    # Qwen3.5's (1 + w) norms double the mixers' inputs: a smaller scale keeps them a nudge.
    scales = {"attention": 0.3, "hybrid": 0.05}
    return {name: drafting_params(cfg, 5, scales[name]) for name, cfg in CONFIGS.items()}


def _specs(cfg: ModelConfig, k: int, eos: int, sampling: SamplingParams | None = None,
           budget: int = BUDGET) -> tuple[engine.DecodeSpec, engine.DecodeSpec]:
    sp = sampling or SamplingParams()
    common = dict(attention=CacheAttention("blocked", 8), prefill_chunk=6)
    ar = engine.DecodeSpec(cfg, False, sp, budget, PAD, eos, **common)
    spec = engine.DecodeSpec(cfg, False, sp, budget, PAD, eos, draft=True, speculative=k,
                             **common)
    return ar, spec


def _prompts(lengths: tuple[int, ...], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(2, 38, size=n)) for n in lengths]
    return engine.prepare_prompts(prompts, False, PAD, 2, BUDGET, 96)


@functools.cache
def _ar_program(spec: engine.DecodeSpec):
    return jax.jit(lambda p, *a: engine.generate(p, *a, spec=spec))


@functools.cache
def _spec_program(spec: engine.DecodeSpec):
    return jax.jit(lambda p, *a: speculative.generate(p, *a, spec=spec))


def _ar_tokens(params, spec, tokens, valid, keys) -> list[list[int]]:
    st = jax.device_get(_ar_program(spec)(params, tokens, valid, keys, jnp.float32(1.0)))
    return [list(st.out[i, :st.n_tokens[i]]) for i in range(len(tokens))]


@pytest.mark.parametrize("name,k", [("attention", 1), ("hybrid", 3)])
def test_greedy_speculative_equals_ar_greedy(params, name, k):
    """Left-padded rows of different lengths, an EOS that ends a row inside a round: greedy
    MTP-speculative decoding emits exactly AR greedy's tokens, having accepted some drafts and
    rejected others."""
    cfg, p = CONFIGS[name], params[name]
    tokens, valid = _prompts((11, 4, 7))
    keys = request_keys([0, 1, 2])
    ar, spec = _specs(cfg, k, NO_EOS)
    plain = _ar_tokens(p, ar, tokens, valid, keys)
    # An EOS the AR model emits mid-answer in row 0: rows end at different rounds.
    eos = int(plain[0][6])
    ar, spec = _specs(cfg, k, eos)
    want = _ar_tokens(p, ar, tokens, valid, keys)
    st = jax.device_get(_spec_program(spec)(p, tokens, valid, keys))
    got = [list(st.out[i, :st.n_tokens[i]]) for i in range(len(tokens))]
    assert got == want
    assert want[0][-1] == eos and len(want[0]) <= 7
    assert np.all(st.out[np.arange(spec.out_width)[None] >= st.n_tokens[:, None]] == PAD)
    drafted, accepted = int(st.n_drafts.sum()), int(st.n_commits.sum())
    assert 0 < accepted < drafted, (accepted, drafted)
    # Fewer backbone passes than tokens: the point of drafting.
    assert int(st.n_passes.sum()) < int(st.n_tokens.sum())


def test_rollback_leaves_the_caches_of_an_ar_decode(params):
    """After speculative rounds (rejections included), every filled key/value row and every
    Gated DeltaNet conv/recurrent state equals what plain AR decoding of the same tokens
    leaves, row by row: the rejected positions are gone from the caches. (The hybrid config
    has both layer types.)"""
    cfg, p = HYBRID, params["hybrid"]
    tokens, valid = _prompts((9, 5), seed=3)
    keys = request_keys([0, 1])
    ar, spec = _specs(cfg, 3, NO_EOS, budget=12)
    st = jax.device_get(_spec_program(spec)(p, tokens, valid, keys))
    assert 0 < int(st.n_commits.sum()) < int(st.n_drafts.sum())
    step = jax.jit(functools.partial(engine.step, threshold=jnp.float32(1.0), spec=ar))
    for row in range(2):
        t, v = tokens[row:row + 1], valid[row:row + 1]
        ar_state = jax.jit(functools.partial(engine.prefill, spec=ar))(
            p, t, v, keys[row:row + 1], jnp.float32(1.0))
        for _ in range(int(st.n_tokens[row]) - 1):
            ar_state = step(p, ar_state)
        a = jax.device_get(ar_state)
        np.testing.assert_array_equal(a.out[0, :a.n_tokens[0]], st.out[row, :st.n_tokens[row]])
        assert int(a.cache.length[0]) == int(st.cache.length[row])
        lo, hi = int(a.cache.start[0]), int(a.cache.length[0])
        for mine, ref in zip(st.cache.layers, a.cache.layers, strict=True):
            if isinstance(ref, AttentionCache):
                for x, y in ((mine.k, ref.k), (mine.v, ref.v)):
                    np.testing.assert_allclose(x[:, row, lo:hi], y[:, 0, lo:hi], rtol=1e-5,
                                               atol=1e-5)
            else:
                np.testing.assert_allclose(mine.conv[:, row], ref.conv[:, 0], rtol=1e-5,
                                           atol=1e-5)
                np.testing.assert_allclose(mine.state[:, row], ref.state[:, 0], rtol=1e-4,
                                           atol=1e-5)


# ------------------------------------------------------------------------------- sampling

SMALL = ModelConfig(vocab_size=6, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                    mlp_dim=32, max_context=32, compressor_init="random", init_std=0.5)


def _joint_ar(params: dict, prompt: list[int], sp: SamplingParams) -> np.ndarray:
    """The AR model's exact joint of its first three sampled tokens (V × V × V), by teacher
    forcing every two-token continuation."""
    v = SMALL.vocab_size
    model = PipoLM(SMALL, False, drafter=True)
    x1, x2 = np.meshgrid(np.arange(v), np.arange(v), indexing="ij")
    seqs = np.concatenate([np.tile(prompt, (v * v, 1)), x1.reshape(-1, 1), x2.reshape(-1, 1),
                           np.zeros((v * v, 1), int)], axis=1)
    h = model.apply({"params": params}, jnp.asarray(seqs))["h"]
    logits = model.apply({"params": params}, h, method=PipoLM.logits)
    n = len(prompt)

    def dist(lg: jax.Array) -> np.ndarray:
        lg = lg.at[:, PAD].set(-jnp.inf) / sp.temperature
        return np.asarray(jax.nn.softmax(lg, axis=-1), np.float64)

    p1 = dist(logits[:1, n - 1])[0]  # V
    p2 = dist(logits[:, n]).reshape(v, v, v)[:, 0]  # x1 → x2
    p3 = dist(logits[:, n + 1]).reshape(v, v, v)  # (x1, x2) → x3
    return p1[:, None, None] * p2[:, :, None] * p3


def test_speculative_sampling_reproduces_the_ar_distribution():
    """The first three sampled tokens (the first from the prompt, two from a k=2 round, with
    rejections resampled from the residual) over 6,000 seeds: a chi-square test against the
    AR model's exact joint over 6³ outcomes (cells with expected count < 5 pooled). The seeds
    are fixed, so the p-value is a number, not a coin: it must exceed 1e-3, and the same
    test must reject the drafter's own distribution (the test has power)."""
    sp = SamplingParams(temperature=1.0)
    p = helpers.random_params(SMALL, False, seed=11, drafter=True)
    prompt = [3, 1, 4, 1, 5]
    n = 6000
    tokens = np.tile(np.asarray(prompt, np.int32), (n, 1))
    valid = np.ones_like(tokens, bool)
    spec = engine.DecodeSpec(SMALL, False, sp, 3, PAD, -1, draft=True, speculative=2,
                             attention=CacheAttention("blocked", 8))
    st = jax.device_get(jax.jit(functools.partial(speculative.generate, spec=spec))(
        p, tokens, valid, request_keys(list(range(n)))))
    assert np.all(st.n_tokens == 3)
    rate = st.n_commits.sum() / st.n_drafts.sum()
    assert 0.1 < rate < 0.95, rate  # both the accept and the resample branch ran
    v = SMALL.vocab_size
    counts = np.zeros((v, v, v))
    np.add.at(counts, tuple(st.out[:, :3].T), 1)
    joint = _joint_ar(p, prompt, sp)

    def pvalue(expected_probs: np.ndarray) -> float:
        exp = expected_probs.ravel() * n
        obs = counts.ravel()
        big = exp >= 5
        f_obs = np.append(obs[big], obs[~big].sum())
        f_exp = np.append(exp[big], exp[~big].sum())
        return float(stats.chisquare(f_obs, f_exp * f_obs.sum() / f_exp.sum()).pvalue)

    assert pvalue(joint) > 1e-3
    # Power: the same counts against a wrong joint (x1 right, x2 and x3 uniform).
    wrong = joint.sum(axis=(1, 2))[:, None, None] * np.full((v, v, v), 1.0 / (v * v))
    assert pvalue(wrong) < 1e-6


# ------------------------------------------------------------------------------ mtp stage


def test_mtp_stage_trains_only_the_drafter_and_decodes_like_ar(tmp_path):
    """The ``mtp`` stage starts from the run's AR model (a params-only checkpoint here), trains
    the MTP drafter alone (every backbone and embedding leaf bit-identical, every drafter
    kernel moved, its loss falling), checkpoints the whole drafter model; decoding that
    checkpoint speculatively gives AR greedy's tokens."""
    from pipo_jax.config import load_config, save_config
    from pipo_jax.io import checkpoint as ckpt
    from pipo_jax.io.run_dir import load_params
    from pipo_jax.train.supervised import train_stage

    micro = Path(__file__).parents[1] / "configs" / "micro.yaml"
    cfg = load_config(micro, [
        f"run_dir={tmp_path / 'run'}", f"data.data_dir={tmp_path / 'tfds'}",
        "data.num_train=16", "data.max_len=128", "stages=[ar,mtp]", "mtp.steps=6",
        "mtp.batch_size=4", "mtp.log_every=1", "mtp.ckpt_every=3", "mtp.learning_rate=1e-2"])
    ar_params = jax.tree.map(np.asarray, helpers.random_params(cfg.model, False, seed=2))
    run = tmp_path / "run"
    run.mkdir()
    save_config(cfg, run / "config.json")
    with ckpt.open_manager(run / "ar", 2) as m:
        ckpt.save(m, 0, {"step": np.int32(0), "params": ar_params}, cfg, "ar", wait=True)
    result = train_stage(cfg, "mtp", progress=False)
    assert result.steps == 6
    drafter, _ = load_params(run / "mtp", False)
    flat_ar = dict(jax.tree_util.tree_flatten_with_path(ar_params)[0])
    flat = dict(jax.tree_util.tree_flatten_with_path(jax.device_get(drafter))[0])
    for path, x in flat.items():
        if path[0].key == "mtp_head":
            if path[-1].key == "kernel":
                assert not np.allclose(x, 0) and path not in flat_ar
        else:
            np.testing.assert_array_equal(x, flat_ar[path])
    lines = [json.loads(x) for x in (run / "mtp" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert losses[-1] < losses[0]
    ar, spec = _specs(cfg.model, 2, NO_EOS, budget=10)
    tokens, valid = _prompts((7, 3))
    keys = request_keys([0, 1])
    want = _ar_tokens(drafter, ar, tokens, valid, keys)
    st = jax.device_get(_spec_program(spec)(drafter, tokens, valid, keys))
    assert [list(st.out[i, :st.n_tokens[i]]) for i in range(2)] == want


# ------------------------------------------------------------------------- runner and table


def test_runner_spec_model_answers_as_ar_and_refuses_what_it_cannot_do():
    """``PipoRunner.generate(model="spec")`` (what ``decode.py`` and ``--bench`` call) gives AR
    greedy's text in fewer backbone passes, reports drafted/accepted counts, refuses a
    presence penalty and a run without a drafter with one-line errors, and refuses an
    over-long prompt alone."""
    from pipo_jax.config import Config, DataConfig, DecodeConfig, ModelConfig
    from pipo_jax.decode.runner import PipoRunner
    from pipo_jax.errors import ConfigError
    from pipo_jax.io.tokenizer import ByteTokenizer

    cfg = ModelConfig(vocab_size=272, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      head_dim=8, mlp_dim=64, max_context=128, compressor_init="random")
    drafter = drafting_params(cfg, 4, 0.3)
    ar = {k: v for k, v in drafter.items() if k != "mtp_head"}
    pipo = helpers.random_params(cfg, True, seed=1)
    config = Config(model=cfg, data=DataConfig(max_len=128),
                    decode=DecodeConfig(max_new_tokens=12, batch_size=2, speculative_k=3))
    runner = PipoRunner(config, pipo, ar, ByteTokenizer(), system_prompt="",
                        drafter_params=drafter)
    prompts = ["12+34=", "hello", "x" * 200]
    want = runner.generate(prompts, model="ar")
    got = runner.generate(prompts, model="spec")
    assert [g.text for g in got[:2]] == [w.text for w in want[:2]]
    assert got[2].error is not None and "context" in got[2].error
    assert sum(g.stats["backbone_passes"] for g in got[:2]) < \
        sum(g.stats["tokens"] for g in got[:2])
    assert all(g.stats["drafts"] > 0 for g in got[:2])
    with pytest.raises(ConfigError, match="presence"):
        runner.generate(prompts[:1], model="spec", presence_penalty=0.5)
    bare = PipoRunner(config, pipo, ar, ByteTokenizer(), system_prompt="")
    with pytest.raises(ValueError, match="no MTP drafter"):
        bare.generate(prompts[:1], model="spec")


def test_load_takes_the_baselines_from_another_run(tmp_path):
    """``load(run, ar_run=other)`` (``decode.py --ar-run``): PIPO from ``run``, the AR model and
    its MTP drafter from ``other`` (e.g. an AR base trained long enough to be competent); an
    ``other`` without the AR stage or with another backbone is a one-line error."""
    import dataclasses

    from pipo_jax.config import Config, DataConfig
    from pipo_jax.decode.runner import load
    from pipo_jax.errors import CheckpointError
    from pipo_jax.io import checkpoint as ckpt

    cfg = dataclasses.replace(helpers.DECODE_ATTN, vocab_size=272)
    config = Config(model=cfg, data=DataConfig(max_len=96))

    def save(run: Path, stage: str, params: dict, model: ModelConfig = cfg) -> dict:
        params = jax.tree.map(np.asarray, params)
        ckpt.save_params(run / stage, 0, params, dataclasses.replace(config, model=model), stage)
        return params

    run, other, wider, empty = (tmp_path / n for n in ("run", "other", "wider", "empty"))
    save(run, "sft", helpers.random_params(cfg, True, seed=0))
    own_ar = save(run, "ar", helpers.random_params(cfg, False, seed=1))
    drafter = save(other, "mtp", helpers.random_params(cfg, False, seed=2, drafter=True))
    other_ar = save(other, "ar", {k: v for k, v in drafter.items() if k != "mtp_head"})
    runner = load(run)
    assert runner.drafter_params is None
    chex.assert_trees_all_equal(jax.device_get(runner.ar_params), own_ar)
    runner = load(run, ar_run=other)
    chex.assert_trees_all_equal(jax.device_get(runner.ar_params), other_ar)
    chex.assert_trees_all_equal(jax.device_get(runner.drafter_params), drafter)
    big = dataclasses.replace(cfg, d_model=2 * cfg.d_model)
    save(wider, "ar", helpers.random_params(big, False, seed=3), big)
    with pytest.raises(CheckpointError, match="another model.*d_model"):
        load(run, ar_run=wider)
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no ar checkpoint"):
        load(run, ar_run=empty)


def test_table_has_a_column_and_a_speedup_per_model():
    from pipo_jax.eval.heldout import format_table

    row = {"pass@1": 0.5, "tokens_per_pass": 1.0, "ttft_ms": 10.0, "tpot_ms": 4.0}
    result = {"samples": 1, "ar": row, "pipo": dict(row, tokens_per_pass=2.0, tpot_ms=2.0),
              "spec": dict(row, tokens_per_pass=1.5, tpot_ms=3.2)}
    lines = format_table(result).splitlines()
    assert lines[0].split() == ["metric", "PIPO", "AR", "SPEC", "PIPO/AR", "SPEC/AR"]
    cells = {ln.split()[0]: ln.split()[1:] for ln in lines[1:]}
    assert cells["tpot_ms"][3:] == ["2.00x", "1.25x"]
    assert cells["tokens_per_pass"][3:] == ["2.00x", "1.50x"]

"""On-policy distillation (SPEC §5): compaction, masks, divergences, acceptance, on-policy steps."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params

from pipo_jax.config import ConfigError, load_config
from pipo_jax.data.arith import to_messages
from pipo_jax.decode.runner import load
from pipo_jax.errors import TrainingError
from pipo_jax.io import checkpoint as ckpt
from pipo_jax.io.tokenizer import ByteTokenizer, reasoning_prompt
from pipo_jax.model import sharding
from pipo_jax.model.pipo import PipoLM, lm_head
from pipo_jax.train import opd as distill
from pipo_jax.train import opd_loss as opd
from pipo_jax.train.metrics import read_jsonl
from pipo_jax.train.opd import OpdStep, response_texts, rollout_scores, teacher_hidden
from pipo_jax.train.pipeline import train_stage
from pipo_jax.train.state import TrainState, make_optimizer

pytestmark = pytest.mark.usefixtures("compilation_cache_dir")

REPO = Path(__file__).resolve().parents[1]
P = 0  # PAD in the hand-written cases


# ---------------------------------------------------------------------------- PAD compaction


def test_compaction_maps_positions_as_spec_says():
    tokens = jnp.array([[5, 6, 7, 8, 9, 4],    # no PAD
                        [5, P, 7, 8, 9, P],    # PAD mid-row and at the end
                        [5, 6, 7, P, P, P]],   # PAD after PAD, to the end
                       jnp.int32)
    np.testing.assert_array_equal(opd.compact(tokens, P),
                                  [[5, 6, 7, 8, 9, 4], [5, 7, 8, 9, P, P], [5, 6, 7, P, P, P]])
    keep, index = opd.compaction_index(tokens, P)
    np.testing.assert_array_equal(keep, tokens != P)
    # A real token reads its own compacted index; a PAD the last real token before it.
    np.testing.assert_array_equal(index, [[0, 1, 2, 3, 4, 5], [0, 0, 1, 2, 3, 3],
                                          [0, 1, 2, 2, 2, 2]])
    outputs = jnp.arange(6, dtype=jnp.float32)[None, :, None] * 10 + jnp.arange(3)[:, None, None]
    mapped = opd.expand(jnp.broadcast_to(outputs, (3, 6, 1)), index)[..., 0]
    np.testing.assert_array_equal(mapped, [[0, 10, 20, 30, 40, 50], [1, 1, 11, 21, 31, 31],
                                           [2, 12, 22, 22, 22, 22]])


@pytest.fixture(scope="module")
def micro():
    cfg = load_config(REPO / "configs" / "micro.yaml")
    return cfg, random_params(cfg.model, True, 1), random_params(cfg.teacher_model, False, 2)


def test_teacher_scoring_equals_teacher_on_the_clean_sequence(micro):
    cfg, _, teacher = micro
    tcfg = cfg.teacher_model
    # A prompt with its parity PAD, a rejected draft, an EOS pair and the PAD tail after it.
    row = [10, 11, 12, P, 20, 21, 22, P, 24, 25, 2, P, P, P]
    got = teacher_hidden(teacher, jnp.array([row]), cfg=tcfg, pad_id=P)
    clean = [t for t in row if t != P] + [P]  # one more token: h covers every real token
    h = PipoLM(tcfg, pipo=False).apply({"params": teacher}, jnp.array([clean]))["h"][0]
    real_before = np.cumsum(np.array(row) != P) - 1  # compacted index of each position
    for i in range(len(row) // 2 - 1):
        # Backbone position i ↔ token 2i+1, MTP position i ↔ token 2i+2 (PAD: the last real).
        np.testing.assert_allclose(got["backbone"][0, i], h[real_before[2 * i + 1]], atol=1e-5)
        np.testing.assert_allclose(got["mtp"][0, i], h[real_before[2 * i + 2]], atol=1e-5)


# ------------------------------------------------------------------------ rows and masks


def test_rollout_rows_shift_prompts_to_the_start():
    prompt = jnp.array([[P, P, 7, 8], [3, 4, 5, 6]], jnp.int32)
    valid = prompt != P
    out = jnp.array([[1, 2, 3, P, P, P], [9, P, P, P, P, P]], jnp.int32)
    tokens, prompt_len, seq_len = opd.rollout_rows(prompt, valid, out, jnp.array([2, 1]), P)
    np.testing.assert_array_equal(tokens, [[7, 8, 1, 2, 3, P, P, P, P, P],
                                           [3, 4, 5, 6, 9, P, P, P, P, P]])
    np.testing.assert_array_equal(prompt_len, [2, 4])
    np.testing.assert_array_equal(seq_len, [6, 6])


def test_target_masks_cover_drafted_response_positions_only():
    eos = 2
    # Row 0: prompt of 4 | (a, b) | (c, PAD: rejected) | (EOS, PAD) | PAD tail.
    # Row 1: prompt of 2 | (a, b) | (c, PAD): the budget ended the row, so c had no draft.
    tokens = jnp.array([[10, 11, 12, P, 20, 21, 22, P, eos, P, P, P],
                        [10, 11, 20, 21, 22, P, P, P, P, P, P, P]], jnp.int32)
    prompt_len, seq_len = jnp.array([4, 2]), jnp.array([10, 6])
    m = opd.target_masks(tokens, prompt_len, seq_len, P, eos, "argmax")
    # Backbone position i targets t_{2i+2}; MTP position i targets t_{2i+3}.
    np.testing.assert_array_equal(m["backbone"], [[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(m["mtp"], [[0, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(m["fill"], [[0, 0, 1, 0, 0], [0, 0, 0, 0, 0]])
    masked = opd.target_masks(tokens, prompt_len, seq_len, P, eos, "mask")
    np.testing.assert_array_equal(masked["mtp"], [[0, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    assert not np.any(masked["fill"])


# ------------------------------------------------------------------------------ divergences


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def _topk_reference(zs: np.ndarray, zt: np.ndarray, y: int, k: int) -> tuple[float, float]:
    """Reverse KL on the de-duplicated union {y} ∪ topk(zs) ∪ topk(zt), and the acceptance."""
    order = [y, *np.argsort(-zs, kind="stable")[:k], *np.argsort(-zt, kind="stable")[:k]]
    union = list(dict.fromkeys(int(i) for i in order))
    ps, pt = _softmax(zs[union]), _softmax(zt[union])
    return float(np.sum(ps * np.log(ps / pt))), float(min(1.0, pt[0] / ps[0]))


def _terms(zs, zt, y, mode, k=3, fill=False):
    return opd.divergence_terms(jnp.asarray(zs, jnp.float32)[None],
                                jnp.asarray(zt, jnp.float32)[None], jnp.array([y]),
                                jnp.array([fill]), mode, k)


@pytest.mark.parametrize("case", ["overlap", "label_outside_both"])
def test_topk_union_dedups_renormalises_and_keeps_the_label(case):
    rng = np.random.default_rng(0)
    zs = rng.normal(size=12) * 2
    if case == "overlap":
        # Student top-3 and teacher top-3 share two ids, and the label is one of them: the
        # union has 4 ids; counting duplicates twice would change the renormalisation.
        zs = np.array([5.0, 4.0, 3.0, 0.1, -1, -2, 0, 0.2, -0.5, -3, 1.0, -1.5])
        zt = np.array([0.0, 4.5, 3.5, 5.0, -1, -2, 0, 0.2, -0.5, -3, 1.0, -1.5])
        y = 1
    else:
        zt = rng.normal(size=12) * 2
        y = int(np.argmin(zs + zt))  # in neither top-k
    got = _terms(zs, zt, y, "topk")
    kl, acceptance = _topk_reference(zs, zt, y, 3)
    np.testing.assert_allclose(got["objective"][0], kl, rtol=1e-5)
    np.testing.assert_allclose(got["acceptance"][0], acceptance, rtol=1e-5)
    # Renormalised over the union, the label's probability is part of the objective: moving
    # the label's student logit changes the objective even when it is outside both top-k.
    grad = jax.grad(lambda z: opd.divergence_terms(
        z[None], jnp.asarray(zt, jnp.float32)[None], jnp.array([y]), jnp.array([False]),
        "topk", 3)["objective"][0])(jnp.asarray(zs, jnp.float32))
    assert abs(float(grad[y])) > 1e-6


def test_topk_with_the_whole_vocabulary_is_the_full_reverse_kl():
    rng = np.random.default_rng(1)
    zs, zt = rng.normal(size=7), rng.normal(size=7)
    full = _terms(zs, zt, 3, "full")
    topk = _terms(zs, zt, 3, "topk", k=7)
    np.testing.assert_allclose(topk["objective"], full["objective"], rtol=1e-5)
    np.testing.assert_allclose(full["kl"], full["objective"], rtol=1e-6)


def test_acceptance_targets():
    rng = np.random.default_rng(2)
    zs, zt = rng.normal(size=9) * 1.5, rng.normal(size=9) * 1.5
    ps, pt = _softmax(zs), _softmax(zt)
    for y in range(9):
        want = min(1.0, pt[y] / ps[y])
        np.testing.assert_allclose(_terms(zs, zt, y, "sampled")["acceptance"][0], want, rtol=1e-5)
        np.testing.assert_allclose(_terms(zs, zt, y, "topk", k=9)["acceptance"][0], want,
                                   rtol=1e-5)
    # full: the expected acceptance Σ min(p_s, p_t) = 1 − TV(p_s, p_t).
    one_minus_tv = 1.0 - 0.5 * np.abs(ps - pt).sum()
    np.testing.assert_allclose(_terms(zs, zt, 0, "full")["acceptance"][0], one_minus_tv,
                               rtol=1e-5)
    np.testing.assert_allclose(one_minus_tv, np.minimum(ps, pt).sum(), rtol=1e-6)
    # Targets are detached: no gradient reaches the student through them.
    g = jax.grad(lambda z: opd.divergence_terms(z[None], jnp.asarray(zt)[None], jnp.array([0]),
                                                jnp.array([False]), "topk", 3)["acceptance"][0])
    np.testing.assert_array_equal(g(jnp.asarray(zs, jnp.float32)), 0.0)


@pytest.mark.parametrize("mode", ["topk", "full", "sampled"])
def test_pad_fill_uses_the_student_argmax_and_the_expected_acceptance(mode):
    """A filled MTP target (rejected or PAD draft) trains on the student's argmax; its
    confidence target is the expected acceptance of a draft from p_s, 1 - TV, not α(argmax):
    there was no committed draft to score."""
    zs = np.array([0.0, 3.0, 1.0, 0.5])
    zt = np.array([1.0, 0.0, 2.0, 0.0])
    got = _terms(zs, zt, P, mode, fill=True)
    assert int(got["labels"][0]) == 1
    ps, pt = _softmax(zs), _softmax(zt)
    np.testing.assert_allclose(got["acceptance"][0], np.minimum(ps, pt).sum(), rtol=1e-5)
    assert abs(np.minimum(ps, pt).sum() - min(1.0, pt[1] / ps[1])) > 0.05  # non-vacuous
    # Unfilled positions keep α at the drafted label.
    if mode != "full":
        np.testing.assert_allclose(_terms(zs, zt, 2, mode)["acceptance"][0],
                                   min(1.0, pt[2] / ps[2]), rtol=1e-5)


def _full_kl(z, zt):
    ls, lt = jax.nn.log_softmax(z), jax.nn.log_softmax(zt)
    return jnp.sum(jnp.exp(ls) * (ls - lt))


def test_sampled_estimator_gradient_is_unbiased_for_the_reverse_kl_gradient():
    """Monte Carlo over y ~ p_s: the mean per-sample gradient of the ``sampled`` objective
    matches ∇ KL(p_s ‖ p_t) within 5 standard errors per component (each component's standard
    error is measured from the same samples; 5σ makes a false failure ~1e-6 per component),
    while the naive ``∇(log p_s(y) − log p_t(y))`` averages to zero."""
    zs = jnp.array([1.0, -0.5, 0.3, 2.0, -1.2, 0.0])
    zt = jnp.array([0.2, 0.8, -0.3, 1.0, 0.5, -1.0])
    exact = jax.grad(_full_kl)(zs, zt)
    n = 40_000
    ys = jax.random.categorical(jax.random.key(0), zs, shape=(n,))

    def per_sample(y, mode):
        return jax.grad(lambda z: opd.divergence_terms(
            z[None], zt[None], y[None], jnp.array([False]), mode, 2)["objective"][0])(zs)

    grads = np.asarray(jax.vmap(lambda y: per_sample(y, "sampled"))(ys))
    se = grads.std(axis=0) / np.sqrt(n)
    assert np.all(np.abs(grads.mean(axis=0) - exact) <= 5 * se + 1e-7), (grads.mean(0), exact)
    assert float(jnp.max(jnp.abs(exact))) > 20 * float(se.max())  # the test has power

    def naive(y):
        return jax.grad(lambda z: jax.nn.log_softmax(z)[y] - jax.nn.log_softmax(zt)[y])(zs)

    naive_mean = np.asarray(jax.vmap(naive)(ys)).mean(axis=0)
    np.testing.assert_allclose(naive_mean, 0.0, atol=5 * se.max() + 1e-6)


def test_sampled_estimator_lowers_the_true_kl():
    zt = jnp.array([2.0, 0.5, -1.0, 0.0, 1.0])
    z = jnp.array([-1.0, 1.0, 2.0, 0.0, -2.0])
    start = float(_full_kl(z, zt))

    @jax.jit
    def step(z, key):
        ys = jax.random.categorical(key, z, shape=(64,))
        g = jax.grad(lambda w: jnp.mean(opd.divergence_terms(
            jnp.broadcast_to(w, (64, 5)), jnp.broadcast_to(zt, (64, 5)), ys,
            jnp.zeros(64, bool), "sampled", 2)["objective"]))(z)
        return z - 0.5 * g

    for key in jax.random.split(jax.random.key(1), 200):
        z = step(z, key)
    assert float(_full_kl(z, zt)) < 0.05 * start


def test_expected_calibration_error():
    pred = jnp.array([0.05, 0.15, 0.95, 0.92, 0.5])
    target = jnp.array([0.0, 0.2, 1.0, 0.8, 0.0])
    mask = jnp.array([True, True, True, True, False])
    # Bins 0, 1, 9, 9: gaps 0.05 + 0.05 + |1.87 − 1.80| over 4 positions.
    np.testing.assert_allclose(opd.expected_calibration_error(pred, target, mask, 10),
                               0.17 / 4, rtol=1e-5)
    np.testing.assert_allclose(opd.expected_calibration_error(pred, pred, mask, 10), 0.0)


# ------------------------------------------------------------------------ the jitted step


def _prompts(tok: ByteTokenizer) -> list[list[int]]:
    return [reasoning_prompt(tok, to_messages({"question": f"What is {a} + {b}?"}))
            for a, b in ((12, 34), (5, 71), (40, 40), (99, 1))]


def _setup(micro, *overrides: str):
    cfg, student, teacher = micro
    cfg = load_config(REPO / "configs" / "micro.yaml", list(overrides))
    tok = ByteTokenizer()
    tx = make_optimizer(cfg.opd)
    step_fn = OpdStep(cfg, tok, cfg.teacher_model, tx, sharding.build_mesh(cfg.mesh))
    # A copy: the update donates the state, and the module's fixture must survive it.
    params = jax.tree.map(jnp.array, student)
    state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))
    return cfg, tok, step_fn, state, teacher


def _copy(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def test_gated_rollouts_use_the_current_parameters_and_train_on_rejections(micro):
    """Three gated OPD steps (``opd.rollout_threshold`` 0.5, the compiled stage programs; one
    test, so that they compile once). The rollouts hold real rejections — lone PADs in second
    slots, followed by real pairs — and PAD never opens a pair; the update trains there: finite
    loss, filled MTP targets (their confidence target, 1 - TV, is tested in
    ``test_pad_fill_uses_the_student_argmax_and_the_expected_acceptance``), parameters that
    move; and each step's rollouts are generated with the current parameters, not stale ones."""
    cfg, tok, step_fn, state, teacher = _setup(micro, "opd.learning_rate=0.05",
                                               "opd.warmup_frac=0.0", "opd.rollout_threshold=0.5")
    prompts = _prompts(tok)
    before = _copy(state.params)
    state, metrics, rows = step_fn(state, teacher, prompts, 0)
    toks, n = np.asarray(rows["tokens"]), np.asarray(rows["seq_len"])
    prompt_len = np.asarray(rows["prompt_len"])
    lone = 0
    for r in range(len(toks)):
        resp = toks[r, prompt_len[r]:n[r]]
        assert np.all(resp[0::2] != tok.pad_id)  # PAD never opens a pair
        # A rejection mid-row: (x, PAD) followed by a real first token.
        lone += int(np.sum((resp[1:-2:2] == tok.pad_id) & (resp[2:-1:2] != tok.pad_id)))
    assert lone > 0, "no rejected draft: the gate did not act"
    assert float(metrics["mtp_pad_filled"]) > 0
    for key in ("loss", "loss_confidence", "kl_mtp", "confidence_target_mean", "ece"):
        assert np.isfinite(float(metrics[key])), key
    assert 0.0 <= float(metrics["confidence_target_mean"]) <= 1.0
    state, _, _ = step_fn(state, teacher, prompts, 1)
    current = _copy(state.params)
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), current, before)
    assert max(jax.tree.leaves(moved)) > 0
    state, metrics, rows = step_fn(state, teacher, prompts, 2)
    for key in ("ece", "confidence_pred_mean", "confidence_target_mean", "commit_rate@0.95",
                "rollout_tokens", "rollout_pads", "loss_confidence", "kl_backbone", "kl_mtp"):
        assert np.isfinite(float(metrics[key])), key
    fresh = step_fn.rollout(current, prompts, 2)
    stale = step_fn.rollout(before, prompts, 2)
    np.testing.assert_array_equal(rows["tokens"], fresh["tokens"])
    assert not np.array_equal(rows["tokens"], stale["tokens"])
    toks, n = np.asarray(rows["tokens"]), np.asarray(rows["seq_len"])
    for r in range(len(prompts)):
        assert np.all(toks[r, :n[r]:2] != tok.pad_id)


def test_opd_steps_lower_the_kl_on_a_fixed_batch(micro):
    cfg, tok, step_fn, state, teacher = _setup(
        micro, "opd.learning_rate=1e-2", "opd.warmup_frac=0.0", "opd.pad_fill=mask")
    rows = step_fn.rollout(state.params, _prompts(tok), 0)
    scored = step_fn.score(teacher, rows["tokens"])
    chex.assert_shape([scored["backbone"], scored["mtp"]],
                      (4, rows["tokens"].shape[1] // 2 - 1, cfg.teacher_model.d_model))
    # Rows are cut to a multiple of row_bucket past the longest rollout, or kept whole.
    full = 64 + 2 * cfg.opd.rollout_max_new_tokens  # the prompt width and the budget's slots
    bucket = cfg.opd.row_bucket
    want = min(full, -(-int(jnp.max(rows["seq_len"])) // bucket) * bucket)
    assert rows["tokens"].shape[1] == want
    # The evaluation statistics agree with the loss's metrics.
    stats = jax.jit(functools.partial(
        distill.rollout_statistics, cfg=cfg.model, teacher_cfg=cfg.teacher_model,
        pad_id=tok.pad_id, eos_id=tok.eos_id))(state.params, teacher, rows)
    # opd.grad_accum: the step over 2 micro-batches of 2 rows is the step on the 4 rows, the
    # calibration metrics (not sums over rows) included.
    _, _, accumulated, _, _ = _setup(micro, "opd.learning_rate=1e-2", "opd.warmup_frac=0.0",
                                     "opd.pad_fill=mask", "opd.grad_accum=2")
    acc_state, acc_metrics = accumulated.update(
        TrainState(step=jnp.array(state.step), params=jax.tree.map(jnp.array, state.params),
                   opt_state=jax.tree.map(jnp.array, state.opt_state)),
        rows, scored, lm_head(teacher))
    kls = []
    for _ in range(6):
        state, metrics = step_fn.update(state, rows, scored, lm_head(teacher))
        if acc_metrics is not None:
            assert acc_metrics.keys() == metrics.keys()
            for key in metrics:
                np.testing.assert_allclose(acc_metrics[key], metrics[key], rtol=1e-4,
                                           atol=1e-6, err_msg=key)
            chex.assert_trees_all_close(acc_state.params, state.params, rtol=1e-4, atol=1e-6)
            acc_metrics = None
        kls.append(float(metrics["kl_backbone"] + metrics["kl_mtp"]))
        assert np.isfinite(float(metrics["loss"]))
        if len(kls) == 1:
            for name, mask in (("kl_backbone", "backbone"), ("kl_mtp", "mtp")):
                np.testing.assert_allclose(np.mean(stats[name][stats[mask]]), metrics[name],
                                           rtol=1e-4)
    acceptance = np.asarray(stats["acceptance"])[np.asarray(stats["mtp"])]
    assert np.all((acceptance >= 0) & (acceptance <= 1 + 1e-6))
    # kls[0] == kls[1]: the learning rate is 0 at step 0. Then the KL falls at every step.
    assert all(b < a for a, b in zip(kls[1:], kls[2:], strict=False)), kls
    assert kls[-1] < 0.9 * kls[1], kls


@pytest.mark.parametrize("divergence", ["topk", "full", "sampled"])
def test_opd_loss_under_jit_has_finite_gradients_for_every_divergence(divergence):
    """The loss of every divergence on random hidden states: jit-compiled, finite, with a
    gradient for the student's hidden states and none leaking from the detached targets."""
    rng = np.random.default_rng(4)
    b, n, h, ht, v = 2, 6, 8, 12, 20
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    tokens = jnp.asarray(rng.integers(1, v, (b, 2 * n + 2)), jnp.int32)
    masks = {"backbone": jnp.ones((b, n), bool), "mtp": jnp.ones((b, n), bool),
             "fill": jnp.zeros((b, n), bool).at[0, 2].set(True)}
    teacher = {"backbone": normal(b, n, ht), "mtp": normal(b, n, ht)}

    @jax.jit
    def loss(hm):
        out = {"h": hm[0], "m": hm[1], "conf_logits": hm[2]}
        return opd.opd_loss(out, normal_ws, teacher, wt, tokens, masks, mode=divergence, k=4,
                            chunk=5, w_backbone=1.0, w_mtp=1.0, w_conf=1.0, ece_bins=10,
                            vocab_chunk=7)

    normal_ws, wt = normal(v, h), normal(v, ht)
    hm = (normal(b, n, h), normal(b, n, h), normal(b, n))
    (value, metrics), grads = jax.value_and_grad(loss, has_aux=True)(hm)
    assert np.isfinite(float(value))
    for g in grads:
        assert np.all(np.isfinite(g)) and float(jnp.abs(g).sum()) > 0
    assert float(metrics["kl_backbone"]) > 0 and 0 <= float(metrics["ece"]) <= 1
    assert 0 <= float(metrics["brier"]) <= 1
    # Random logits: both classes of α ≥ 0.5 occur among the 12 MTP positions.
    assert 0 <= float(metrics["auroc"]) <= 1


def test_rollout_scores_read_answers_from_the_response():
    tok = ByteTokenizer()
    prompt = [tok.eos_id + 1] * 4
    good = tok.encode("so \\boxed{46}")
    bad = tok.encode("\\boxed{7}")
    rows = [prompt + good + [tok.eos_id], prompt + bad]
    width = max(map(len, rows)) + 2
    tokens = np.full((2, width), tok.pad_id)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    rows_np = {"tokens": tokens, "prompt_len": np.array([4, 4]),
               "seq_len": np.array([len(rows[0]), len(rows[1])])}
    assert [f for _, f in response_texts(tok, rows_np)] == [True, False]
    scores = rollout_scores(tok, rows_np, ["46", "7"])
    assert scores == {"rollout_finished": 0.5, "rollout_accuracy": 1.0}
    assert "rollout_accuracy" not in rollout_scores(tok, rows_np, [None, None])


def test_opd_config_is_validated():
    from pipo_jax.config import ConfigError

    micro_yaml = REPO / "configs" / "micro.yaml"
    for bad, match in (("opd.divergence=kl", "divergence"), ("opd.topk=0", "topk"),
                       ("opd.rollout_temperature=0", "rollout_temperature"),
                       ("opd.rollout_threshold=2", "threshold"), ("opd.pad_fill=zero", "pad_fill"),
                       ("opd.w_backbone=-1", r"opd\.w_backbone must be >= 0"),
                       ("stages=[sft,ar]", "order"),
                       ("teacher_model.vocab_size=300", "share a tokenizer")):
        with pytest.raises(ConfigError, match=match):
            load_config(micro_yaml, [bad, "stages=[teacher,ar,sft,opd]"] if "stages" not in bad
                        else [bad])
    cfg = load_config(micro_yaml)
    assert dataclasses.replace(cfg.opd).divergence == "topk"
    # The micro teacher is wider and deeper than the student.
    assert (cfg.teacher_model.d_model, cfg.teacher_model.n_layers) == (48, 4)
    assert (cfg.model.d_model, cfg.model.n_layers) == (32, 2)


# ------------------------------------------------------------------------------- the stage


def _opd_config(run_dir: Path, data_dir: Path, *overrides: str):
    return load_config(REPO / "configs" / "micro.yaml", [
        f"run_dir={run_dir}", f"data.data_dir={data_dir}", "data.num_train=16",
        "data.max_len=128", "stages=[opd]", "opd.steps=4", "opd.ckpt_every=2", "opd.log_every=1",
        *overrides])


def _write_params(stage_dir: Path, params, cfg, stage: str) -> None:
    """A params-only checkpoint, as hf-to-pipo writes (an imported or merged model)."""
    ckpt.save_params(stage_dir, 0, params, cfg, stage)


def _student_and_teacher(run_dir: Path, micro) -> None:
    cfg, student, teacher = micro
    _write_params(run_dir / "sft", student, cfg, "sft")
    _write_params(run_dir / "teacher", teacher, cfg, "teacher")


@pytest.fixture(scope="module")
def opd_run(tmp_path_factory, micro):
    root = tmp_path_factory.mktemp("opd")
    cfg = _opd_config(root / "run", root / "tfds")
    _student_and_teacher(root / "run", micro)
    result = train_stage(cfg, "opd", progress=False)
    return cfg, root, result


def test_opd_stage_logs_every_metric_and_checkpoints(opd_run):
    cfg, root, result = opd_run
    stage_dir = root / "run" / "opd"
    assert result.steps == 4 and ckpt.all_steps(stage_dir) == [2, 4]
    records = read_jsonl(stage_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    want = {"loss", "loss_backbone", "loss_mtp", "loss_confidence", "kl_backbone", "kl_mtp",
            "confidence_pred_mean", "confidence_target_mean", "ece", "brier", "auroc",
            "rollout_tokens", "rollout_pads", "rollout_finished", "rollout_accuracy", "grad_norm",
            *(f"commit_rate@{t}" for t in opd.OPD_COMMIT_THRESHOLDS)}
    assert want <= set(records[-1]), want - set(records[-1])
    assert list(stage_dir.glob("events.out.tfevents.*"))  # TensorBoard


def test_opd_resume_after_crash_matches_uninterrupted_run(opd_run, micro, tmp_path, monkeypatch):
    cfg, root, _ = opd_run
    cfg = dataclasses.replace(cfg, run_dir=str(tmp_path / "run"))
    _student_and_teacher(tmp_path / "run", micro)
    real = distill.make_prompt_dataset

    class Crashing:
        def __init__(self, ds):
            self.ds = ds

        def __getitem__(self, step):
            if step == 3:
                raise RuntimeError("killed before step 4")
            return self.ds[step]

    with monkeypatch.context() as mp:
        mp.setattr(distill, "make_prompt_dataset", lambda *a: Crashing(real(*a)))
        with pytest.raises(RuntimeError, match="killed"):
            train_stage(cfg, "opd", progress=False)
    assert ckpt.all_steps(tmp_path / "run" / "opd") == [2]
    train_stage(cfg, "opd", progress=False)
    got = {r["step"]: r for r in read_jsonl(tmp_path / "run" / "opd")}
    want = {r["step"]: r for r in read_jsonl(root / "run" / "opd")}
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    for step in want:  # same prompts, same rollouts (seeded by step), same updates
        for key in ("loss", "kl_backbone", "kl_mtp", "rollout_tokens", "grad_norm"):
            np.testing.assert_allclose(got[step][key], want[step][key], rtol=1e-5,
                                       err_msg=f"step {step} {key}")


def test_opd_stage_says_what_is_missing(micro, opd_run, tmp_path):
    cfg, root, _ = opd_run
    run, tfds = tmp_path / "run", root / "tfds"
    student = f"opd.student_dir={root / 'run' / 'sft'}"
    with pytest.raises(TrainingError, match="PIPO SFT model"):
        train_stage(dataclasses.replace(cfg, run_dir=str(run)), "opd", progress=False)
    with pytest.raises(TrainingError, match="frozen AR teacher"):
        train_stage(_opd_config(run, tfds, student), "opd", progress=False)
    with pytest.raises(TrainingError, match="holds a PIPO model"):
        train_stage(_opd_config(tmp_path / "run2", tfds, student,
                                f"opd.teacher_dir={root / 'run' / 'sft'}"), "opd", progress=False)
    with pytest.raises(TrainingError, match="another model config.*mlp_dim"):
        train_stage(_opd_config(tmp_path / "run3", tfds, student, "model.mlp_dim=96"), "opd",
                    progress=False)


def test_load_picks_the_opd_stage_and_the_teacher(opd_run):
    _, root, _ = opd_run
    runner = load(root / "run", ar_stage="teacher")
    assert runner.stage == "opd" and runner.ar_stage == "teacher"
    assert runner.ar_model.d_model == 48 and runner.config.model.d_model == 32
    (gen,) = runner.generate("What is 1 + 2?", model="ar", max_new_tokens=6, batch_size=1)
    assert gen.stats["tokens"] == 6 or gen.stats["finished"]
    assert load(root / "run", stage="sft").stage == "sft"
    with pytest.raises(ValueError, match="stage"):
        load(root / "run", stage="ar")


def test_opd_eval_reports_confidence_metrics_and_a_reliability_diagram(opd_run, tmp_path):
    """``benchmarks/opd_eval``'s rollout section on the micro run: every confidence metric is
    reported, in range, and the stage's reliability diagram is written and listed."""
    from benchmarks import opd_eval
    from pipo_jax.data.loader import test_examples

    _, root, _ = opd_run
    runner = load(root / "run", stage="opd", ar_stage="teacher")
    examples = test_examples(runner.config, 2)
    png = tmp_path / "reliability_opd.png"
    got = opd_eval.rollout_quality(runner, runner, examples, samples=2, batch=4, bins=10,
                                   diagram=png)
    assert got["positions"] > 0
    for key in ("ece", "brier", "brier_alpha_0.5", "brier_teacher_sample", "alpha_below_0.5",
                "teacher_prob_mean"):
        assert 0 <= got[key] <= 1, key
    for key in ("auroc", "auroc_teacher_sample"):  # NaN only when a label has one class
        assert np.isnan(got[key]) or 0 <= got[key] <= 1, key
    if got["reliability_diagram"] is not None:  # None without matplotlib
        assert Path(got["reliability_diagram"]).resolve() == png and png.stat().st_size > 0


@pytest.mark.parametrize("fill", [False, True])
def test_full_divergence_chunked_over_the_vocabulary_matches_the_whole(fill):
    rng = np.random.default_rng(3)
    n, v, h, ht = 5, 23, 6, 8  # 23 columns in blocks of 4: a partial last block
    hs, ws = jnp.asarray(rng.normal(size=(n, h)), jnp.float32), jnp.asarray(rng.normal(size=(v, h)))
    hts, wt = jnp.asarray(rng.normal(size=(n, ht))), jnp.asarray(rng.normal(size=(v, ht)))
    labels = jnp.asarray(rng.integers(0, v, n))
    fills = jnp.full((n,), fill)

    def run(vocab_chunk):
        def f(hs_, ws_):
            out = opd.chunked_divergence(hs_, ws_, hts, wt, labels, fills, "full", 3, 2,
                                         vocab_chunk)
            return jnp.sum(out["objective"]), out
        (_, out), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(hs, ws)
        return out, grads

    whole, g_whole = run(0)
    blocks, g_blocks = run(4)
    for key in ("objective", "kl", "acceptance", "teacher_logprob", "labels"):
        np.testing.assert_allclose(blocks[key], whole[key], rtol=1e-5, atol=1e-6, err_msg=key)
    # The teacher's log-probability of the label (fills: the student's argmax) is log p_t(y).
    lt = jax.nn.log_softmax(hts @ wt.T)
    np.testing.assert_allclose(whole["teacher_logprob"],
                               np.take_along_axis(lt, whole["labels"][:, None], 1)[:, 0],
                               rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(g_blocks, g_whole, rtol=1e-4, atol=1e-6)


def test_per_row_rollout_thresholds(micro):
    """``opd.rollout_thresholds`` gates row ``i`` at ``thresholds[i % n]``: each row of a mixed
    batch is the row a rollout gated at its own threshold alone produces (same seeds)."""
    def rows(*overrides: str) -> np.ndarray:
        cfg, tok, step_fn, state, _ = _setup(micro, *overrides)
        got = step_fn.rollout(state.params, _prompts(tok), step=3)
        return np.asarray(got["tokens"]), np.asarray(got["prompt_len"]), np.asarray(
            got["seq_len"]), tok

    mixed, p_len, n, tok = rows("opd.rollout_thresholds=[-1,1]")
    every, _, _, _ = rows("opd.rollout_threshold=-1")
    none, _, _, _ = rows("opd.rollout_threshold=1")
    for r in range(len(mixed)):
        want = (every if r % 2 == 0 else none)[r]
        width = min(len(want), mixed.shape[1])
        np.testing.assert_array_equal(mixed[r, :width], want[:width])
        resp = mixed[r, p_len[r]:n[r]]
        if r % 2:  # τ = 1: every draft rejected, one token per pass
            assert np.all(resp[1::2] == tok.pad_id) and np.all(resp[0::2] != tok.pad_id)
    cfg = load_config(REPO / "configs" / "micro.yaml", ["opd.rollout_thresholds=[0.9,0.99,1]"])
    assert cfg.opd.row_thresholds(4) == (0.9, 0.99, 1.0, 0.9)
    assert cfg.opd.row_thresholds(2) == (0.9, 0.99)
    with pytest.raises(ConfigError, match=r"opd\.rollout_thresholds\[1\] must be in "
                                          r"\[-1, 1\].*got 1\.5"):
        load_config(REPO / "configs" / "micro.yaml", ["opd.rollout_thresholds=[0.9,1.5]"])

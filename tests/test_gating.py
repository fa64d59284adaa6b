"""SPEC §6 decode semantics: confidence gating, PAD and EOS rules, AR decode, left padding.

Runs the real on-device decoder (``engine.prefill`` + ``engine.decode_loop``, greedy) on a random
micro model and checks its output against independent step-by-step recomputations.
"""

from __future__ import annotations

import functools

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pipo_jax.config import ModelConfig
from pipo_jax.decode import engine as dec
from pipo_jax.decode import sampling
from pipo_jax.model.pairs import parity_pad
from pipo_jax.model.pipo import PipoLM

PAD = 0
CFG = ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                  mlp_dim=64, max_context=64)
H = CFG.d_model
EOS = 1  # its embedding row is zero in ``random_params``: logit 0, never the argmax
BUDGET = 12
SP = sampling.SamplingParams()  # greedy
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15]]  # parity PAD + 4 left PADs for row 0


def random_params(seed: int) -> dict:
    """Random PIPO parameters (numpy-built, so init costs no XLA compile).

    The EOS embedding row is zero, so its logit is exactly 0 while the best of the other 38
    logits is positive: greedy decoding never emits EOS and rows run to the budget (one static
    EOS id for every test keeps the number of compiled decode programs down).
    """
    params = helpers.random_params(CFG, True, seed, std=0.3)
    emb = params["embedder"]["embedding"]
    return {**params, "embedder": {"embedding": emb.at[EOS].set(0.0)}}


def ar_of(params: dict) -> dict:
    return {"embedder": params["embedder"], "backbone": params["backbone"]}


def steered(params: dict, token: int, boost: float = 50.0) -> dict:
    """A model whose next-token argmax is ``token`` whatever the context.

    Backbone layers add nothing (zero attention/MLP output projections) and the compressor is the
    identity-init MLP, so the hidden state is ``norm(silu(e_a) + silu(e_b))`` (PIPO) or
    ``norm(e)`` (AR); every embedding shares a positive component along dimension 0, so that
    dimension dominates every hidden state, and ``token``'s row is boosted along it.
    """
    p = jax.tree.map(np.array, params)
    emb = p["embedder"]["embedding"]
    emb[:, 0] += 3.0
    emb[token, 0] += boost
    layer = p["backbone"]["layers"]["layer_0"]
    layer["attn"]["o_proj"]["kernel"][...] = 0.0
    layer["mlp"]["down_proj"]["kernel"][...] = 0.0
    eye = np.eye(H, dtype=np.float32)
    p["compressor"] = {"fc1": {"kernel": np.eye(2 * H, dtype=np.float32),
                               "bias": np.zeros(2 * H, np.float32)},
                       "fc2": {"kernel": np.concatenate([eye, eye]),
                               "bias": np.zeros(H, np.float32)}}
    return jax.tree.map(jnp.asarray, p)


@pytest.fixture(scope="module")
def params():
    return random_params(0)


# ------------------------------------------------------------------------------ decode runs


def _prompts(prompts, pipo=True, bucket=2):
    return dec.prepare_prompts(prompts, pipo, PAD, bucket, BUDGET, CFG.max_context)


@functools.cache
def _decoder(spec: dec.DecodeSpec) -> dec.Decoder:
    return dec.Decoder(spec)  # one compilation per spec for the whole module


def pipo_decode(params, prompts, threshold, eos=EOS, seeds=None) -> dict:
    tokens, valid = _prompts(prompts)
    keys = sampling.request_keys(seeds if seeds is not None else range(len(prompts)))
    thr = jnp.float32(threshold)
    decoder = _decoder(dec.DecodeSpec(CFG, True, SP, BUDGET, PAD, eos, draft=threshold < 1.0))
    state = decoder.prefill(params, tokens, valid, keys, thr)
    state = decoder.loop(params, state, thr)
    return {k: np.asarray(getattr(state, k)) for k in
            ("out", "n_tokens", "n_passes", "n_drafts", "n_commits", "done")}


def ar_decode(params, prompts, eos=EOS) -> dict:
    tokens, valid = _prompts(prompts, pipo=False)
    keys = sampling.request_keys(range(len(prompts)))
    decoder = _decoder(dec.DecodeSpec(CFG, False, SP, BUDGET, PAD, eos))
    thr = jnp.float32(-1.0)  # read only by PIPO
    state = decoder.prefill(ar_of(params), tokens, valid, keys, thr)
    state = decoder.loop(ar_of(params), state, thr)
    return {k: np.asarray(getattr(state, k)) for k in ("out", "n_tokens", "n_passes", "done")}


def check_invariants(res: dict, eos: int, pipo: bool = True) -> None:
    """Counts and slot layout that hold for every run, whatever the model."""
    for r in range(len(res["out"])):
        out = res["out"][r]
        real = out[out != PAD]
        n_passes = int(res["n_passes"][r])
        assert res["done"][r]
        assert res["n_tokens"][r] == len(real), "PAD counted as a token"
        assert 1 <= len(real) <= BUDGET
        if eos in real:  # EOS ends the row: it is the last real token
            assert real[-1] == eos and (real == eos).sum() == 1
        else:
            assert len(real) == BUDGET
        first = out[0::2] if pipo else out
        assert (first[:n_passes] != PAD).all(), "PAD as a first token"
        assert (first[n_passes:] == PAD).all()
        if pipo:
            assert res["n_commits"][r] == (out[1::2] != PAD).sum()
            assert res["n_drafts"][r] >= res["n_commits"][r]
            assert (out[2 * n_passes:] == PAD).all()
        else:
            assert n_passes == len(real)


@jax.jit
def _logits(params, h):
    return PipoLM(CFG).apply({"params": params}, h, method=PipoLM.logits)


@jax.jit
def _prompt_logits(params, tokens, valid):
    """Backbone logits at every prompt latent (the prefill's hidden states)."""
    _, h_all, _, _ = PipoLM(CFG).apply({"params": params}, tokens, valid, 16, False,
                                       method=PipoLM.prefill)
    return PipoLM(CFG).apply({"params": params}, h_all, method=PipoLM.logits)


@functools.partial(jax.jit, static_argnames="slots")
def _replay_prefill(params, tokens, valid, token1, slots):
    """Prefill pieces forced to the emitted ``token1`` → (backbone logits, MTP logits, conf
    logit, cache, positions) at the last prompt latent."""
    model, variables = PipoLM(CFG), {"params": params}
    logits, h_all, cache, pos = model.apply(variables, tokens, valid, slots, True,
                                            method=PipoLM.prefill)
    tok1 = jnp.concatenate([tokens[:, 2::2], token1[:, None]], axis=1)
    mtp_logits, conf, cache = model.apply(variables, h_all, tok1, valid, cache,
                                          method=PipoLM.prefill_mtp)
    return logits, mtp_logits, conf, cache, pos


@jax.jit
def _replay_step(params, cache, pos, pair, token1, active):
    """One decode step forced to the emitted previous pair and ``token1``."""
    model, variables = PipoLM(CFG), {"params": params}
    logits, h, cache = model.apply(variables, pair, pos, cache, method=PipoLM.step)
    mtp_logits, conf, cache = model.apply(variables, h, token1, pos, cache,
                                          method=PipoLM.step_mtp)
    return logits, mtp_logits, conf, cache.next_slot(active), pos + 1


def manual_gate_check(params, prompts, res, threshold, eos=EOS, drafted=True) -> dict:
    """Replays the decode step by step, forced to the tokens the decoder emitted, and checks
    token1 = argmax without PAD, and token2 = draft iff sigmoid(conf) >= threshold (else PAD),
    with no draft after an EOS token1 or once the budget is full (``drafted=False``: no draft
    at all, token2 always PAD)."""
    tokens, valid = _prompts(prompts)
    out, n_passes = res["out"], res["n_passes"]
    counts = {"committed": 0, "rejected": 0, "drafts": np.zeros(len(prompts), int)}

    def check(s, lg_h, lg_m, conf_logit):
        lg_h = np.array(lg_h)
        lg_h[:, PAD] = -np.inf
        lg_m = np.asarray(lg_m)
        conf = np.asarray(jax.nn.sigmoid(conf_logit))
        for r in range(len(prompts)):
            if s >= n_passes[r]:
                continue
            t1 = out[r, 2 * s]
            assert t1 == np.argmax(lg_h[r]), (r, s)
            draft = int(np.argmax(lg_m[r]))
            draft_ok = t1 != eos and (out[r, :2 * s] != PAD).sum() + 1 < BUDGET
            draft_ok = draft_ok and drafted
            counts["drafts"][r] += draft_ok
            if drafted and abs(conf[r] - threshold) < 1e-5:
                continue  # too close to call in float32
            want = draft if draft_ok and conf[r] >= threshold else PAD
            assert out[r, 2 * s + 1] == want, (r, s, conf[r], draft)
            if draft_ok and draft != PAD:
                counts["committed" if conf[r] >= threshold else "rejected"] += 1

    lg_h, lg_m, conf, cache, pos = _replay_prefill(params, tokens, valid, out[:, 0],
                                                   slots=tokens.shape[1] // 2 + BUDGET)
    check(0, lg_h, lg_m, conf)
    for s in range(1, int(n_passes.max())):
        lg_h, lg_m, conf, cache, pos = _replay_step(params, cache, pos, out[:, 2 * s - 2:2 * s],
                                                    out[:, 2 * s], s < n_passes)
        check(s, lg_h, lg_m, conf)
    np.testing.assert_array_equal(counts["drafts"], res["n_drafts"])
    return counts


# ------------------------------------------------------------------------------------- tests


def test_accept_pair():
    conf = jnp.asarray([0.2, 0.5, 0.4999, 0.9, 0.0, 1.0], jnp.float32)
    tok = jnp.asarray([5, 6, 7, 8, 9, 10], jnp.int32)
    acc = jax.jit(dec.accept_pair, static_argnames="pad_id")
    cases = {0.5: [PAD, 6, PAD, 8, PAD, 10], -1.0: [5, 6, 7, 8, 9, 10],
             0.0: [5, 6, 7, 8, 9, 10], 0.95: [PAD, PAD, PAD, PAD, PAD, 10],
             0.9: [PAD, PAD, PAD, 8, PAD, 10]}
    for thr, want in cases.items():
        got = acc(conf, tok, jnp.float32(thr), pad_id=PAD)
        chex.assert_shape(got, (6,))
        chex.assert_type(got, jnp.int32)
        np.testing.assert_array_equal(got, want, err_msg=str(thr))


def test_accept_pair_threshold_one_never_commits():
    got = dec.accept_pair(jax.nn.sigmoid(jnp.asarray([20.0])), jnp.asarray([7], jnp.int32),
                          jnp.float32(1.0), PAD)
    np.testing.assert_array_equal(got, [PAD])


def test_threshold_minus_one_commits_every_draft(params):
    res = pipo_decode(params, PROMPTS, -1.0)
    check_invariants(res, EOS)
    np.testing.assert_array_equal(res["n_commits"], res["n_drafts"])
    assert (res["n_drafts"] > 0).all()
    for r in range(len(PROMPTS)):
        n = res["n_tokens"][r]
        assert n == BUDGET
        assert (res["out"][r, :n] != PAD).all() and (res["out"][r, n:] == PAD).all()
        assert res["n_passes"][r] == BUDGET // 2  # two tokens per backbone pass
    counts = manual_gate_check(params, PROMPTS, res, -1.0)
    assert counts["rejected"] == 0 and counts["committed"] == res["n_commits"].sum()


def test_threshold_half_matches_manual_gate(params):
    res = pipo_decode(params, PROMPTS, 0.5)
    check_invariants(res, EOS)
    counts = manual_gate_check(params, PROMPTS, res, 0.5)
    # Non-vacuous: the gate both committed and rejected drafts in this run.
    assert counts["committed"] > 0 and counts["rejected"] > 0, counts
    assert counts["committed"] == res["n_commits"].sum()


_forward = jax.jit(lambda p, t: PipoLM(CFG, True).apply({"params": p}, t))


@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_decode_with_rejections_matches_teacher_forced_forward(params, threshold):
    """The decoder's output after rejections is a *shifted* pair sequence (``(x, PAD)``, then
    real pairs one token later); the teacher-forced forward on that emitted sequence must
    reproduce every decision: token1 = backbone argmax at the latent before it, the draft =
    MTP argmax there, committed iff ``sigmoid(confidence) >= threshold`` — and the step-by-step
    logits must equal the forward's (fp32), (x, PAD) latents included."""
    res = pipo_decode(params, PROMPTS, threshold)
    check_invariants(res, EOS)
    after_rejection = 0
    for r, prompt in enumerate(PROMPTS):
        n = int(res["n_passes"][r])
        out = res["out"][r, :2 * n]
        seq = np.asarray(list(parity_pad(prompt, PAD)) + out.tolist(), np.int32)
        l0 = len(parity_pad(prompt, PAD)) // 2
        ref = _forward(params, jnp.asarray(seq)[None])
        lg_h = np.array(_logits(params, ref["h"]))[0]
        lg_m = np.asarray(_logits(params, ref["m"]))[0]
        conf = np.asarray(jax.nn.sigmoid(ref["conf_logits"]))[0]
        lg_h[:, PAD] = -np.inf
        # Step-by-step replay of this row alone, forced to its emitted tokens.
        tokens, valid = _prompts([prompt])
        rh, rm, rc, cache, pos = _replay_prefill(params, tokens, valid, out[None, 0],
                                                 slots=tokens.shape[1] // 2 + BUDGET)
        tol = dict(rtol=1e-4, atol=1e-4)
        for s in range(n):
            i = l0 - 1 + s  # the latent whose backbone state emits pass s
            if s:
                prev = out[None, 2 * s - 2:2 * s]
                rh, rm, rc, cache, pos = _replay_step(params, cache, pos, prev, out[None, 2 * s],
                                                      jnp.ones((1,), bool))
            np.testing.assert_allclose(np.asarray(rh)[0], np.asarray(
                _logits(params, ref["h"]))[0, i], **tol)
            assert out[2 * s] == np.argmax(lg_h[i]), (r, s)
            if threshold < 1.0 and i < len(lg_m):
                np.testing.assert_allclose(np.asarray(rm)[0], lg_m[i], **tol)
                np.testing.assert_allclose(np.asarray(jax.nn.sigmoid(rc))[0], conf[i], **tol)
                last = (out[:2 * s] != PAD).sum() + 1 >= BUDGET
                if abs(conf[i] - threshold) > 1e-5 and not last:
                    want = int(np.argmax(lg_m[i])) if conf[i] >= threshold else PAD
                    assert out[2 * s + 1] == want, (r, s)
            after_rejection += int(s > 0 and out[2 * s - 1] == PAD)
    # Non-vacuous: decoding ran on from (x, PAD) latents.
    assert after_rejection > 0


def _with_nan_heads(params):
    nan = lambda t: jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), t)
    return {**params, "mtp_head": nan(params["mtp_head"]),
            "confidence_head": nan(params["confidence_head"])}


def test_threshold_one_commits_none_and_skips_mtp(params):
    res = pipo_decode(params, PROMPTS, 1.0)
    check_invariants(res, EOS)
    assert (res["out"][:, 1::2] == PAD).all()
    assert (res["n_drafts"] == 0).all() and (res["n_commits"] == 0).all()
    np.testing.assert_array_equal(res["n_passes"], [BUDGET, BUDGET])
    # The first tokens are the greedy backbone chain (the same manual replay, with no drafts).
    manual_gate_check(params, PROMPTS, res, 1.0, drafted=False)
    # NaN MTP and confidence heads change nothing: they are never evaluated ...
    res_nan = pipo_decode(_with_nan_heads(params), PROMPTS, 1.0)
    for k in res:
        np.testing.assert_array_equal(res_nan[k], res[k], err_msg=k)
    # ... whereas running them (any threshold < 1) would: NaN confidences commit nothing.
    assert pipo_decode(params, PROMPTS, -1.0)["n_commits"].sum() > 0
    assert pipo_decode(_with_nan_heads(params), PROMPTS, -1.0)["n_commits"].sum() == 0


def _used_leaves(params, use_mtp) -> tuple[set[str], int]:
    """Which parameter leaves one decode step's jaxpr reads, and its equation count."""
    tokens, valid = _prompts(PROMPTS)
    spec = dec.DecodeSpec(CFG, True, SP, BUDGET, PAD, EOS, draft=use_mtp)
    state = _decoder(spec).prefill(params, tokens, valid, sampling.request_keys([0, 1]),
                                   jnp.float32(0.5))
    step = functools.partial(dec.step, spec=spec)
    closed = jax.make_jaxpr(lambda p, s: step(p, s, jnp.float32(0.5)))(params, state)
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    invars = closed.jaxpr.invars[:len(paths)]
    read = {id(v) for eqn in closed.jaxpr.eqns for v in eqn.invars}
    read |= {id(v) for v in closed.jaxpr.outvars}
    return {p for p, v in zip(paths, invars, strict=True) if id(v) in read}, len(closed.jaxpr.eqns)


def test_threshold_one_step_program_has_no_mtp(params):
    used_off, n_off = _used_leaves(params, use_mtp=False)
    used_on, n_on = _used_leaves(params, use_mtp=True)
    heads = ("['mtp_head']", "['confidence_head']")
    assert not [p for p in used_off if p.startswith(heads)], used_off
    assert any(p.startswith("['mtp_head']") for p in used_on)
    assert any(p.startswith("['confidence_head']") for p in used_on)
    assert n_off < n_on


def test_token1_is_never_pad(params):
    p = steered(params, PAD)
    # Non-vacuous: unmasked, every prompt position's argmax is PAD.
    assert (np.argmax(np.asarray(_prompt_logits(p, *_prompts(PROMPTS))), -1) == PAD).all()
    res = pipo_decode(p, PROMPTS, -1.0)
    check_invariants(res, EOS)
    assert (res["out"][:, 0::2][res["out"][:, 0::2] != PAD].size
            == res["n_passes"].sum())
    manual_gate_check(p, PROMPTS, res, -1.0)
    ar = ar_decode(p, PROMPTS)
    check_invariants(ar, EOS, pipo=False)
    assert (ar["out"] != PAD).all()


def _swap_in_eos(params, stream: list[int]) -> tuple[dict, int]:
    """Makes EOS take the place of a token ``x`` that first appears mid-``stream`` (not in a
    prompt): swapping the embedding rows of ``x`` and EOS (tied with the LM head) permutes the
    logits of the two, so until ``x`` first shows up nothing changes, and there EOS is emitted
    instead. Returns (swapped params, x)."""
    in_prompts = {t for p in PROMPTS for t in p}
    for i, x in enumerate(stream):
        if i >= 3 and x not in stream[:i] and x not in in_prompts:
            emb = params["embedder"]["embedding"]
            emb = emb.at[EOS].set(emb[x]).at[x].set(0.0)
            return {**params, "embedder": {"embedding": emb}}, x
    raise AssertionError(f"no suitable token in {stream}: pick another seed")


def _truncated_at(out_row: np.ndarray, x: int) -> np.ndarray:
    """What the decoder must emit when EOS replaces ``x``: unchanged up to the first ``x``, EOS
    there, PAD after."""
    hits = np.flatnonzero(out_row == x)
    if not hits.size:
        return out_row
    want = np.full_like(out_row, PAD)
    want[:hits[0]] = out_row[:hits[0]]
    want[hits[0]] = EOS
    return want


def test_eos_stops_a_row_mid_sequence(params):
    res_free, ar_free = pipo_decode(params, PROMPTS, 0.5), ar_decode(params, PROMPTS)
    swapped, x = _swap_in_eos(params, [int(t) for t in res_free["out"][0] if t != PAD])
    res = pipo_decode(swapped, PROMPTS, 0.5)
    check_invariants(res, EOS)
    swapped_ar, x_ar = _swap_in_eos(params, ar_free["out"][0].tolist())
    ar = ar_decode(swapped_ar, PROMPTS)
    check_invariants(ar, EOS, pipo=False)
    for r in range(len(PROMPTS)):
        np.testing.assert_array_equal(res["out"][r], _truncated_at(res_free["out"][r], x))
        np.testing.assert_array_equal(ar["out"][r], _truncated_at(ar_free["out"][r], x_ar))
    # Row 0 really stopped mid-sequence, and PAD never counted.
    assert 3 < res["n_tokens"][0] < BUDGET and 3 < ar["n_tokens"][0] < BUDGET
    assert res["n_tokens"][0] == (res["out"][0] != PAD).sum()


def test_eos_argmax_stops_after_one_token(params):
    p = steered(params, EOS)
    res = pipo_decode(p, PROMPTS, -1.0)
    check_invariants(res, EOS)
    assert (res["out"][:, 0] == EOS).all() and (res["out"][:, 1:] == PAD).all()
    np.testing.assert_array_equal(res["n_tokens"], [1, 1])
    np.testing.assert_array_equal(res["n_passes"], [1, 1])
    np.testing.assert_array_equal(res["n_drafts"], [0, 0])  # no draft after an EOS token1
    ar = ar_decode(p, PROMPTS)
    assert (ar["out"][:, 0] == EOS).all() and (ar["out"][:, 1:] == PAD).all()
    np.testing.assert_array_equal(ar["n_tokens"], [1, 1])


def test_ar_decode_is_greedy_teacher_forced_chain(params):
    res = ar_decode(params, PROMPTS)
    check_invariants(res, EOS, pipo=False)
    np.testing.assert_array_equal(res["n_tokens"], [BUDGET, BUDGET])
    # Each row alone, without left padding, through the teacher-forced AR forward.
    length = max(len(p) for p in PROMPTS) + BUDGET
    seqs = np.ones((len(PROMPTS), length), np.int32)  # right fill: causal, never read
    for r, prompt in enumerate(PROMPTS):
        seqs[r, :len(prompt) + BUDGET] = list(prompt) + res["out"][r].tolist()
    fwd = jax.jit(lambda p, t: PipoLM(CFG, False).apply(
        {"params": p}, PipoLM(CFG, False).apply({"params": p}, t)["h"], method=PipoLM.logits))
    logits = np.array(fwd(ar_of(params), jnp.asarray(seqs)))
    logits[..., PAD] = -np.inf
    for r, prompt in enumerate(PROMPTS):
        pred = np.argmax(logits[r, len(prompt) - 1:len(prompt) - 1 + BUDGET], -1)
        np.testing.assert_array_equal(res["out"][r], pred)


def test_left_padded_batch_matches_each_prompt_alone(params):
    """Row 0 is left-padded by 4 in the batch; alone, each prompt runs without left padding
    (beside an identical copy of itself, which keeps the batch shape of the other runs)."""
    batch = pipo_decode(params, PROMPTS, 0.5, seeds=[10, 11])
    assert _prompts(PROMPTS)[0].shape == (2, 8)
    assert _prompts(PROMPTS[:1])[0].shape == (1, 4)
    for r, prompt in enumerate(PROMPTS):
        alone = pipo_decode(params, [prompt, prompt], 0.5, seeds=[10 + r, 10 + r])
        for k in batch:
            np.testing.assert_array_equal(batch[k][r], alone[k][0], err_msg=f"{k} row {r}")
            np.testing.assert_array_equal(alone[k][1], alone[k][0], err_msg=k)

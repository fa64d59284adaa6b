"""On-policy distillation maths (SPEC §5): rollout rows, PAD compaction, divergences, the loss.

Everything here is a pure function of arrays, jit-compiled by the OPD stage (``train/opd.py``).

Shapes: ``B`` rollouts, ``T`` tokens of a rollout row (prompt + response, PAD-padded), ``L = T/2``
pairs, ``N`` positions, ``V`` vocabulary, ``H``/``Ht`` student/teacher hidden sizes.

Alignment (SPEC §2, PAPER §2.7): student backbone position ``i`` predicts ``t_{2i+2}`` and is
compared with the teacher's output at token position ``2i+1``; MTP position ``i`` predicts
``t_{2i+3}`` and reads the teacher at ``2i+2``. The teacher runs on the PAD-free (compacted) row;
a PAD position reads the teacher's output at the last real token before it.
"""

from __future__ import annotations

import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax

from pipo_jax.train.calibration import auroc, brier_score, expected_calibration_error
from pipo_jax.train.losses import masked_mean

Array = jax.Array
Divergence = Literal["topk", "full", "sampled"]

OPD_COMMIT_THRESHOLDS = (0.5, 0.7, 0.9, 0.95)
# Stands in for -inf on duplicate top-k union entries: finite, so that 0 · (log p_s - log p_t)
# stays 0 in the backward pass instead of NaN.
_EXCLUDED = -1e9


# ---------------------------------------------------------------------------- rollout rows


def rollout_rows(prompt_BxP: Array, valid_BxP: Array, out_BxN: Array, n_passes_B: Array,
                 pad_id: int) -> tuple[Array, Array, Array]:
    """Decode output → teacher-forced rows ``(tokens B×T, prompt_len B, seq_len B)``, ``T = P+N``.

    ``prompt_BxP`` is the left-padded (parity-padded, even) prompt batch the decoder saw and
    ``out_BxN`` its pairs. Each row is shifted left so that its prompt starts at position 0 (the
    training forward has no left padding); ``seq_len`` counts the prompt and every pair the row
    emitted (one per backbone pass) and is even. Positions from ``seq_len`` on hold PAD.
    """
    full = jnp.concatenate([prompt_BxP, out_BxN], axis=1)
    width = full.shape[1]
    prompt_len = jnp.sum(valid_BxP, axis=1, dtype=jnp.int32)
    src = jnp.arange(width)[None] + (prompt_BxP.shape[1] - prompt_len)[:, None]
    tokens = jnp.where(src < width,
                       jnp.take_along_axis(full, jnp.minimum(src, width - 1), axis=1), pad_id)
    return tokens, prompt_len, prompt_len + 2 * n_passes_B


def target_masks(tokens_BxT: Array, prompt_len_B: Array, seq_len_B: Array, pad_id: int,
                 eos_id: int, pad_fill: Literal["argmax", "mask"]) -> dict[str, Array]:
    """Which positions a rollout row trains, and where the MTP label is the student's argmax.

    Returns ``backbone`` B×(L-1) (targets ``t_{2i+2}`` in the response), ``mtp`` B×(L-1)
    (targets ``t_{2i+3}`` the student drafted) and ``fill`` B×(L-1) (MTP targets that are PAD:
    a rejected draft, or a drafted PAD). No draft exists after an EOS ``token1`` or, in a row's
    last pair, when the budget ran out (then ``token2`` is PAD and the row ended without EOS).
    """
    t = tokens_BxT.shape[1]
    j_bb = 2 * jnp.arange(t // 2 - 1) + 2
    j_mtp = j_bb + 1

    def in_response(j: Array) -> Array:
        return (j[None] >= prompt_len_B[:, None]) & (j[None] < seq_len_B[:, None])

    y_mtp = tokens_BxT[:, 3::2]
    fill = y_mtp == pad_id
    last_pair = j_mtp[None] == seq_len_B[:, None] - 1
    drafted = (tokens_BxT[:, 2::2] != eos_id) & (~last_pair | ~fill)
    mtp = in_response(j_mtp) & drafted
    if pad_fill == "mask":
        mtp = mtp & ~fill
    return {"backbone": in_response(j_bb), "mtp": mtp, "fill": fill & mtp}


# --------------------------------------------------------------------------- PAD compaction


def compaction_index(tokens_BxT: Array, pad_id: int) -> tuple[Array, Array]:
    """``(keep B×T, index B×T)``: whether a token is real, and the compacted position each
    original position reads (its own for a real token; the last real token before it for a PAD).
    """
    keep = tokens_BxT != pad_id
    index = jnp.maximum(jnp.cumsum(keep, axis=1, dtype=jnp.int32) - 1, 0)
    return keep, index


def compact(tokens_BxT: Array, pad_id: int) -> Array:
    """Removes every PAD: the real tokens of each row, in order, then PAD to width ``T``."""
    b, t = tokens_BxT.shape
    keep, index = compaction_index(tokens_BxT, pad_id)
    dest = jnp.where(keep, index, t)  # PADs land in a spill column that is cut off
    out = jnp.full((b, t + 1), pad_id, tokens_BxT.dtype)
    return out.at[jnp.arange(b)[:, None], dest].set(tokens_BxT)[:, :t]


def expand(compacted_BxTx: Array, index_BxT: Array) -> Array:
    """Maps per-position outputs of the compacted row back to the original positions."""
    idx = index_BxT.reshape(index_BxT.shape + (1,) * (compacted_BxTx.ndim - 2))
    return jnp.take_along_axis(compacted_BxTx, idx, axis=1)


# ------------------------------------------------------------------------------ divergences


def divergence_terms(zs_NxV: Array, zt_NxV: Array, labels_N: Array, fill_N: Array,
                     mode: Divergence, k: int) -> dict[str, Array]:
    """Per-position distillation terms from student and teacher logits (float32).

    ``labels_N`` are the rollout tokens; where ``fill_N`` they are replaced by the student's
    argmax. Returns (each ``[N]``):

    * ``objective``: what the loss minimises (differentiable in ``zs``). ``topk``: reverse KL on
      the union of the label, student top-k and teacher top-k, both renormalised on it (duplicate
      indices counted once). ``full``: exact reverse KL. ``sampled``: the policy-gradient
      surrogate ``sg(r)·log p_s(y)`` with ``r = log p_s(y) - log p_t(y)``, shifted so that its
      value is ``r`` (an unbiased estimate of the KL under ``y ~ p_s``) while its gradient
      ``r·∇log p_s(y)`` is unbiased for ``∇ KL`` (the plain ``r`` has zero-mean gradient).
    * ``kl``: exact full-vocabulary reverse KL (a metric, detached).
    * ``acceptance``: the confidence target, detached: ``min(1, p_t(y)/p_s(y))`` (on the union's
      renormalised probabilities for ``topk``), or ``1 - TV = Σ min(p_s, p_t)`` for ``full``;
      where ``fill_N`` (no committed draft), ``1 - TV`` in every mode.
    * ``teacher_logprob``: ``log p_t(y)`` of the label under the full-vocabulary teacher,
      detached (``p_t(y)`` is the probability that a teacher sample equals the draft; evaluation
      only, see ``distill.rollout_statistics``).
    * ``labels``: the labels used.
    """
    zs = zs_NxV.astype(jnp.float32)
    zt = jax.lax.stop_gradient(zt_NxV.astype(jnp.float32))
    ls, lt = jax.nn.log_softmax(zs), jax.nn.log_softmax(zt)
    y = jnp.where(fill_N, jnp.argmax(zs, axis=-1).astype(labels_N.dtype), labels_N)
    ps = jnp.exp(ls)
    kl = jnp.sum(ps * (ls - lt), axis=-1)

    def pick(a: Array, i: Array) -> Array:
        return jnp.take_along_axis(a, i[:, None], axis=-1)[:, 0]

    if mode == "full":
        acceptance = jnp.sum(jnp.minimum(ps, jnp.exp(lt)), axis=-1)
        objective = kl
    elif mode == "topk":
        kk = min(k, zs.shape[-1])
        idx = jnp.concatenate([y[:, None], jax.lax.top_k(zs, kk)[1], jax.lax.top_k(zt, kk)[1]],
                              axis=1)
        u = idx.shape[1]
        earlier = jnp.tril(jnp.ones((u, u), bool), -1)  # [c, c']: c' comes before c
        dup = jnp.any((idx[:, :, None] == idx[:, None, :]) & earlier[None], axis=-1)
        lsu = jax.nn.log_softmax(jnp.where(dup, _EXCLUDED, jnp.take_along_axis(zs, idx, -1)))
        ltu = jax.nn.log_softmax(jnp.where(dup, _EXCLUDED, jnp.take_along_axis(zt, idx, -1)))
        objective = jnp.sum(jnp.where(dup, 0.0, jnp.exp(lsu) * (lsu - ltu)), axis=-1)
        # The label is column 0, so it is never the duplicate.
        acceptance = jnp.exp(-jnp.maximum(0.0, lsu[:, 0] - ltu[:, 0]))
    elif mode == "sampled":
        ls_y = pick(ls, y)
        r = jax.lax.stop_gradient(ls_y - pick(lt, y))
        surrogate = r * ls_y
        objective = surrogate - jax.lax.stop_gradient(surrogate) + r
        acceptance = jnp.exp(-jnp.maximum(0.0, r))
    else:
        raise ValueError(f"unknown divergence {mode!r}; use topk, full or sampled")
    # A filled position had no committed draft to score (rejected, or PAD drafted): its target
    # is the expected acceptance of a draft y ~ p_s, 1 - TV. α at the student's argmax scores
    # one token the sampler may never have drafted, a biased target exactly where gating acts.
    expected = jnp.sum(jnp.minimum(ps, jnp.exp(lt)), axis=-1)
    acceptance = jnp.where(fill_N, expected, acceptance)
    return {"objective": objective, "kl": jax.lax.stop_gradient(kl),
            "acceptance": jax.lax.stop_gradient(acceptance), "teacher_logprob": pick(lt, y),
            "labels": y}


def _full_terms_by_vocab(h_CxH: Array, ws_VxH: Array, ht_CxHt: Array, wt_VxHt: Array,
                        labels_C: Array, fill_C: Array, vocab_chunk: int) -> dict[str, Array]:
    """``divergence_terms(mode="full")`` with the logits made ``vocab_chunk`` columns at a time:
    two scans over vocabulary blocks (log-normalisers and the student's argmax, then the KL,
    ``Σ min(p_s, p_t)`` and the teacher's log-probability of the label), so the peak is
    ``C × vocab_chunk`` instead of ``C × V``."""
    v = ws_VxH.shape[0]
    n_blocks = -(-v // vocab_chunk)
    pad = n_blocks * vocab_chunk - v

    def blocks(w: Array) -> Array:
        return jnp.pad(w, ((0, pad), (0, 0))).reshape(n_blocks, vocab_chunk, w.shape[1])

    ws_b, wt_b = blocks(ws_VxH), blocks(wt_VxHt)
    ids_b = jnp.arange(n_blocks * vocab_chunk).reshape(n_blocks, vocab_chunk)

    def logits(x: Array, w: Array, ids: Array) -> Array:
        z = jnp.einsum("ch,vh->cv", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
        return jnp.where(ids[None] < v, z, -jnp.inf)

    def online_lse(m: Array, s: Array, z: Array) -> tuple[Array, Array]:
        new = jnp.maximum(m, jnp.max(z, axis=-1))
        return new, s * jnp.exp(m - new) + jnp.sum(jnp.exp(z - new[:, None]), axis=-1)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def normalisers(carry: tuple[Array, ...], blk: tuple[Array, ...]) -> tuple[tuple, None]:
        ms, ss, mt, st, best, arg = carry
        w_s, w_t, ids = blk
        zs = logits(h_CxH, w_s, ids)
        zt = jax.lax.stop_gradient(logits(ht_CxHt, w_t, ids))
        ms, ss = online_lse(ms, ss, zs)
        mt, st = online_lse(mt, st, zt)
        top = jnp.max(zs, axis=-1)
        arg = jnp.where(top > best, ids[jnp.argmax(zs, axis=-1)], arg)
        return (ms, ss, mt, st, jnp.maximum(best, top), arg), None

    c = h_CxH.shape[0]
    lowest = jnp.full((c,), -1e30, jnp.float32)  # finite: exp(lowest - m) is 0, never NaN
    zeros = jnp.zeros((c,), jnp.float32)
    init = (lowest, zeros, lowest, zeros, lowest, jnp.zeros((c,), jnp.int32))
    (ms, ss, mt, st, _, arg), _ = jax.lax.scan(normalisers, init, (ws_b, wt_b, ids_b))
    log_zs, log_zt = ms + jnp.log(ss), mt + jnp.log(st)
    y = jnp.where(fill_C, arg.astype(labels_C.dtype), labels_C)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def sums(carry: tuple[Array, ...], blk: tuple[Array, ...]) -> tuple[tuple, None]:
        kl, overlap, lt_y = carry
        w_s, w_t, ids = blk
        valid = ids[None] < v
        ls = logits(h_CxH, w_s, ids) - log_zs[:, None]
        lt = jax.lax.stop_gradient(logits(ht_CxHt, w_t, ids)) - log_zt[:, None]
        ps = jnp.exp(ls)
        kl = kl + jnp.sum(jnp.where(valid, ps * (jnp.where(valid, ls, 0) - jnp.where(valid, lt, 0)),
                                    0.0), axis=-1)
        overlap = overlap + jnp.sum(jnp.where(valid, jnp.minimum(ps, jnp.exp(lt)), 0.0), axis=-1)
        lt_y = lt_y + jnp.sum(jnp.where(ids[None] == y[:, None], lt, 0.0), axis=-1)
        return (kl, overlap, lt_y), None

    (kl, overlap, lt_y), _ = jax.lax.scan(sums, (zeros, zeros, zeros), (ws_b, wt_b, ids_b))
    return {"objective": kl, "kl": jax.lax.stop_gradient(kl),
            "acceptance": jax.lax.stop_gradient(overlap), "teacher_logprob": lt_y, "labels": y}


def chunked_divergence(hs_NxH: Array, ws_VxH: Array, ht_NxHt: Array, wt_VxHt: Array,
                       labels_N: Array, fill_N: Array, mode: Divergence, k: int,
                       chunk: int, vocab_chunk: int = 0) -> dict[str, Array]:
    """``divergence_terms`` over chunks of ``chunk`` positions, logits ``h·Wᵀ`` made per chunk
    under ``jax.checkpoint`` (peak memory ``chunk × V`` per model, as the SFT loss). With
    ``mode="full"`` and ``0 < vocab_chunk < V`` the vocabulary is chunked too (peak
    ``chunk × vocab_chunk``; see ``_full_terms_by_vocab``)."""
    n = hs_NxH.shape[0]
    chunk = min(chunk, n)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    by_vocab = mode == "full" and 0 < vocab_chunk < ws_VxH.shape[0]

    def split(x: Array) -> Array:
        x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
        return x.reshape((n_chunks, chunk) + x.shape[1:])

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one(args: tuple[Array, ...]) -> dict[str, Array]:
        h_c, ht_c, y_c, f_c = args
        if by_vocab:
            return _full_terms_by_vocab(h_c, ws_VxH, ht_c, wt_VxHt, y_c, f_c, vocab_chunk)
        zs = jnp.einsum("ch,vh->cv", h_c, ws_VxH.astype(h_c.dtype),
                        preferred_element_type=jnp.float32)
        zt = jnp.einsum("ch,vh->cv", ht_c, wt_VxHt.astype(ht_c.dtype),
                        preferred_element_type=jnp.float32)
        return divergence_terms(zs, zt, y_c, f_c, mode, k)

    out = jax.lax.map(one, tuple(split(x) for x in (hs_NxH, ht_NxHt, labels_N, fill_N)))
    return {name: v.reshape(-1)[:n] for name, v in out.items()}


# --------------------------------------------------------------------------------- the loss


def opd_loss(outputs: dict[str, Array], ws_VxH: Array, teacher: dict[str, Array],
             wt_VxHt: Array, tokens_BxT: Array, masks: dict[str, Array], *, mode: Divergence,
             k: int, chunk: int, w_backbone: float, w_mtp: float, w_conf: float,
             ece_bins: int, vocab_chunk: int = 0, totals: dict[str, Array] | None = None,
             per_row: bool = False) -> tuple[Array, Any]:
    """``w_backbone·D_backbone + w_mtp·D_mtp + w_conf·BCE(confidence, acceptance)`` (SPEC §5).

    For one micro-batch of a step (gradient accumulation): ``totals`` holds the whole batch's
    ``backbone`` and ``mtp`` target counts (the means' denominators, so that the micro-batches'
    values add up to the batch's), and ``per_row`` leaves the calibration metrics, which are not
    sums over rows, out of the metrics and returns ``(loss, (metrics, rows))`` with what they
    need per row (``calibration_rows``) instead.

    ``outputs`` is the student's teacher-forced forward (``h``, ``m``, ``conf_logits``, each over
    ``L-1`` positions); ``teacher`` holds the teacher's hidden states aligned to them
    (``backbone``, ``mtp``: B×(L-1)×Ht); ``masks`` comes from ``target_masks``.

    Confidence metrics, at MTP positions: ``ece`` (``ece_bins`` bins) and ``brier`` (mean squared
    error) of the head's probability against the target ``α``, and ``auroc`` of the head against
    the binary label ``α ≥ 0.5`` (NaN in a step without both classes, see
    ``calibration.auroc``). ``α`` is the divergence's ``acceptance`` (``1 − TV`` for ``full``).
    """
    b, n, _ = outputs["h"].shape

    def terms(hidden: Array, t_hidden: Array, labels: Array, fill: Array) -> dict[str, Array]:
        out = chunked_divergence(hidden.reshape(b * n, -1), ws_VxH,
                                 t_hidden.reshape(b * n, -1), wt_VxHt, labels.reshape(-1),
                                 fill.reshape(-1), mode, k, chunk, vocab_chunk)
        return {name: v.reshape(b, n) for name, v in out.items()}

    no_fill = jnp.zeros_like(masks["backbone"])
    bb = terms(outputs["h"], teacher["backbone"], tokens_BxT[:, 2::2], no_fill)
    mtp = terms(outputs["m"], teacher["mtp"], tokens_BxT[:, 3::2], masks["fill"])
    m_bb, m_mtp = masks["backbone"], masks["mtp"]
    t_bb, t_mtp = (None, None) if totals is None else (totals["backbone"], totals["mtp"])

    def mean_bb(x: Array) -> Array:
        return masked_mean(x, m_bb, "token", t_bb)

    def mean_mtp(x: Array) -> Array:
        return masked_mean(x, m_mtp, "token", t_mtp)

    d_bb, d_mtp = mean_bb(bb["objective"]), mean_mtp(mtp["objective"])
    target = mtp["acceptance"]
    z = outputs["conf_logits"]
    bce = mean_mtp(optax.sigmoid_binary_cross_entropy(z, target))
    loss = w_backbone * d_bb + w_mtp * d_mtp + w_conf * bce
    pred = jax.nn.sigmoid(z)
    metrics = {
        "loss": loss, "loss_backbone": d_bb, "loss_mtp": d_mtp, "loss_confidence": bce,
        "kl_backbone": mean_bb(bb["kl"]), "kl_mtp": mean_mtp(mtp["kl"]),
        "confidence_pred_mean": mean_mtp(pred),
        "confidence_target_mean": mean_mtp(target),
        "mtp_pad_filled": jnp.sum(masks["fill"]),
        "target_tokens": jnp.sum(m_bb) + jnp.sum(m_mtp),
    }
    for thr in OPD_COMMIT_THRESHOLDS:
        metrics[f"commit_rate@{thr}"] = mean_mtp(pred >= thr)
    rows = {"conf_logits": jax.lax.stop_gradient(z), "target": target, "mask": m_mtp}
    if per_row:
        return loss, (metrics, rows)
    return loss, {**metrics, **calibration_metrics(rows, ece_bins)}


def calibration_metrics(rows: dict[str, Array], ece_bins: int) -> dict[str, Array]:
    """ECE, Brier and AUROC of the confidence head at MTP positions, from ``rows``
    (``conf_logits``, ``target``, ``mask``, B×(L-1) each) of a whole batch: none is a sum over
    rows, so an accumulated step computes them once, after its micro-batches."""
    z_N, target_N, m_N = (rows[k].reshape(-1) for k in ("conf_logits", "target", "mask"))
    pred_N = jax.nn.sigmoid(z_N)
    # The AUROC ranks the logits: same value as the sigmoids, without the ties of saturation.
    return {"ece": expected_calibration_error(pred_N, target_N, m_N, ece_bins),
            "brier": brier_score(pred_N, target_N, m_N),
            "auroc": auroc(z_N, target_N >= 0.5, m_N)}

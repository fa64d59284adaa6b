"""Training losses: chunked vocabulary cross-entropy and the SFT / AR objectives (SPEC §4).

The ``N × V`` logits are never materialised at once: the loss runs over chunks of tokens under
``jax.checkpoint``, so the backward pass recomputes each chunk's logits instead of storing them
(peak memory ``chunk × V``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from pipo_jax.config import TrainConfig

Array = jax.Array

COMMIT_THRESHOLDS = (0.5, 0.7, 0.9)


def chunked_token_logprobs(hidden_NxH: Array, embedding_VxH: Array, labels_N: Array,
                           chunk: int) -> tuple[Array, Array]:
    """Log-probability of each label, and whether the argmax hits it, chunk by chunk.

    Returns ``logp_N`` (float32, ``log softmax(h·Eᵀ)[label]``) and ``correct_N`` (bool, argmax
    equals label).
    """
    n, hdim = hidden_NxH.shape
    chunk = min(chunk, n)
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    h = jnp.pad(hidden_NxH, ((0, pad), (0, 0))).reshape(n_chunks, chunk, hdim)
    y = jnp.pad(labels_N, (0, pad)).reshape(n_chunks, chunk)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one(args: tuple[Array, Array]) -> tuple[Array, Array]:
        h_c, y_c = args
        logits = jnp.einsum("ch,vh->cv", h_c, embedding_VxH.astype(h_c.dtype),
                            preferred_element_type=jnp.float32)
        gold = jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0]
        logp = gold - jax.nn.logsumexp(logits, axis=-1)
        return logp, jnp.argmax(logits, axis=-1) == y_c

    logp, correct = jax.lax.map(one, (h, y))
    return logp.reshape(-1)[:n], correct.reshape(-1)[:n]


def masked_mean(x: Array, mask: Array, average: str = "token",
                total: Array | None = None) -> Array:
    """Mean of ``x`` B×N over ``mask``: over every masked token (``token``), or over the rows
    of each row's own token mean (``sample``: every row with a target weighs the same).
    ``total`` is the denominator (``mask_total``) of the whole batch when this is one
    micro-batch of it, so that the micro-batches' values add up to the batch's."""
    mask = mask.astype(jnp.float32)
    if average == "sample":
        n_B = jnp.sum(mask, axis=-1)
        rows = jnp.sum(x * mask, axis=-1) / jnp.maximum(n_B, 1.0)
        return jnp.sum(rows) / (mask_total(mask, average) if total is None else total)
    return jnp.sum(x * mask) / (mask_total(mask, average) if total is None else total)


def mask_total(mask_BxN: Array, average: str = "token") -> Array:
    """``masked_mean``'s denominator: the masked tokens, or the rows with any (at least 1)."""
    mask = mask_BxN.astype(jnp.float32)
    if average == "sample":
        return jnp.maximum(jnp.sum(jnp.sum(mask, axis=-1) > 0), 1.0)
    return jnp.maximum(jnp.sum(mask), 1.0)


def term_masks(objective: str, loss_mask_BxT: Array) -> dict[str, Array]:
    """The target mask of each mean an objective takes: ``ar`` (``h_j`` → ``t_{j+1}``),
    ``mtp`` (``m_j`` → ``t_{j+2}``) or ``sft`` (backbone ``t_{2i+2}``, MTP ``t_{2i+3}``)."""
    if objective == "ar":
        return {"backbone": loss_mask_BxT[:, 1:]}
    if objective == "mtp":
        return {"mtp": loss_mask_BxT[:, 2:]}
    return {"backbone": loss_mask_BxT[:, 2::2], "mtp": loss_mask_BxT[:, 3::2]}


def term_totals(objective: str, loss_mask_BxT: Array, average: str) -> dict[str, Array]:
    """The denominators of an objective's means over the whole batch (gradient accumulation)."""
    return {k: mask_total(m, average) for k, m in term_masks(objective, loss_mask_BxT).items()}


def cross_entropy(hidden_BxNxH: Array, embedding_VxH: Array, labels_BxN: Array,
                  mask_BxN: Array, chunk: int, average: str = "token",
                  total: Array | None = None) -> tuple[Array, Array, Array]:
    """Mean CE over masked targets → (loss, logp B×N, accuracy); ``average`` and ``total`` as
    in ``masked_mean``."""
    b, n, hdim = hidden_BxNxH.shape
    logp, correct = chunked_token_logprobs(hidden_BxNxH.reshape(b * n, hdim), embedding_VxH,
                                           labels_BxN.reshape(-1), chunk)
    logp, correct = logp.reshape(b, n), correct.reshape(b, n)
    return (masked_mean(-logp, mask_BxN, average, total), logp,
            masked_mean(correct, mask_BxN, average, total))


def _total(totals: dict[str, Array] | None, term: str) -> Array | None:
    return None if totals is None else totals[term]


def ar_loss(outputs: dict[str, Array], embedding_VxH: Array, tokens_BxT: Array,
            loss_mask_BxT: Array, tc: TrainConfig,
            totals: dict[str, Array] | None = None) -> tuple[Array, dict[str, Array]]:
    """Next-token CE of the AR baseline: ``h_j`` predicts ``t_{j+1}``. ``totals``
    (``term_totals``): the whole batch's denominators, for one micro-batch of it."""
    loss, _, acc = cross_entropy(outputs["h"], embedding_VxH, tokens_BxT[:, 1:],
                                 loss_mask_BxT[:, 1:], tc.loss_chunk, tc.loss_average,
                                 _total(totals, "backbone"))
    return loss, {"loss": loss, "loss_backbone": loss, "accuracy_backbone": acc,
                  "target_tokens": jnp.sum(loss_mask_BxT[:, 1:])}


def mtp_loss(outputs: dict[str, Array], embedding_VxH: Array, tokens_BxT: Array,
             loss_mask_BxT: Array, tc: TrainConfig,
             totals: dict[str, Array] | None = None) -> tuple[Array, dict[str, Array]]:
    """The MTP drafter's CE: ``m_j`` (from ``h_j`` and ``t_{j+1}``) predicts ``t_{j+2}``."""
    loss, _, acc = cross_entropy(outputs["m"], embedding_VxH, tokens_BxT[:, 2:],
                                 loss_mask_BxT[:, 2:], tc.loss_chunk, tc.loss_average,
                                 _total(totals, "mtp"))
    return loss, {"loss": loss, "loss_mtp": loss, "accuracy_mtp": acc,
                  "target_tokens": jnp.sum(loss_mask_BxT[:, 2:])}


def sft_loss(outputs: dict[str, Array], embedding_VxH: Array, tokens_BxT: Array,
             loss_mask_BxT: Array, tc: TrainConfig,
             totals: dict[str, Array] | None = None) -> tuple[Array, dict[str, Array]]:
    """``CE_backbone + w_mtp · CE_mtp + w_conf · BCE_conf`` (SPEC §4).

    Backbone latent ``i`` targets ``t_{2i+2}``; MTP position ``i`` targets ``t_{2i+3}``. The
    confidence target is the MTP head's own (detached) probability of the gold ``t_{2i+3}``.
    """
    labels_bb, mask_bb = tokens_BxT[:, 2::2], loss_mask_BxT[:, 2::2]
    labels_mtp, mask_mtp = tokens_BxT[:, 3::2], loss_mask_BxT[:, 3::2]
    avg, t_bb, t_mtp = tc.loss_average, _total(totals, "backbone"), _total(totals, "mtp")
    ce_bb, _, acc_bb = cross_entropy(outputs["h"], embedding_VxH, labels_bb, mask_bb,
                                     tc.loss_chunk, avg, t_bb)
    ce_mtp, logp_mtp, acc_mtp = cross_entropy(outputs["m"], embedding_VxH, labels_mtp, mask_mtp,
                                              tc.loss_chunk, avg, t_mtp)
    target = jax.lax.stop_gradient(jnp.exp(logp_mtp))
    z = outputs["conf_logits"]
    bce = masked_mean(optax.sigmoid_binary_cross_entropy(z, target), mask_mtp, avg, t_mtp)
    loss = ce_bb + tc.w_mtp * ce_mtp + tc.w_conf * bce
    pred = jax.nn.sigmoid(z)
    metrics = {
        "loss": loss, "loss_backbone": ce_bb, "loss_mtp": ce_mtp, "loss_confidence": bce,
        "accuracy_backbone": acc_bb, "accuracy_mtp": acc_mtp,
        "confidence_pred_mean": masked_mean(pred, mask_mtp, avg, t_mtp),
        "confidence_target_mean": masked_mean(target, mask_mtp, avg, t_mtp),
        "target_tokens": jnp.sum(mask_bb) + jnp.sum(mask_mtp),
    }
    for thr in COMMIT_THRESHOLDS:
        metrics[f"commit_rate@{thr}"] = masked_mean(pred >= thr, mask_mtp, avg, t_mtp)
    return loss, metrics

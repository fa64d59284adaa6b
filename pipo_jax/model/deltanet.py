"""The gated delta rule of Qwen3.5's Gated DeltaNet layers, in three equivalent forms.

Per batch row and value head, with state ``S`` of shape ``dk × dv``::

    S ← exp(g_t) · S                          # decay
    S ← S + k_t ⊗ β_t (v_t − k_tᵀ S)          # delta-rule write
    o_t = q_tᵀ S                              # read after the write

* ``recurrent_step``: one token (decode).
* ``scan``: a ``lax.scan`` of ``recurrent_step`` over tokens. Simple and exact, but sequential
  in T; it is the reference the other forms are tested and benchmarked against.
* ``chunked``: the chunk-parallel (WY) form used for training and prefill. Within a chunk of
  ``C`` tokens the writes are solved jointly by one unit-lower-triangular system; only the
  chunk-to-chunk state passes through a scan, so memory is linear in T and the sequential depth
  is ``T/C``.

All math is float32. Shapes: ``B`` batch, ``T`` tokens, ``N`` value heads (q/k already repeated
to ``N`` heads), ``K = dk``, ``V = dv``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def recurrent_step(q_BxNxK: Array, k_BxNxK: Array, v_BxNxV: Array, g_BxN: Array,
                   beta_BxN: Array, s_BxNxKxV: Array) -> tuple[Array, Array]:
    """One token of the recurrence → (o B×N×V, new state B×N×K×V)."""
    s = s_BxNxKxV * jnp.exp(g_BxN)[..., None, None]
    pred = jnp.einsum("bnk,bnkv->bnv", k_BxNxK, s)
    s = s + jnp.einsum("bnk,bnv->bnkv", k_BxNxK, beta_BxN[..., None] * (v_BxNxV - pred))
    return jnp.einsum("bnk,bnkv->bnv", q_BxNxK, s), s


def scan(q_BxTxNxK: Array, k_BxTxNxK: Array, v_BxTxNxV: Array, g_BxTxN: Array,
         beta_BxTxN: Array, s0_BxNxKxV: Array | None = None) -> tuple[Array, Array]:
    """The recurrence token by token → (o B×T×N×V, final state B×N×K×V)."""
    b, _, n, dk = q_BxTxNxK.shape
    dv = v_BxTxNxV.shape[-1]
    s0 = jnp.zeros((b, n, dk, dv), jnp.float32) if s0_BxNxKxV is None else s0_BxNxKxV

    def step(s: Array, xs: tuple[Array, ...]) -> tuple[Array, Array]:
        o, s = recurrent_step(*xs, s)
        return s, o

    xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0)
               for x in (q_BxTxNxK, k_BxTxNxK, v_BxTxNxV, g_BxTxN, beta_BxTxN))
    s, o = jax.lax.scan(step, s0.astype(jnp.float32), xs)
    return jnp.moveaxis(o, 0, 1), s


def scan_states(q_BxTxNxK: Array, k_BxTxNxK: Array, v_BxTxNxV: Array, g_BxTxN: Array,
                beta_BxTxN: Array, s0_BxNxKxV: Array) -> tuple[Array, Array]:
    """``scan`` that also keeps the state after every token → (o B×T×N×V, states
    B×T×N×K×V): what a speculative verify pass needs to roll back to any accepted position."""

    def step(s: Array, xs: tuple[Array, ...]) -> tuple[Array, tuple[Array, Array]]:
        o, s = recurrent_step(*xs, s)
        return s, (o, s)

    xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0)
               for x in (q_BxTxNxK, k_BxTxNxK, v_BxTxNxV, g_BxTxN, beta_BxTxN))
    _, (o, states) = jax.lax.scan(step, s0_BxNxKxV.astype(jnp.float32), xs)
    return jnp.moveaxis(o, 0, 1), jnp.moveaxis(states, 0, 1)


def _unit_lower_inverse(a_XxBxB: Array) -> Array:
    """Inverse of small unit-lower-triangular blocks by forward substitution, one row per step
    (``B - 1`` unrolled steps of batched vector-matrix products)."""
    b = a_XxBxB.shape[-1]
    # With a = I + M, the rows of inv = I + N satisfy N_i = -M_i - M_i·N, i.e. row i only needs
    # rows < i of N, which are final by then.
    n = -jnp.tril(a_XxBxB, -1)
    for i in range(1, b):
        row = n[..., i:i + 1, :i] + jnp.matmul(n[..., i:i + 1, :i], n[..., :i, :i])
        n = n.at[..., i:i + 1, :i].set(row)
    return n + jnp.eye(b, dtype=a_XxBxB.dtype)


def unit_lower_solve(a_XxCxC: Array, rhs_XxCxR: Array, block: int = 16) -> Array:
    """Solves ``a · x = rhs`` for unit-lower-triangular ``a`` (batched over leading dims).

    Blocked forward substitution: the ``block × block`` diagonal blocks are inverted row by row
    (all blocks at once), the off-diagonal blocks are matmuls. Only elementwise ops and matmuls:
    XLA:CPU's LAPACK triangular solve (``lax.linalg.triangular_solve``) is slow from 32 rows on
    and, with several solves in flight on a 2-thread pool, can deadlock (jaxlib 0.10.2:
    ``ParallelBatchMap`` waits on the pool its own callers occupy).
    """
    c = a_XxCxC.shape[-1]
    starts = list(range(0, c, block))
    inverses = [_unit_lower_inverse(a_XxCxC[..., s:s + block, s:s + block]) for s in starts]
    rows: list[Array] = []
    for s, inv in zip(starts, inverses, strict=True):
        r = rhs_XxCxR[..., s:s + block, :]
        if rows:
            r = r - jnp.matmul(a_XxCxC[..., s:s + block, :s], jnp.concatenate(rows, axis=-2))
        rows.append(jnp.matmul(inv, r))
    return jnp.concatenate(rows, axis=-2)


def chunked(q_BxTxNxK: Array, k_BxTxNxK: Array, v_BxTxNxV: Array, g_BxTxN: Array,
            beta_BxTxN: Array, s0_BxNxKxV: Array | None = None,
            chunk: int = 64) -> tuple[Array, Array]:
    """Chunk-parallel form → (o B×T×N×V, final state B×N×K×V); equal to ``scan``.

    Within a chunk, with ``γ = cumsum(g)``, ``Γ_ij = exp(γ_i − γ_j)`` (j ≤ i) and
    ``M_ij = β_i (k_i·k_j) Γ_ij`` (j < i), the writes ``u_t = β_t(v_t − k_tᵀ S_{t-1}')`` satisfy
    ``(I + M) u = βV − (βK ⊙ e^γ) S_in``; so ``u = U − W S_in`` with ``U, W`` from two
    triangular solves that do not depend on the incoming state (computed for all chunks at
    once). The scan over chunks then only does ``S``-dependent matmuls.
    """
    b, t, n, dk = q_BxTxNxK.shape
    dv = v_BxTxNxV.shape[-1]
    c = chunk
    pad = (-t) % c
    n_chunks = (t + pad) // c

    def prep(x: Array) -> Array:
        # B×T×N×… → N-major chunks B×N×nC×C×…; padding has g = 0, β = 0: no decay, no write.
        x = x.astype(jnp.float32)
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        x = jnp.moveaxis(x, 2, 1)
        return x.reshape(b, n, n_chunks, c, *x.shape[3:])

    q, k, v = prep(q_BxTxNxK), prep(k_BxTxNxK), prep(v_BxTxNxV)
    g, beta = prep(g_BxTxN), prep(beta_BxTxN)
    gamma = jnp.cumsum(g, axis=-1)  # B×N×nC×C
    lower = jnp.tril(jnp.ones((c, c), bool))
    strict = jnp.tril(jnp.ones((c, c), bool), -1)
    # Mask before exp: above the diagonal γ_i − γ_j > 0 can overflow, and inf·0 poisons grads.
    diff = jnp.where(lower, gamma[..., :, None] - gamma[..., None, :], 0.0)
    decay = jnp.where(lower, jnp.exp(diff), 0.0)  # Γ, B×N×nC×C×C
    kk = jnp.einsum("...ik,...jk->...ij", k, k)
    m = jnp.where(strict, beta[..., :, None] * kk * decay, 0.0)
    a = m + jnp.eye(c, dtype=jnp.float32)
    rhs = jnp.concatenate([beta[..., None] * v, (beta * jnp.exp(gamma))[..., None] * k], axis=-1)
    sol = unit_lower_solve(a, rhs)
    u, w = sol[..., :dv], sol[..., dv:]
    qk = jnp.where(lower, jnp.einsum("...ik,...jk->...ij", q, k) * decay, 0.0)
    q_decayed = q * jnp.exp(gamma)[..., None]
    tail = jnp.exp(gamma[..., -1:] - gamma)[..., None] * k  # K ⊙ exp(γ_last − γ)
    last = jnp.exp(gamma[..., -1])  # B×N×nC

    def step(s: Array, xs: tuple[Array, ...]) -> tuple[Array, Array]:
        u_c, w_c, qk_c, qd_c, tail_c, last_c = xs
        v_new = u_c - jnp.einsum("bnck,bnkv->bncv", w_c, s)
        o = (jnp.einsum("bnck,bnkv->bncv", qd_c, s)
             + jnp.einsum("bnij,bnjv->bniv", qk_c, v_new))
        s = last_c[..., None, None] * s + jnp.einsum("bnck,bncv->bnkv", tail_c, v_new)
        return s, o

    s0 = jnp.zeros((b, n, dk, dv), jnp.float32) if s0_BxNxKxV is None else s0_BxNxKxV
    xs = tuple(jnp.moveaxis(x, 2, 0) for x in (u, w, qk, q_decayed, tail, last))
    s, o = jax.lax.scan(step, s0.astype(jnp.float32), xs)  # o: nC×B×N×C×V
    o = jnp.moveaxis(o, 0, 2).reshape(b, n, n_chunks * c, dv)[:, :, :t]
    return jnp.moveaxis(o, 1, 2), s

"""Gated DeltaNet prefill: the chunked (WY) form against a token-by-token ``lax.scan``, on CPU.

    python -m benchmarks.deltanet_prefill
    python -m benchmarks.deltanet_prefill --quick      # smoke run, well under 30 s

Both forms run jitted on the same inputs and weights, in one process; the ratio is chunked
tokens/s over scan tokens/s. Rows:

* ``core``: ``pipo_jax.model.deltanet.chunked`` vs ``.scan`` on realistic inputs (L2-normed q/k,
  Qwen3.5-style gates ``g = −exp(A_log)·softplus(a + dt_bias)``, ``β = sigmoid(b)``);
* ``layer``: a whole ``GatedDeltaNet`` (projections, causal conv, gates, gated norm) with
  ``use_scan`` False vs True, with randomised weights (QWEN3_5.md §5 recipe for the gates);
* ``backbone`` (``--backbone-lengths``): the AR backbone forward of a hybrid
  ``[lin, lin, lin, full] × 2`` stack vs the same stack with every layer full attention
  (``ratio`` = hybrid / full attention).

``max_abs_diff`` is the largest elementwise |chunked − scan| of the output, next to the output's
own largest magnitude (``max_abs_out``); ``state_diff`` the same for the final recurrent state.
Times are the median of ``--repeats`` calls after an untimed compile call (``ratio_best``: the
same ratio from the best call of each).

``core_grad`` times forward + backward of the core (what a training step pays): the scan's
backward keeps one ``dk × dv`` state per token, the chunked form's one per chunk.

The chunked form's triangular solves are matmul-only (``deltanet.unit_lower_solve``): XLA:CPU's
LAPACK ``trsm`` was 20x slower from 32 rows on and can deadlock on a 2-thread pool.

Timings on a shared 2-core machine are noisy; compare ratios from one run, not across runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from benchmarks.common import table, write
from pipo_jax.config import ModelConfig
from pipo_jax.model import deltanet
from pipo_jax.model.layers import GatedDeltaNet
from pipo_jax.model.pipo import PipoLM, init_params

Array = jax.Array

# Gated DeltaNet sizes: (d_model, key heads, value heads, dk, dv).
SIZES = {"small": (512, 4, 8, 64, 64),  # a Qwen3.5-like layer, scaled down
         "tiny": (64, 2, 4, 16, 8)}  # the tiny config of QWEN3_5.md §5


def _config(size: str, chunk: int, **extra: Any) -> ModelConfig:
    d_model, nk, nv, dk, dv = SIZES[size]
    fields: dict[str, Any] = dict(
        family="qwen3_5", vocab_size=4096, d_model=d_model, n_layers=8,
        n_heads=max(4, d_model // 64), n_kv_heads=2, head_dim=64 if d_model >= 256 else 32,
        mlp_dim=3 * d_model, partial_rotary_factor=0.25, tie_embeddings=False,
        linear_n_key_heads=nk, linear_n_value_heads=nv, linear_key_head_dim=dk,
        linear_value_head_dim=dv, linear_chunk=chunk,
        layer_types=("linear_attention",) * 3 + ("full_attention",)
        + ("linear_attention",) * 3 + ("full_attention",))
    fields.update(extra)
    return ModelConfig(**fields)


def _time(fn: Callable[[], Any], repeats: int) -> tuple[float, float, float, Any]:
    """(compile + first call s, median s and best s of ``repeats`` calls, the last output)."""
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return first, statistics.median(ts), min(ts), out


def _gates(rng: np.random.Generator, shape: tuple[int, ...], nv: int) -> tuple[Array, Array]:
    a_log = np.log(rng.uniform(0.01, 2.0, nv))
    dt_bias = 0.5 * rng.standard_normal(nv)
    pre = rng.standard_normal(shape) + dt_bias
    g = -np.exp(a_log) * np.logaddexp(0.0, pre)  # softplus
    beta = 1.0 / (1.0 + np.exp(-rng.standard_normal(shape)))
    return jnp.asarray(g, jnp.float32), jnp.asarray(beta, jnp.float32)


def core_inputs(size: str, batch: int, length: int, seed: int = 0) -> tuple[Array, ...]:
    """q, k B×T×N×dk (L2-normed, q scaled by dk^-½), v B×T×N×dv, g and β B×T×N."""
    _, _, nv, dk, dv = SIZES[size]
    rng = np.random.default_rng(seed)

    def unit(shape: tuple[int, ...]) -> np.ndarray:
        x = rng.standard_normal(shape)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    q = jnp.asarray(unit((batch, length, nv, dk)) * dk ** -0.5, jnp.float32)
    k = jnp.asarray(unit((batch, length, nv, dk)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((batch, length, nv, dv)), jnp.float32)
    g, beta = _gates(rng, (batch, length, nv), nv)
    return q, k, v, g, beta


def layer_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """GatedDeltaNet parameters: matrices N(0, 1/fan_in), conv N(0, 1/kernel), gated-norm scale
    1 + 0.3·N(0, 1), A_log = log U(0.01, 2), dt_bias = 0.5·N(0, 1)."""
    x = jnp.zeros((1, 4, cfg.d_model), jnp.float32)
    params = nn.unbox(GatedDeltaNet(cfg).init(jax.random.key(seed), x)["params"])
    rng = np.random.default_rng(seed)

    def draw(path: tuple[Any, ...], leaf: Array) -> Array:
        name = "/".join(str(getattr(p, "key", p)) for p in path)
        shape = leaf.shape
        if name.endswith("A_log"):
            value = np.log(rng.uniform(0.01, 2.0, shape))
        elif name.endswith("dt_bias"):
            value = 0.5 * rng.standard_normal(shape)
        elif name.startswith("norm"):
            value = 1.0 + 0.3 * rng.standard_normal(shape)
        else:  # kernels [in, out] and the conv [C, kernel]
            fan_in = shape[-1] if name.startswith("conv1d") else shape[0]
            value = rng.standard_normal(shape) / np.sqrt(fan_in)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, params)


def bench_core(size: str, batch: int, length: int, chunk: int, repeats: int) -> dict[str, Any]:
    xs = core_inputs(size, batch, length)
    chunked = jax.jit(lambda *a: deltanet.chunked(*a, chunk=chunk))
    scan = jax.jit(deltanet.scan)
    return _compare("core", size, batch, length, lambda: chunked(*xs), lambda: scan(*xs), repeats)


def bench_core_grad(size: str, batch: int, length: int, chunk: int,
                    repeats: int) -> dict[str, Any]:
    """Forward + backward (gradients wrt q, k, v, g, β of a random projection of the output)."""
    xs = core_inputs(size, batch, length)
    w = jnp.asarray(np.random.default_rng(3).standard_normal(xs[2].shape), jnp.float32)

    def grad_of(fn: Callable[..., Any]) -> Callable[..., Any]:
        def loss(*a: Array) -> Array:
            out, state = fn(*a)
            return jnp.sum(out * w) + jnp.sum(state)

        def run(*a: Array) -> tuple[Array, Array]:
            grads = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*a)
            # (output, "state") pair for _compare: the q gradient and the v gradient.
            return grads[0], grads[2]

        return jax.jit(run)

    chunked = grad_of(lambda *a: deltanet.chunked(*a, chunk=chunk))
    scan = grad_of(deltanet.scan)
    return _compare("core_grad", size, batch, length, lambda: chunked(*xs), lambda: scan(*xs),
                    repeats)


def bench_layer(size: str, batch: int, length: int, chunk: int, repeats: int) -> dict[str, Any]:
    cfg = _config(size, chunk)
    params = layer_params(cfg)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((batch, length, cfg.d_model)),
                    jnp.float32)
    model = GatedDeltaNet(cfg)
    fwd = jax.jit(lambda p, x_, use_scan: model.apply({"params": p}, x_, use_scan=use_scan),
                  static_argnums=2)
    return _compare("layer", size, batch, length, lambda: fwd(params, x, False),
                    lambda: fwd(params, x, True), repeats)


def _compare(part: str, size: str, batch: int, length: int, chunked: Callable[[], Any],
             scan: Callable[[], Any], repeats: int) -> dict[str, Any]:
    c_first, c_time, c_best, (c_out, c_state) = _time(chunked, repeats)
    s_first, s_time, s_best, (s_out, s_state) = _time(scan, repeats)
    # Layers return (out, DeltaNetCache(conv, state)); deltanet returns (o, state).
    c_state, s_state = jax.tree.leaves(c_state)[-1], jax.tree.leaves(s_state)[-1]
    tokens = batch * length
    return {
        "part": part, "size": size, "batch": batch, "tokens": length,
        "chunked_tok_s": tokens / c_time, "scan_tok_s": tokens / s_time,
        "ratio": s_time / c_time,
        "max_abs_diff": float(jnp.max(jnp.abs(c_out - s_out))),
        "max_abs_out": float(jnp.max(jnp.abs(s_out))),
        "state_diff": float(jnp.max(jnp.abs(c_state - s_state))),
        "ratio_best": s_best / c_best,
        "chunked_ms": 1e3 * c_time, "scan_ms": 1e3 * s_time,
        "chunked_best_ms": 1e3 * c_best, "scan_best_ms": 1e3 * s_best,
        "chunked_compile_s": c_first, "scan_compile_s": s_first,
    }


def bench_backbone(batch: int, length: int, chunk: int, repeats: int) -> dict[str, Any]:
    """AR backbone forward tokens/s: hybrid Qwen3.5 stack vs all full attention ("small")."""
    hybrid = _config("small", chunk)
    full = _config("small", chunk, layer_types=("full_attention",) * hybrid.n_layers)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, hybrid.vocab_size,
                                                           (batch, length)), jnp.int32)
    row: dict[str, Any] = {"part": "backbone", "size": "small", "batch": batch, "tokens": length}
    times = {}
    for name, cfg in (("hybrid", hybrid), ("full", full)):
        params = nn.unbox(init_params(cfg, False, jax.random.key(0)))
        model = PipoLM(cfg, False)
        fwd = jax.jit(lambda p, t, m=model: m.apply({"params": p}, t)["h"])
        first, times[name], best, _ = _time(lambda f=fwd, p=params: f(p, tokens), repeats)
        row[f"{name}_best_ms"] = 1e3 * best
        row[f"{name}_tok_s"] = batch * length / times[name]
        row[f"{name}_ms"] = 1e3 * times[name]
        row[f"{name}_compile_s"] = first
    row["ratio"] = times["full"] / times["hybrid"]
    return row


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="256,1024,4096", help="sequence lengths, small size")
    p.add_argument("--tiny-lengths", default="1024", help="sequence lengths, tiny config")
    p.add_argument("--backbone-lengths", default="1024",
                   help="hybrid vs full-attention backbone forward; empty to skip")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="short lengths, 2 repeats (smoke run)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/deltanet_prefill.json, "
                   "or deltanet_prefill_quick.json with --quick)")
    args = p.parse_args()
    if args.quick:
        args.lengths, args.tiny_lengths, args.backbone_lengths = "128", "", ""
        args.repeats = 2
    jobs: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    for size, lengths in (("small", _ints(args.lengths)), ("tiny", _ints(args.tiny_lengths))):
        for length in lengths:
            for part, fn in (("core", bench_core), ("core_grad", bench_core_grad),
                             ("layer", bench_layer)):
                jobs.append((f"{part} {size} T={length}",
                             lambda f=fn, s=size, n=length: f(s, args.batch, n, args.chunk,
                                                             args.repeats)))
    rows, backbone_rows = [], []
    for label, job in jobs:
        rows.append(job())
        print(f"{label}: done", flush=True)
    for length in _ints(args.backbone_lengths):
        backbone_rows.append(bench_backbone(args.batch, length, args.chunk, args.repeats))
        print(f"backbone T={length}: done", flush=True)

    print(f"\nGated DeltaNet prefill, batch {args.batch}, chunk {args.chunk}, median of "
          f"{args.repeats}; ratio = chunked tok/s / scan tok/s ({jax.default_backend()})")
    print(table(rows, [("part", "s"), ("size", "s"), ("tokens", "d"), ("chunked_tok_s", ",.0f"),
                       ("scan_tok_s", ",.0f"), ("ratio", ".2f"), ("ratio_best", ".2f"),
                       ("max_abs_diff", ".2e"),
                       ("max_abs_out", ".2f"), ("state_diff", ".2e")]))
    if backbone_rows:
        print("\nAR backbone forward, 8 layers d_model 512; ratio = hybrid tok/s / full tok/s")
        print(table(backbone_rows, [("tokens", "d"), ("hybrid_tok_s", ",.0f"),
                                    ("full_tok_s", ",.0f"), ("ratio", ".2f"),
                                    ("hybrid_compile_s", ".1f"), ("full_compile_s", ".1f")]))
    worst = max(r["max_abs_diff"] for r in rows)
    print(f"\nworst max |chunked - scan| = {worst:.2e}")
    path = write("deltanet_prefill_quick" if args.quick else "deltanet_prefill", {
        "sizes": {k: dict(zip(("d_model", "n_key_heads", "n_value_heads", "dk", "dv"), v,
                              strict=True)) for k, v in SIZES.items()},
        "batch": args.batch, "chunk": args.chunk, "repeats": args.repeats, "quick": args.quick,
        "rows": rows, "backbone_rows": backbone_rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

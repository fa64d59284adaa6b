"""Causal self-attention for training: the blockwise form against the materialised one, on CPU.

    python -m benchmarks.attention
    python -m benchmarks.attention --lengths 1024,2048 --repeats 1     # quick

One attention layer (default: the tiny Qwen3.5 shape, 4 query heads, 1 key/value head of 32
dims, batch 1) takes a forward + backward pass (``jax.grad`` of a sum of the output) at each
length of latents, jitted, in one process: ``model.attention_impl`` ``xla`` (``B·N·L²`` scores)
against ``blockwise`` (``--block`` positions). Peak memory is the compiled program's
temporaries (XLA's memory analysis: what the step allocates besides its inputs and outputs);
time is the median of ``--repeats`` calls after an untimed compile call. ``xla`` is skipped
above ``--xla-max`` (its scores alone: ``B·N·L²·4`` bytes, twice for the gradient). The
``ratio`` columns are blockwise over xla from the same run.

Timings on a shared 2-core machine are noisy; compare ratios from one run, not across runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import table, write
from pipo_jax.model.self_attention import causal_attention


def _program(impl: str, block: int, shapes: tuple[tuple[int, ...], ...]) -> Any:
    def loss(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        return jnp.sum(causal_attention(q, k, v, None, impl, block).astype(jnp.float32) ** 2)
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()


def measure(impl: str, length: int, args: argparse.Namespace) -> dict[str, Any]:
    shapes = ((args.batch, length, args.heads, args.head_dim),
              (args.batch, length, args.kv_heads, args.head_dim),
              (args.batch, length, args.kv_heads, args.head_dim))
    t = time.perf_counter()
    compiled = _program(impl, args.block, shapes)
    compile_s = time.perf_counter() - t
    temp = int(compiled.memory_analysis().temp_size_in_bytes)
    rng = np.random.default_rng(0)
    xs = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
    jax.block_until_ready(compiled(*xs))
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*xs))
        times.append(time.perf_counter() - t)
    return {"impl": impl, "length": length, "temp_mib": temp / 2**20,
            "seconds": statistics.median(times), "compile_s": compile_s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    p.add_argument("--xla-max", type=int, default=8192, help="longest length for xla")
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args()
    rows = []
    for length in (int(x) for x in args.lengths.split(",")):
        row: dict[str, Any] = {"length": length}
        block = measure("blockwise", length, args)
        row.update(blockwise_mib=block["temp_mib"], blockwise_s=block["seconds"])
        if length <= args.xla_max:
            xla = measure("xla", length, args)
            row.update(xla_mib=xla["temp_mib"], xla_s=xla["seconds"],
                       memory_ratio=block["temp_mib"] / xla["temp_mib"],
                       time_ratio=block["seconds"] / xla["seconds"])
        rows.append(row)
        print(f"length {length}: {row}", flush=True)
    cols = [("length", "d"), ("xla_mib", ".1f"), ("blockwise_mib", ".1f"),
            ("memory_ratio", ".3f"), ("xla_s", ".4f"), ("blockwise_s", ".4f"),
            ("time_ratio", ".2f")]
    print(table(rows, cols))
    command = "python -m benchmarks.attention " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
    print(f"wrote {write('attention', {'command': command, 'rows': rows}, args.out)}")


if __name__ == "__main__":
    main()

"""PIPO SFT train step with ``tuner: lora`` against ``tuner: full``, on CPU.

    python -m benchmarks.lora_step
    python -m benchmarks.lora_step --quick      # smoke run, well under a minute

Both tuners run the same jitted ``pipo_jax.train.supervised.train_step`` on the same batch and
the same starting weights, in one process. Per model size the table gives the trainable
parameters, the bytes of
optimizer state (AdamW's two moments of the trainable set), and the median step time; ``speedup``
is full step time / LoRA step time (``_nodrop``: the same with adapter dropout off), and
``*_gflop`` the compiled step's FLOP count (XLA cost analysis). A LoRA step computes no weight
gradient for the frozen backbone and keeps optimizer state only for the adapters and the PIPO
modules (SPEC §4): fewer FLOPs and far less optimizer memory at every size; whether that is
less time depends on whether the frozen matmuls dominate the step (they do not at these sizes on
a CPU, where the adapters' skinny rank-r matmuls and dropout masks run at a fraction of the
dense matmuls' rate).

Sizes: ``tiny`` is the embedded default's model (``configs/tiny.yaml``); ``small`` a 4-layer
hybrid of width 512 (Qwen3.5-shaped, scaled down) where the projections dominate the step.
Timings on a shared 2-core machine are noisy; compare ratios from one run, not across runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from benchmarks.common import table, write
from pipo_jax.config import LoraConfig, ModelConfig, SftConfig, TrainConfig, load_config
from pipo_jax.model import lora as lora_lib
from pipo_jax.model.pipo import init_params
from pipo_jax.train.state import TrainState, attach_adapters, make_optimizer
from pipo_jax.train.supervised import train_step

REPO = Path(__file__).resolve().parents[1]


def _models() -> dict[str, ModelConfig]:
    tiny = load_config(REPO / "configs" / "tiny.yaml").model
    small = dataclasses.replace(
        tiny, d_model=512, n_layers=4, layer_types=("linear_attention",) * 3 + ("full_attention",),
        n_heads=8, n_kv_heads=2, head_dim=64, mlp_dim=1536, linear_n_key_heads=4,
        linear_n_value_heads=8, linear_key_head_dim=64, linear_value_head_dim=64, linear_chunk=32)
    return {"tiny": tiny, "small": small}


class _Step:
    """One tuner's jitted train step on ``batch``, its state, and its static costs."""

    def __init__(self, cfg: ModelConfig, tc: TrainConfig, batch: dict[str, jax.Array]) -> None:
        lora = tc.adapters
        tx = make_optimizer(tc)
        base = nn.unbox(init_params(cfg, True, jax.random.key(0)))
        params = attach_adapters(cfg, True, lora, base, jax.random.key(1))
        train, _ = lora_lib.partition(params, tc.tuner)
        opt_state = tx.init(train)
        self.state = TrainState(step=jnp.int32(0), params=params, opt_state=opt_state)
        self.batch = batch
        self.fn = jax.jit(lambda s, b: train_step(s, b, mcfg=cfg, tc=tc, pipo=True,
                                                          tx=tx))
        cost = self.fn.lower(self.state, batch).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        self.gflop = float(cost.get("flops", 0.0)) / 1e9
        self.trainable = sum(x.size for x in jax.tree.leaves(train))
        self.opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state))
        self.times: list[float] = []
        self()  # compile, untimed
        self.times.clear()

    def __call__(self) -> None:
        t0 = time.perf_counter()
        self.state, metrics = self.fn(self.state, self.batch)
        jax.block_until_ready(metrics)
        self.times.append(time.perf_counter() - t0)

    @property
    def seconds(self) -> float:
        return statistics.median(self.times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256, help="tokens per row (even)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="tiny only, short sequences")
    p.add_argument("--out", help="JSON path (default benchmarks/results/lora_step.json)")
    args = p.parse_args()
    if args.quick:
        args.sizes, args.seq, args.repeats, args.batch = "tiny", 64, 2, 4
    models = _models()
    rows: list[dict[str, Any]] = []
    for size in args.sizes.split(","):
        cfg = models[size]
        rng = np.random.default_rng(0)
        tokens = rng.integers(16, cfg.vocab_size, (args.batch, args.seq)).astype(np.int32)
        mask = np.zeros_like(tokens, dtype=bool)
        mask[:, args.seq // 4:] = True
        batch = {"tokens": jnp.asarray(tokens), "loss_mask": jnp.asarray(mask)}
        base_tc = SftConfig(steps=1000, batch_size=args.batch, learning_rate=1e-4)
        lora_tc = dataclasses.replace(base_tc, tuner="lora",
                                      lora=LoraConfig(rank=args.rank, alpha=2.0 * args.rank))
        no_drop_tc = dataclasses.replace(lora_tc, lora=dataclasses.replace(lora_tc.lora,
                                                                           dropout=0.0))
        full, low, no_drop = (_Step(cfg, tc, batch) for tc in (base_tc, lora_tc, no_drop_tc))
        # Interleaved rounds: a burst of load on the machine hits all three alike.
        for _ in range(args.repeats):
            for step in (full, low, no_drop):
                step()
        n_all = sum(x.size for x in jax.tree.leaves(
            jax.eval_shape(lambda k, cfg=cfg: nn.unbox(init_params(cfg, True, k)),
                           jax.random.key(0))))
        rows.append({
            "size": size, "params_M": n_all / 1e6,
            "full_trainable_M": full.trainable / 1e6, "lora_trainable_M": low.trainable / 1e6,
            "full_opt_MB": full.opt_bytes / 1e6, "lora_opt_MB": low.opt_bytes / 1e6,
            "full_gflop": full.gflop, "lora_gflop": low.gflop,
            "full_step_ms": 1e3 * full.seconds, "lora_step_ms": 1e3 * low.seconds,
            "lora_nodrop_ms": 1e3 * no_drop.seconds, "speedup": full.seconds / low.seconds,
            "speedup_nodrop": full.seconds / no_drop.seconds})
    print(f"PIPO SFT step, batch {args.batch} x {args.seq} tokens, LoRA rank {args.rank} "
          f"(alpha {2 * args.rank}), median of {args.repeats} interleaved rounds")
    print(table(rows, [("size", "s"), ("params_M", ".2f"), ("full_trainable_M", ".2f"),
                       ("lora_trainable_M", ".3f"), ("full_opt_MB", ".1f"), ("lora_opt_MB", ".2f"),
                       ("full_gflop", ".1f"), ("lora_gflop", ".1f"), ("full_step_ms", ".1f"),
                       ("lora_step_ms", ".1f"), ("lora_nodrop_ms", ".1f"), ("speedup", ".2f"),
                       ("speedup_nodrop", ".2f")]))
    path = write("lora_step", {"args": vars(args), "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

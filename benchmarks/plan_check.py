"""The memory planner against a real step's measured peak, on one accelerator.

    python -m benchmarks.plan_check --config configs/qwen3_5_4b_sft.yaml --seq-len 8192

Plans the stage's train step on a one-device mesh (``plan.plan_memory``), then runs that step
once on freshly initialised parameters and random tokens and reads the device's
``memory_stats()["peak_bytes_in_use"]``. Needs a GPU or TPU: the CPU backend keeps no memory
statistics. The "Checked on a GPU" table of docs/scaling.md was measured this way (on an H200).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from benchmarks.common import write
from pipo_jax.config import MeshConfig, load_config
from pipo_jax.model import lora as lora_lib
from pipo_jax.model import sharding
from pipo_jax.model.pipo import init_params
from pipo_jax.train import plan
from pipo_jax.train.state import TrainState, make_optimizer, state_shardings
from pipo_jax.train.supervised import jit_train_step


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--stage", default="sft", choices=plan.PLANNED_STAGES)
    parser.add_argument("--seq-len", type=int, required=True)
    parser.add_argument("--out", help="JSON output (default benchmarks/results/plan_check.json)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    if device.memory_stats() is None:
        raise SystemExit(f"{device.platform} keeps no memory statistics: run this on a GPU/TPU")
    cfg = load_config(args.config, args.overrides)
    tc, mcfg = getattr(cfg, args.stage), cfg.model_of(args.stage)
    pipo = args.stage == "sft"
    mesh = sharding.build_mesh(MeshConfig(1, 1, 1), [device])
    planned = plan.plan_memory(cfg, args.stage, mesh, args.seq_len, 1)

    tx = make_optimizer(tc)
    _, sh = state_shardings(mcfg, pipo, tx, mesh, tc.tuner, tc.adapters)
    tokens = np.random.default_rng(0).integers(0, min(1000, mcfg.vocab_size), (1, args.seq_len))
    with jax.set_mesh(mesh):
        params = jax.jit(lambda r: nn.unbox(init_params(mcfg, pipo, r, tc.adapters)),
                         out_shardings=sh.params)(jax.random.key(0))
        opt_state = jax.jit(lambda p: tx.init(lora_lib.partition(p, tc.tuner)[0]),
                            out_shardings=sh.opt_state)(params)
        state = TrainState(step=jnp.int32(0), params=params, opt_state=opt_state)
        batch = sharding.global_batch({"tokens": tokens.astype(np.int32),
                                       "loss_mask": np.ones_like(tokens, bool)}, mesh)
        state, metrics = jit_train_step(cfg, args.stage, tx, mesh, sh)(state, batch)
        jax.block_until_ready(metrics)
    measured = int(device.memory_stats()["peak_bytes_in_use"])
    result: dict[str, Any] = {"config": args.config, "stage": args.stage,
                              "seq_len": args.seq_len, "device": str(device),
                              "planned_peak_bytes": planned.peak_bytes,
                              "measured_peak_bytes": measured,
                              "difference_bytes": measured - planned.peak_bytes,
                              "plan": planned.to_json()}
    print(json.dumps({k: v for k, v in result.items() if k != "plan"}, indent=1))
    print(f"wrote {write('plan_check', result, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

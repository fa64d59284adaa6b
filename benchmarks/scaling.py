"""PIPO SFT step time and tokens/s against the number of devices — **CPU simulation**.

    python -m benchmarks.scaling                 # 1, 2, 4, 8 simulated devices, fsdp and data
    python -m benchmarks.scaling --quick         # smoke run

Each device count runs in its own process with ``--cpu-devices N`` (JAX fixes the device count
at start-up), on the embedded default's model (``configs/tiny.yaml``) and the same global batch,
with the real jitted, sharded ``pipo_jax.train.supervised.train_step``. The 1-device step of
the same run is the baseline of every ratio.

What this measures: the cost of the SPMD program (collectives, per-device work split) when
the simulated devices share this machine's cores. It is **not** a speed-up measurement: all
simulated devices run on the same 2 CPU cores, so N devices cannot be faster than one, and
``time_ratio`` mostly shows the overhead of splitting the step N ways. On a TPU slice or a
multi-GPU host each device is a real chip; there, at a fixed per-device batch, tokens/s should
grow roughly with N.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import table, write

REPO = Path(__file__).resolve().parents[1]


def _child(devices: int, axis: str, batch: int, seq: int, repeats: int) -> dict[str, Any]:
    """Runs in the child process: times ``repeats`` steps after a compile step."""
    import jax

    jax.config.update("jax_num_cpu_devices", devices)
    import jax.numpy as jnp
    import numpy as np
    from flax import linen as nn

    from pipo_jax.config import MeshConfig, load_config
    from pipo_jax.model import sharding
    from pipo_jax.model.pipo import init_params
    from pipo_jax.train.state import TrainState, make_optimizer, state_shardings
    from pipo_jax.train.supervised import jit_train_step

    mesh_cfg = MeshConfig(data=devices if axis == "data" else 1,
                          fsdp=devices if axis == "fsdp" else 1, tensor=1)
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"sft.batch_size={batch}"])
    mesh = sharding.build_mesh(mesh_cfg)
    tx = make_optimizer(cfg.sft)
    _, sh = state_shardings(cfg.model, True, tx, mesh)
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, cfg.model.vocab_size, (batch, seq), dtype=np.int32)
    tokens[:, 1::2] = np.where(rng.random((batch, seq // 2)) < 0.1, 0, tokens[:, 1::2])
    batch_np = {"tokens": tokens, "loss_mask": np.ones((batch, seq), bool)}
    with jax.set_mesh(mesh):
        params = jax.jit(lambda r: nn.unbox(init_params(cfg.model, True, r)),
                         out_shardings=sh.params)(jax.random.key(0))
        state = TrainState(step=jnp.int32(0), params=params,
                                   opt_state=jax.jit(tx.init, out_shardings=sh.opt_state)(params))
        step = jit_train_step(cfg, "sft", tx, mesh, sh)
        data = sharding.global_batch(batch_np, mesh)
        state, metrics = step(state, data)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            state, metrics = step(state, data)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"devices": devices, "axis": axis, "mesh": dict(mesh.shape), "batch": batch,
            "seq_len": seq, "step_s": median, "tokens_per_s": batch * seq / median,
            "loss": float(metrics["loss"])}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="1,2,4,8", help="comma-separated device counts")
    parser.add_argument("--axes", default="fsdp,data", help="mesh axes to split over")
    parser.add_argument("--batch", type=int, default=16, help="global batch (rows)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per row")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--quick", action="store_true", help="1 and 2 devices, 3 steps")
    parser.add_argument("--out", help="JSON output (default benchmarks/results/scaling.json)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:  # devices,axis
        n, axis = args.child.split(",")
        print(json.dumps(_child(int(n), axis, args.batch, args.seq_len, args.repeats)))
        return 0
    devices = [1, 2] if args.quick else [int(d) for d in args.devices.split(",")]
    repeats = 3 if args.quick else args.repeats
    rows: list[dict[str, Any]] = []
    for axis in args.axes.split(","):
        for n in devices:
            if n == 1 and rows and rows[0]["devices"] == 1:
                continue  # one device is the same program on either axis
            proc = subprocess.run(
                [sys.executable, "-m", "benchmarks.scaling", "--child", f"{n},{axis}",
                 "--batch", str(args.batch), "--seq-len", str(args.seq_len),
                 "--repeats", str(repeats)],
                cwd=REPO, capture_output=True, text=True, check=False)
            if proc.returncode:
                raise SystemExit(proc.stderr[-3000:])
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    base = rows[0]
    for r in rows:
        r["time_ratio"] = r["step_s"] / base["step_s"]
        r["loss_vs_1"] = r["loss"] - base["loss"]
    print("PIPO SFT step on simulated CPU devices (all share this machine's cores; "
          "not a speed-up measurement)")
    print(table(rows, [("axis", "s"), ("devices", "d"), ("step_s", ".4f"),
                       ("tokens_per_s", ".0f"), ("time_ratio", ".2f"), ("loss_vs_1", ".1e")]))
    path = write("scaling", {"simulated_cpu_devices": True, "batch": args.batch,
                             "seq_len": args.seq_len, "repeats": repeats, "rows": rows}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

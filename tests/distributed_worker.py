"""One process of ``test_distributed.py``'s localhost job: trains a few steps of the micro
config's ``ar`` stage with ``jax.distributed`` and prints the final metrics as JSON.

    python tests/distributed_worker.py RUN_DIR [train.py's multi-process flags]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402

from pipo_jax import distributed  # noqa: E402
from pipo_jax.config import load_config  # noqa: E402
from pipo_jax.train.pipeline import train_stage  # noqa: E402


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    distributed.add_arguments(parser)
    args = parser.parse_args(argv)
    distributed.initialize(args)
    cfg = load_config(REPO / "configs" / "micro.yaml", [
        f"run_dir={args.run_dir}", f"data.data_dir={args.run_dir}/../tfds", "stages=[ar]",
        "ar.steps=3", "ar.batch_size=8", "ar.log_every=1", "ar.ckpt_every=3",
        "mesh.data=2", "mesh.fsdp=-1"])
    result = train_stage(cfg, "ar", progress=False)
    print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                      "devices": jax.device_count(), "loss": result.final_metrics["loss"],
                      "grad_norm": result.final_metrics["grad_norm"]}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])

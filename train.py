"""Train PIPO: ``python train.py [--config FILE] [--stage NAME ...] [key=value ...]``.

With no arguments it trains the embedded default (``configs/tiny.yaml``) into ``runs/default``:
the larger AR teacher, the student's AR base, PIPO SFT from that base, then on-policy
distillation (OPD) of the PIPO student from the teacher. ``--stage opd`` (repeatable) runs only
the stages named, in the canonical order. A stage that already has checkpoints resumes from its
latest one; a finished stage is skipped.

Multi-process runs (TPU pod slices, multi-GPU hosts): every process runs the same command with
``--distributed-auto`` or ``--coordinator HOST:PORT --num-processes N --process-id I``; see
docs/scaling.md. SIGTERM saves the current step and exits with status 143; running the
command again resumes from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax

from pipo_jax import distributed
from pipo_jax.cli import run_main
from pipo_jax.config import STAGES, load_config, to_dict

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config file")
    parser.add_argument("--stage", action="append", choices=STAGES, metavar="NAME",
                        help=f"run only this stage (repeatable; one of {', '.join(STAGES)}); "
                             "default: the config's stages")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. sft.steps=100 model.d_model=64")
    distributed.add_arguments(parser)
    args = parser.parse_intermixed_args(argv)  # flags and key=value overrides in any order
    cfg = load_config(args.config, args.overrides)
    if args.stage:
        cfg = dataclasses.replace(cfg, stages=tuple(s for s in STAGES if s in args.stage))
    # Imported once the config is known good: a bad key or value is reported in a second, not
    # after the training stack (flax, orbax, TFDS, grain) has loaded.
    from pipo_jax.train.pipeline import train

    distributed.initialize(args)
    lead = jax.process_index() == 0  # one process speaks for the job
    if lead:
        print(json.dumps(to_dict(cfg), indent=1), flush=True)
        print(distributed.describe(), file=sys.stderr, flush=True)
    for result in train(cfg, progress=not args.no_progress):
        if not lead:
            continue
        summary = {k: round(v, 4) for k, v in result.final_metrics.items()
                   if k.startswith(("loss", "accuracy", "commit", "kl_", "ece", "brier", "auroc",
                                    "rollout_acc"))}
        print(f"{result.stage_dir}: step {result.steps} in {result.seconds:.0f}s {summary}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

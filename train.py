"""Train PIPO: ``python train.py [--config FILE] [key=value ...]``.

With no arguments it trains the embedded default (``configs/tiny.yaml``): the AR model, then the
PIPO model built from it, into ``runs/default``. A stage that already has checkpoints resumes
from its latest one; a finished stage is skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipo_jax.cli import run_main
from pipo_jax.config import load_config, to_dict
from pipo_jax.trainer import train

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. sft.steps=100 model.d_model=64")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(to_dict(cfg), indent=1), flush=True)
    for result in train(cfg, progress=not args.no_progress):
        summary = {k: round(v, 4) for k, v in result.final_metrics.items()
                   if k.startswith(("loss", "accuracy", "commit"))}
        print(f"{result.stage_dir}: step {result.steps} in {result.seconds:.0f}s {summary}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

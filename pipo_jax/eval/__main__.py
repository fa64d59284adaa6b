"""``python -m pipo_jax.eval convert {aime25,gpqa} --in FILE --out FILE [--seed N]``,
``python -m pipo_jax.eval convert test-split --run RUN --out FILE [--num N]``.

Converts a local copy of a public benchmark file to the benchmark schema (``pipo_jax.eval``);
see ``pipo_jax/eval/sources.py`` for the input formats. Evaluate the result with
``python decode.py --run RUN --bench FILE``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipo_jax.cli import run_main
from pipo_jax.config import ConfigError, config_from_json
from pipo_jax.eval.sources import (
    aime25_questions,
    gpqa_questions,
    test_split_questions,
    write_jsonl,
)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pipo_jax.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert a benchmark file to the schema")
    convert.add_argument("source", choices=("aime25", "gpqa", "test-split"))
    convert.add_argument("--in", dest="inp", help="input file (aime25: JSONL; gpqa: CSV)")
    convert.add_argument("--run", help="test-split: run directory whose embedded test split to "
                         "export")
    convert.add_argument("--num", type=int, help="test-split: first N problems (default all)")
    convert.add_argument("--out", required=True, help="output JSONL file")
    convert.add_argument("--seed", type=int, default=0,
                         help="gpqa: seed of the deterministic option shuffle (default 0)")
    args = p.parse_args(argv)
    if args.source == "test-split":
        if args.run is None or args.inp is not None:
            raise ConfigError("convert test-split takes --run RUN (and no --in)")
        if args.num is not None and args.num < 1:
            raise ConfigError(f"--num must be >= 1, got {args.num}")
        cfg = config_from_json(Path(args.run) / "config.json")
        if cfg.data.source != "arith":
            raise ConfigError(f"{args.run} was trained on {cfg.data.source} data, which has no "
                              "embedded test split")
        try:
            records = test_split_questions(cfg.data, args.num)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    elif args.inp is None or args.run is not None or args.num is not None:
        raise ConfigError(f"convert {args.source} takes --in FILE (and no --run/--num)")
    elif args.source == "aime25":
        records = aime25_questions(args.inp)
    else:
        records = gpqa_questions(args.inp, args.seed)
    n = write_jsonl(records, args.out)
    print(f"wrote {n} questions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

"""``python -m pipo_jax.bench convert {aime25,gpqa} --in FILE --out FILE [--seed N]``.

Converts a local copy of a public benchmark file to the benchmark schema (``pipo_jax.bench``);
see ``pipo_jax/bench/convert.py`` for the input formats. Evaluate the result with
``python decode.py --run RUN --bench FILE``.
"""

from __future__ import annotations

import argparse
import sys

from pipo_jax.bench.convert import aime25_questions, gpqa_questions, write_jsonl
from pipo_jax.cli import run_main


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pipo_jax.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert a benchmark file to the schema")
    convert.add_argument("source", choices=("aime25", "gpqa"))
    convert.add_argument("--in", dest="inp", required=True,
                         help="input file (aime25: JSONL; gpqa: CSV)")
    convert.add_argument("--out", required=True, help="output JSONL file")
    convert.add_argument("--seed", type=int, default=0,
                         help="gpqa: seed of the deterministic option shuffle (default 0)")
    args = p.parse_args(argv)
    if args.source == "aime25":
        records = aime25_questions(args.inp)
    else:
        records = gpqa_questions(args.inp, args.seed)
    n = write_jsonl(records, args.out)
    print(f"wrote {n} questions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

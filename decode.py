"""Evaluate a trained run: ``python decode.py --run runs/default``.

Decodes the test split with PIPO and with the AR baseline on the same prompts and prints a table
(also written as JSON): pass@1 and pass@k, committed-token rate, tokens per backbone pass, time to
first token and time per output token, and the PIPO/AR ratios. ``--prompt TEXT`` instead answers
one question with both models and prints the text and per-request stats.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipo_jax.api import load
from pipo_jax.cli import run_main
from pipo_jax.config import ConfigError, validate_threshold
from pipo_jax.data import test_examples
from pipo_jax.evaluate import evaluate, format_table, write_json


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory written by train.py")
    p.add_argument("--threshold", type=float, help="confidence threshold in [-1, 1] "
                   "(-1 commits every draft, 1 commits none and skips the MTP head)")
    p.add_argument("--num-problems", type=int,
                   help="test problems to evaluate (default: min(200, data.num_test))")
    p.add_argument("--samples", type=int, default=1, help="samples per problem (pass@k, k = this)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--presence-penalty", type=float)
    p.add_argument("--max-new-tokens", type=int, help="budget of real (non-PAD) tokens")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--timing-problems", type=int, default=8,
                   help="problems timed one at a time (batch 1) for TTFT/TPOT; 0 disables")
    p.add_argument("--models", default="pipo,ar", help="comma-separated subset of pipo,ar")
    p.add_argument("--out", help="JSON output path (default: <run>/eval/decode.json)")
    p.add_argument("--prompt", help="answer this one question instead of evaluating")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threshold is not None:
        validate_threshold(args.threshold)
    if args.num_problems is not None and args.num_problems < 1:
        raise ConfigError(f"--num-problems must be >= 1, got {args.num_problems}")
    if args.samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {args.samples}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - {"pipo", "ar"}:
        raise ConfigError(f"--models must be a subset of pipo,ar, got {args.models!r}")
    options = {"threshold": args.threshold, "temperature": args.temperature,
               "top_k": args.top_k, "top_p": args.top_p,
               "presence_penalty": args.presence_penalty,
               "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
               "seed": args.seed}
    options = {k: v for k, v in options.items() if v is not None}
    runner = load(args.run)
    if runner.ar_params is None and "ar" in models:
        models.remove("ar")
        print("note: this run has no AR baseline; evaluating PIPO only", file=sys.stderr)
    if args.prompt is not None:
        for model in models:
            (gen,) = runner.generate(args.prompt, model=model, **options)
            print(f"--- {model}\n{gen.text}\n{json.dumps(gen.stats)}")
        return 0
    if args.num_problems is None:
        args.num_problems = min(200, runner.config.data.num_test)
    if args.num_problems > runner.config.data.num_test:
        raise ConfigError(
            f"--num-problems asks for {args.num_problems} test examples but the run's test "
            f"split has {runner.config.data.num_test} (data.num_test); ask for fewer")
    examples = test_examples(runner.config, args.num_problems)
    result = evaluate(runner, examples, samples=args.samples, models=models,
                      timing_problems=args.timing_problems, progress=not args.no_progress,
                      **options)
    result["run"] = str(args.run)
    print(format_table(result))
    out = Path(args.out) if args.out else Path(args.run) / "eval" / "decode.json"
    write_json(result, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

"""Confidence-threshold sweep: accuracy, commit rate and speed-up over AR for each threshold.

    python -m benchmarks.threshold_sweep --run runs/default

Accuracy of the AR baseline is evaluated once; its speed is re-measured next to each PIPO row
(speed-up = AR time per output token / PIPO time per output token, batch 1, greedy).
"""

from __future__ import annotations

import argparse

from benchmarks.common import table, write
from pipo_jax.data.loader import test_examples
from pipo_jax.decode.runner import load
from pipo_jax.eval.heldout import evaluate, time_requests


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", default="runs/default")
    p.add_argument("--thresholds", default="-1,0.3,0.5,0.7,0.8,0.9,0.95,1")
    p.add_argument("--num-problems", type=int, default=100)
    p.add_argument("--timing-problems", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per problem (best kept)")
    p.add_argument("--out")
    args = p.parse_args()
    runner = load(args.run)
    examples = test_examples(runner.config, args.num_problems)
    timed = examples[:args.timing_problems]
    ar = evaluate(runner, examples, models=("ar",), timing_problems=0, progress=False)["ar"]
    rows = []
    for thr in [float(t) for t in args.thresholds.split(",")]:
        res = evaluate(runner, examples, models=("pipo",), threshold=thr, timing_problems=0,
                       progress=False)["pipo"]
        # AR is re-timed next to every PIPO row, so each ratio compares runs made back to back
        # and slow drifts of a shared machine cancel out.
        ar_t = time_requests(runner, timed, "ar", {}, False, args.repeats)
        pipo_t = time_requests(runner, timed, "pipo", {"threshold": thr}, False, args.repeats)
        rows.append({"threshold": f"{thr:g}", "pass@1": res["pass@1"],
                     "commit_rate": res["commit_rate"], "tokens_per_pass": res["tokens_per_pass"],
                     "ar_tpot_ms": ar_t["tpot_ms"], "pipo_tpot_ms": pipo_t["tpot_ms"],
                     "tpot_speedup": ar_t["tpot_ms"] / pipo_t["tpot_ms"],
                     "ttft_speedup": ar_t["ttft_ms"] / pipo_t["ttft_ms"]})
        print(f"threshold {thr:g}: done", flush=True)
    print(f"AR pass@1 {ar['pass@1']:.3f} on the same problems")
    cols = [("threshold", "s"), ("pass@1", ".3f"), ("commit_rate", ".3f"),
            ("tokens_per_pass", ".2f"), ("ar_tpot_ms", ".3f"), ("pipo_tpot_ms", ".3f"),
            ("tpot_speedup", ".2f"), ("ttft_speedup", ".2f")]
    print(f"{len(examples)} test problems, greedy, batch 1 timing on {args.timing_problems}")
    print(table(rows, cols))
    path = write("threshold_sweep", {"run": args.run, "num_problems": len(examples),
                                     "ar_pass@1": ar["pass@1"], "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

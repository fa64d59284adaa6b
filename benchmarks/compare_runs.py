"""Whether two runs trained the same: every logged metric of every stage, compared exactly.

    python -m benchmarks.compare_runs BEFORE_RUN AFTER_RUN [--stages teacher ar sft opd]

The proof a behaviour-preserving change owes: train the default before and after it (same
config, same machine type) and compare ``<run>/<stage>/metrics.jsonl`` value by value. Only
wall-clock values (``tokens_per_second``) are left out. Prints one row per stage, writes JSON
(``--out``) and exits with status 1 when any value differs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from pipo_jax.train.metrics import read_jsonl

TIMING = frozenset({"tokens_per_second"})


def _same(u: object, v: object) -> bool:
    return u == v or (isinstance(u, float) and isinstance(v, float) and math.isnan(u)
                      and math.isnan(v))


def compare_stage(before: Path, after: Path) -> dict:
    ra, rb = read_jsonl(before / "metrics.jsonl"), read_jsonl(after / "metrics.jsonl")
    diffs = [{"step": x.get("step"), "key": k, "before": x.get(k), "after": y.get(k)}
             for x, y in zip(ra, rb, strict=False) for k in sorted((set(x) | set(y)) - TIMING)
             if not _same(x.get(k), y.get(k))]
    return {"records": [len(ra), len(rb)], "values": sum(len(set(x) - TIMING) for x in ra),
            "identical": not diffs and len(ra) == len(rb), "differences": diffs[:20],
            "loss": [ra[0]["loss"], ra[-1]["loss"]] if ra else None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before")
    p.add_argument("after")
    p.add_argument("--stages", nargs="+", default=["teacher", "ar", "sft", "opd"])
    p.add_argument("--out", help="JSON path (default: print only)")
    args = p.parse_args()
    result = {s: compare_stage(Path(args.before) / s, Path(args.after) / s) for s in args.stages}
    print("| stage | records | values compared | first → last loss | identical |")
    print("|---|---|---|---|---|")
    for s, r in result.items():
        loss = f"{r['loss'][0]:.6f} → {r['loss'][1]:.6f}" if r["loss"] else "–"
        print(f"| {s} | {r['records'][0]} / {r['records'][1]} | {r['values']} | {loss} | "
              f"{'yes' if r['identical'] else 'NO'} |")
        for d in r["differences"][:5]:
            print(f"    step {d['step']} {d['key']}: {d['before']!r} vs {d['after']!r}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0 if all(r["identical"] for r in result.values()) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Writes a small LongBench-v2-format file (``data.json`` layout) for trying the long-context
path end to end without the real data set: multiple-choice questions about a generated document
of a chosen length, from short enough for the embedded model's window to several times longer
(so that the middle cut of ``harness.fit_context`` applies).

    python -m benchmarks.bench_samples --out bench/longbench_v2_sample.json
    python -m pipo_jax.eval convert longbench-v2 --in bench/longbench_v2_sample.json \\
        --out bench/longbench_sample.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path

LENGTHS = {"short": 120, "medium": 600, "long": 3000}  # words of document


def sample_items(n: int, seed: int = 0) -> list[dict]:
    """``n`` LongBench-v2-shaped items; the answer is stated once, in the document's first part."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        length = list(LENGTHS)[i % len(LENGTHS)]
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        filler = [f"Record {j}: value {rng.randint(100, 999)}."
                  for j in range(LENGTHS[length] // 4)]
        filler.insert(1, f"The key fact: {a} + {b} = {a + b}.")
        options = [a + b, a + b + 1, a + b - 10, a + b + 10]
        order = list(range(4))
        rng.shuffle(order)
        items.append({"_id": f"sample-{i}", "domain": "Single-Document QA", "sub_domain": "sum",
                      "difficulty": "easy" if i % 2 == 0 else "hard", "length": length,
                      "question": f"What is {a} + {b}?",
                      **{f"choice_{c}": str(options[order[k]]) for k, c in enumerate("ABCD")},
                      "answer": "ABCD"[order.index(0)], "context": " ".join(filler)})
    return items


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output JSON file (LongBench v2's layout)")
    p.add_argument("--num", type=int, default=6, help="items (default 6)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(sample_items(args.num, args.seed), indent=1))
    os.replace(tmp, out)
    print(f"wrote {args.num} items to {out}")


if __name__ == "__main__":
    main()

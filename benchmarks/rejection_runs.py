"""Teacher-forced top-1 under runs of rejections: how well a PIPO stage handles the ``(x, PAD)``
states that high thresholds decode in.

    python -m benchmarks.rejection_runs --run runs/default --stage sft \
        --run runs/default/ablation/sft-shift-d0.25

For each run (its ``--stage``), every held-out response of the first ``--num-problems`` is
re-paired with each response pair rejected with probability ``r`` for ``r`` in ``--ratios``
(``shift`` augmentation; ``r = 1``: every pair ``(x, PAD)``, the state every pair is in at
τ = 1), and the backbone's and MTP head's top-1 accuracy is measured teacher-forced on the
untruncated rows (``recipe_ablation.heldout_teacher_forced``). A model that stays accurate as
``r`` grows has learnt the rejected states; decoding accuracy at τ near 1 additionally needs
every step of a long answer right. Prints a table and writes
``benchmarks/results/rejection_runs.json``.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.common import table, write
from benchmarks.recipe_ablation import heldout_teacher_forced
from pipo_jax.data.loader import test_examples
from pipo_jax.decode.runner import load


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="a run directory (repeatable)")
    p.add_argument("--stage", default="sft", help="the PIPO stage to load (sft or opd)")
    p.add_argument("--ratios", default="0,0.25,0.6,1")
    p.add_argument("--num-problems", type=int, default=40)
    p.add_argument("--out", help="JSON path (default benchmarks/results/rejection_runs.json)")
    args = p.parse_args()
    ratios = [float(r) for r in args.ratios.split(",")]
    if any(not 0.0 <= r <= 1.0 for r in ratios):
        raise SystemExit(f"--ratios must lie in [0, 1], got {args.ratios}")
    rows: list[dict[str, Any]] = []
    for run in args.run:
        runner = load(run, stage=args.stage)
        examples = test_examples(runner.config, args.num_problems)
        for r in ratios:
            rows.append({"run": run, "reject_ratio": r,
                         **heldout_teacher_forced(runner, examples, reject_ratio=r)})
    print(table(rows, [("run", "s"), ("reject_ratio", "g"), ("accuracy_backbone", ".4f"),
                       ("accuracy_mtp", ".4f")]))
    print("(accuracy_mtp is 0 at ratio 1: every MTP target is then a rejected PAD)")
    path = write("rejection_runs", {"stage": args.stage, "num_problems": args.num_problems,
                                    "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

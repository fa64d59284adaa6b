"""PIPO against the baseline a Qwen3.5 user already has, MTP-speculative decoding, and plain AR,
on one trained run (the same backbone), measured in one process (issue #16).

    python train.py                                   # the default run has the mtp stage
    python -m benchmarks.speculative --run runs/default
    # a competent AR base (the default's 200-step one is not), PIPO from the default run:
    python train.py run_dir=runs/ar800 stages=[ar,mtp] ar.steps=800
    python -m benchmarks.speculative --run runs/default --ar-run runs/ar800 --parts speed

* ``exact``: greedy speculative decoding with ``k`` = 1…4 drafts per round on the whole test
  split (``--problems``) against AR greedy: the outputs must be identical (its correctness),
  with the acceptance length (tokens per backbone pass) and the accepted fraction of drafts;
* ``speed``: AR, SPEC (each ``k``) and PIPO (threshold ``--threshold``) at batch 1 (TTFT, TPOT:
  best of ``--repeats`` per problem, median over problems) and throughput (real tokens/s of
  one ``generate`` call over ``16 × batch`` problems, at most ``--throughput-problems``) at 1,
  8 and 64 requests per static batch, ratios against AR, with accuracy and tokens per pass on
  the largest batch's problems.

Static batches for all three, so that the rows differ by decoder only (speculative decoding
has no continuous batching). Timings on a shared 2-core machine are noisy: compare the ratios
of one run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from benchmarks.common import table, write
from pipo_jax.data.arith import to_messages
from pipo_jax.data.loader import test_examples
from pipo_jax.decode.runner import PipoRunner, load
from pipo_jax.eval.heldout import time_requests
from pipo_jax.eval.scoring import verify


def _run(runner: PipoRunner, examples: list[dict], model: str,
         opts: dict[str, Any]) -> tuple[list[Any], float]:
    prompts = [to_messages(ex) for ex in examples]
    runner.generate(prompts[:opts.get("batch_size", 1)], model=model, **opts)  # compile
    t0 = time.perf_counter()
    gens = runner.generate(prompts, model=model, **opts)
    return gens, time.perf_counter() - t0


def exact_part(runner: PipoRunner, examples: list[dict], ks: list[int],
               batch: int) -> dict[str, Any]:
    opts = {"batching": "static", "batch_size": batch, "temperature": 0.0}
    ar, _ = _run(runner, examples, "ar", opts)
    rows = []
    for k in ks:
        spec, _ = _run(runner, examples, "spec", dict(opts, speculative_k=k))
        same = sum(a.tokens == s.tokens for a, s in zip(ar, spec, strict=True))
        drafts = sum(s.stats["drafts"] for s in spec)
        rows.append({
            "k": k, "identical": same, "problems": len(examples),
            "tokens_per_pass": sum(s.stats["tokens"] for s in spec)
            / sum(s.stats["backbone_passes"] for s in spec),
            "accepted_frac": sum(s.stats["commits"] for s in spec) / max(drafts, 1)})
        print(f"  k={k}: {same}/{len(examples)} identical to AR greedy, "
              f"{rows[-1]['tokens_per_pass']:.2f} tokens per pass", flush=True)
    print("\nGreedy MTP-speculative against AR greedy, whole split")
    print(table(rows, [("k", "d"), ("identical", "d"), ("problems", "d"),
                       ("tokens_per_pass", ".2f"), ("accepted_frac", ".3f")]))
    return {"rows": rows}


def speed_part(runner: PipoRunner, examples: list[dict], ks: list[int], threshold: float,
               timing_problems: int, repeats: int, batches: list[int]) -> dict[str, Any]:
    decoders = [("ar", {}), *[(f"spec_k{k}", {"speculative_k": k}) for k in ks],
                ("pipo", {"threshold": threshold})]
    rows = []
    for name, extra in decoders:
        model = name.split("_")[0]
        base = dict(extra, batching="static", temperature=0.0)
        r: dict[str, Any] = {"decoder": name}
        r.update(time_requests(runner, examples[:timing_problems], model, base, False, repeats))
        for b in batches:
            # 16 requests per slot, at most the whole set: batch 1 times 16 problems.
            subset = examples[:16 * b]
            gens, seconds = _run(runner, subset, model, dict(base, batch_size=b))
            r[f"tok/s@{b}"] = sum(g.stats["tokens"] for g in gens) / seconds
            if b == batches[-1]:
                r["pass@1"] = statistics.fmean(
                    verify(g.text, ex["answer"]) for g, ex in zip(gens, subset, strict=True))
                r["tokens_per_pass"] = sum(g.stats["tokens"] for g in gens) / sum(
                    g.stats["backbone_passes"] for g in gens)
        rows.append(r)
        print(f"  {name}: TPOT {r['tpot_ms']:.2f} ms, "
              + ", ".join(f"{r[f'tok/s@{b}']:.0f} tok/s @{b}" for b in batches), flush=True)
    ar = rows[0]
    for r in rows:
        r["tpot_x"] = ar["tpot_ms"] / r["tpot_ms"]
        r["ttft_x"] = ar["ttft_ms"] / r["ttft_ms"]
        for b in batches:
            r[f"thr_x@{b}"] = r[f"tok/s@{b}"] / ar[f"tok/s@{b}"]
    print("\nAR, MTP-speculative and PIPO on one backbone; x: against AR in this run")
    cols = [("decoder", "s"), ("pass@1", ".3f"), ("tokens_per_pass", ".2f"), ("ttft_ms", ".1f"),
            ("tpot_ms", ".2f"), ("tpot_x", ".2f")]
    cols += [(f"thr_x@{b}", ".2f") for b in batches]
    print(table(rows, cols))
    return {"rows": rows, "threshold": threshold, "batches": batches}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/default")
    p.add_argument("--ar-run", help="take the AR model and its MTP drafter from this run "
                   "instead (same architecture: e.g. an AR base trained longer, so that the "
                   "accuracy column means something)")
    p.add_argument("--parts", default="exact,speed")
    p.add_argument("--ks", default="1,2,3,4", help="exact: drafts per round")
    p.add_argument("--speed-ks", default="1,2,3,4", help="speed: drafts per round")
    p.add_argument("--problems", type=int, default=500, help="exact: test problems")
    p.add_argument("--throughput-problems", type=int, default=128)
    p.add_argument("--timing-problems", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--out")
    args = p.parse_args()
    runner = load(args.run, ar_run=args.ar_run)
    if runner.drafter_params is None or runner.ar_params is None:
        raise SystemExit(f"{args.run} needs its ar and mtp stages: python train.py "
                         f"run_dir={args.run} --stage ar --stage mtp")
    ks = [int(k) for k in args.ks.split(",")]
    result: dict[str, Any] = {"command": "python -m benchmarks.speculative " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)}
    if "exact" in args.parts:
        result["exact"] = exact_part(runner, test_examples(runner.config, args.problems), ks,
                                     64)
    if "speed" in args.parts:
        result["speed"] = speed_part(
            runner, test_examples(runner.config, args.throughput_problems),
            [int(k) for k in args.speed_ks.split(",")], args.threshold,
            args.timing_problems, args.repeats, [int(b) for b in args.batches.split(",")])
    print(f"wrote {write('speculative', result, args.out)}")


if __name__ == "__main__":
    main()

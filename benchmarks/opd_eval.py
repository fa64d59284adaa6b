"""OPD against SFT-only and the AR teacher, on held-out prompts (issue #5's results).

    python -m benchmarks.opd_eval --run runs/default

For the run's ``sft`` and ``opd`` PIPO checkpoints and its ``teacher``, on the first
``--num-problems`` problems of the test split (never trained on):

1. **Distillation quality on student rollouts.** Each student answers every problem
   ``--samples`` times with the OPD rollout decoder (temperature 1, gating off, the same jitted
   function as training). On those rollouts: the exact reverse KL ``KL(p_s ‖ p_t)`` to the
   teacher at backbone and MTP positions, the confidence head's mean prediction against the
   realised acceptance probability ``α = min(1, p_t(y)/p_s(y))`` of each drafted token, and the
   head's expected calibration error against ``α`` (10 equal-width bins).
2. **Accuracy vs speed.** ``decode`` at temperature 1 (optionally with ``--top-k`` /
   ``--top-p``, the paper's 20 / 0.95; ``--samples`` per problem: pass@1 is the mean over
   samples, pass@k the unbiased estimator) for every threshold of ``--thresholds``:
   accuracy, committed-token rate and real tokens per backbone pass (the speed-up over AR in
   backbone passes; AR is 1 by definition). The teacher (AR) is evaluated the same way.

Prints the tables, writes ``benchmarks/results/opd_eval.json`` and, with matplotlib installed
(``requirements-dev.txt``), the plot ``benchmarks/results/opd_accuracy_vs_speedup.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks.common import RESULTS, table, write
from pipo_jax import opd
from pipo_jax.api import PipoRunner, load
from pipo_jax.data import example_to_ids, test_examples
from pipo_jax.distill import (
    rollout_fn,
    rollout_prompts,
    rollout_scores,
    rollout_seeds,
    rollout_statistics,
)
from pipo_jax.evaluate import evaluate

STAGES = ("sft", "opd")


def rollout_quality(runner: PipoRunner, teacher: PipoRunner, examples: list[dict], samples: int,
                    batch: int, bins: int) -> dict[str, float]:
    """Section 1 of the module docstring for one student."""
    cfg, tok = runner.config, runner.tokenizer
    roll = rollout_fn(cfg, tok)
    stats = jax.jit(lambda p, tp, rows: rollout_statistics(
        p, tp, rows, cfg=cfg.model, teacher_cfg=teacher.ar_model, pad_id=tok.pad_id,
        eos_id=tok.eos_id))
    prompts = [example_to_ids(tok, ex)[0] for ex in examples for _ in range(samples)]
    answers = [ex["answer"] for ex in examples for _ in range(samples)]
    acc: dict[str, list[np.ndarray]] = {}
    scores = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        tokens, valid = rollout_prompts(cfg, tok, chunk)
        rows = roll(runner.params, tokens, valid, rollout_seeds(12345, start, len(chunk)))
        got = jax.device_get(stats(runner.params, teacher.ar_params, rows))
        for name in ("kl_backbone", "kl_mtp", "confidence", "acceptance"):
            mask = got["backbone" if name == "kl_backbone" else "mtp"]
            acc.setdefault(name, []).append(got[name][mask])
        scores.append(rollout_scores(tok, jax.device_get(rows), answers[start:start + batch]))
    flat = {k: np.concatenate(v) for k, v in acc.items()}
    ece = float(opd.expected_calibration_error(flat["confidence"], flat["acceptance"],
                                               np.ones_like(flat["confidence"], bool), bins))
    return {"kl_backbone": float(flat["kl_backbone"].mean()),
            "kl_mtp": float(flat["kl_mtp"].mean()),
            "confidence_mean": float(flat["confidence"].mean()),
            "acceptance_mean": float(flat["acceptance"].mean()),
            "ece": ece,
            "rollout_accuracy": float(np.mean([s["rollout_accuracy"] for s in scores])),
            "positions": int(flat["acceptance"].size)}


def sweep(runner: PipoRunner, examples: list[dict], thresholds: list[float], samples: int,
          batch: int, sampling: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for thr in thresholds:
        res = evaluate(runner, examples, samples=samples, models=("pipo",), timing_problems=0,
                       progress=False, threshold=thr, batch_size=batch, **sampling)["pipo"]
        rows.append({"threshold": thr, "pass@1": res["pass@1"],
                     f"pass@{samples}": res[f"pass@{samples}"],
                     "commit_rate": res["commit_rate"], "tokens_per_pass": res["tokens_per_pass"]})
        print(f"  {runner.stage} threshold {thr:g}: pass@1 {res['pass@1']:.3f} commit "
              f"{res['commit_rate']:.3f}", flush=True)
    return rows


def plot(result: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -r requirements-dev.txt)")
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for stage, marker in zip(STAGES, ("o", "s"), strict=True):
        rows = result["sweep"][stage]
        ax.plot([r["tokens_per_pass"] for r in rows], [100 * r["pass@1"] for r in rows],
                marker=marker, label=f"PIPO {stage.upper()}")
        # Thresholds that give the same point share one label ("-1,0.5,0.7").
        labels: dict[tuple[float, float], list[str]] = {}
        for r in rows:
            point = (r["tokens_per_pass"], 100 * r["pass@1"])
            labels.setdefault(point, []).append(f"{r['threshold']:g}")
        offset = (4, 4) if stage == "opd" else (4, -10)
        for point, names in labels.items():
            ax.annotate("τ " + ",".join(names), point, textcoords="offset points",
                        xytext=offset, fontsize=7)
    t = result["teacher"]
    ax.plot([1.0], [100 * t["pass@1"]], marker="*", markersize=12, linestyle="none",
            label="AR teacher")
    ax.set_xlim(0.9, 2.25)  # room for the labels right of the points near 2
    ax.set_xlabel("speed-up over AR in backbone passes (real tokens per pass)")
    sp = result["sampling"]
    how = "temperature 1" + (f", top-k {sp['top_k']}" if sp["top_k"] else "") + \
        (f", top-p {sp['top_p']:g}" if sp["top_p"] < 1 else "")
    ax.set_ylabel(f"pass@1 (%), {how}")
    ax.set_title(f"{result['num_problems']} held-out problems x {result['samples']} samples, "
                 f"{how}; labels: confidence threshold τ", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/default")
    p.add_argument("--num-problems", type=int, default=100)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--thresholds", default="-1,0.5,0.7,0.9,0.95,0.99,0.999")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--ece-bins", type=int, default=10)
    p.add_argument("--top-k", type=int, default=0,
                   help="decode sweep and teacher only (the paper's protocol: 20); rollouts "
                        "always sample the plain temperature-1 distribution")
    p.add_argument("--top-p", type=float, default=1.0, help="as --top-k (the paper: 0.95)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/opd_eval.json)")
    p.add_argument("--plot", help="PNG path (default benchmarks/results/"
                                  "opd_accuracy_vs_speedup.png)")
    args = p.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    sampling = {"temperature": 1.0, "top_k": args.top_k, "top_p": args.top_p}
    runners = {s: load(args.run, stage=s, ar_stage="teacher") for s in STAGES}
    teacher = runners["sft"]
    if teacher.ar_params is None:
        raise SystemExit(f"{args.run} has no teacher stage to compare with")
    examples = test_examples(teacher.config, args.num_problems)
    result: dict[str, Any] = {"run": args.run, "num_problems": len(examples),
                              "samples": args.samples, "sampling": sampling, "rollouts": {},
                              "sweep": {}}
    for stage, runner in runners.items():
        print(f"{stage}: rollouts", flush=True)
        result["rollouts"][stage] = rollout_quality(runner, teacher, examples, args.samples,
                                                    args.batch_size, args.ece_bins)
        result["sweep"][stage] = sweep(runner, examples, thresholds, args.samples,
                                       args.batch_size, sampling)
    t = evaluate(teacher, examples, samples=args.samples, models=("ar",), timing_problems=0,
                 progress=False, batch_size=args.batch_size, **sampling)["ar"]
    k = f"pass@{args.samples}"
    result["teacher"] = {"pass@1": t["pass@1"], k: t[k], "tokens_per_pass": 1.0}
    r = result["rollouts"]
    result["ratios"] = {"kl_backbone_opd/sft": r["opd"]["kl_backbone"] / r["sft"]["kl_backbone"],
                        "kl_mtp_opd/sft": r["opd"]["kl_mtp"] / r["sft"]["kl_mtp"]}

    print(f"\nStudent rollouts on {len(examples)} held-out problems x {args.samples} "
          f"(temperature 1, gating off), against the teacher:")
    cols = [("stage", "s"), ("kl_backbone", ".5f"), ("kl_mtp", ".5f"),
            ("confidence_mean", ".4f"), ("acceptance_mean", ".4f"), ("ece", ".4f"),
            ("rollout_accuracy", ".3f")]
    print(table([{"stage": s, **r[s]} for s in STAGES], cols))
    print(f"KL OPD/SFT: backbone {result['ratios']['kl_backbone_opd/sft']:.2f}x, "
          f"MTP {result['ratios']['kl_mtp_opd/sft']:.2f}x")
    print(f"\nThreshold sweep, decode with {sampling} ({args.samples} samples per problem):")
    cols = [("threshold", "g"), ("pass@1", ".3f"), (k, ".3f"), ("commit_rate", ".3f"),
            ("tokens_per_pass", ".3f")]
    for stage in STAGES:
        print(f"PIPO {stage.upper()}")
        print(table(result["sweep"][stage], cols))
    print(f"AR teacher: pass@1 {t['pass@1']:.3f}, {k} {t[k]:.3f}")
    path = write("opd_eval", result, args.out)
    print(f"wrote {path}")
    png = plot(result, Path(args.plot) if args.plot else RESULTS / "opd_accuracy_vs_speedup.png")
    if png:
        print(f"wrote {png}")


if __name__ == "__main__":
    main()

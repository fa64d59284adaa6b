"""OPD against SFT-only and the AR teacher, on held-out prompts (issue #5's results).

    python -m benchmarks.opd_eval --run runs/default

For the run's ``sft`` and ``opd`` PIPO checkpoints and its ``teacher``, on the first
``--num-problems`` problems of the test split (never trained on):

1. **Distillation quality on student rollouts.** Each student answers every problem
   ``--samples`` times with the OPD rollout decoder (temperature 1, gating off, the same jitted
   function as training). On those rollouts: the exact reverse KL ``KL(p_s ‖ p_t)`` to the
   teacher at backbone and MTP positions, the confidence head's mean prediction against the
   realised acceptance probability ``α = min(1, p_t(y)/p_s(y))`` of each drafted token, and how
   well the head predicts acceptance (``confidence_scores``): ECE (``--ece-bins`` equal-width
   bins) and Brier score against ``α``; AUROC and Brier against two binary labels, ``α ≥ 0.5``
   and "the teacher's sample at the position equals the draft" (drawn with probability
   ``p_t(y)``). On an easy task ``α ≈ 1`` nearly everywhere and the ECE is small whatever the
   head ranks; the AUROC says whether it scores the rejected drafts lower. The SFT student's
   head was trained against ``p_mtp(gold)`` (SPEC §4), the OPD one against ``α``: the same
   numbers on both show what OPD changed.
2. **Accuracy vs speed.** ``decode`` at temperature 1 (optionally with ``--top-k`` /
   ``--top-p``, the paper's 20 / 0.95; ``--samples`` per problem: pass@1 is the mean over
   samples, pass@k the unbiased estimator) for every threshold of ``--thresholds``:
   accuracy, committed-token rate and real tokens per backbone pass (the speed-up over AR in
   backbone passes; AR is 1 by definition). The teacher (AR) is evaluated the same way.

Prints the tables, writes ``benchmarks/results/opd_eval.json`` and, with matplotlib installed
(``requirements-dev.txt``), the plot ``benchmarks/results/opd_accuracy_vs_speedup.png`` and one
reliability diagram per student (confidence against ``α``), ``reliability_sft.png`` and
``reliability_opd.png`` beside the JSON (their paths are in it, ``rollouts.<stage>.
reliability_diagram``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import jax
import numpy as np

from benchmarks.common import RESULTS, pyplot, save_figure, table, write
from pipo_jax.data.loader import example_to_ids, test_examples
from pipo_jax.decode.runner import PipoRunner, load
from pipo_jax.eval.heldout import evaluate
from pipo_jax.train import calibration
from pipo_jax.train.opd import (
    rollout_fn,
    rollout_prompts,
    rollout_scores,
    rollout_seeds,
    rollout_statistics,
)

STAGES = ("sft", "opd")
# Seed of the teacher-sample labels (``confidence_scores``): the same labels on every run.
_LABEL_SEED = 20240613


def confidence_scores(flat: dict[str, np.ndarray], bins: int,
                      seed: int = _LABEL_SEED) -> dict[str, float]:
    """The confidence head against acceptance on drafted positions (host arrays ``flat``:
    ``confidence``, ``confidence_logit``, ``acceptance`` α, ``teacher_prob`` p_t(y)).

    ``ece`` (``bins`` bins) and ``brier`` against α; ``auroc`` and ``brier_alpha_0.5`` against
    the label α ≥ 0.5 (``alpha_below_0.5``: its share of negatives); ``auroc_teacher_sample``
    and ``brier_teacher_sample`` against the label "a sample of the teacher equals the draft",
    drawn as ``u < p_t(y)`` with ``u ~ U(0, 1)`` (``seed``): distributed exactly as ``1[y_t = y]``
    for ``y_t ~ p_t`` without sampling the vocabulary (``teacher_prob_mean``: its expected
    positive rate). AUROCs rank the logits (no ties from saturated sigmoids); NaN when a label
    has one class.
    """
    conf, logit, alpha = flat["confidence"], flat["confidence_logit"], flat["acceptance"]
    accepted = alpha >= 0.5
    matched = np.random.default_rng(seed).random(alpha.shape) < flat["teacher_prob"]
    every = np.ones_like(conf, bool)
    return {"ece": float(calibration.expected_calibration_error(conf, alpha, every, bins)),
            "brier": float(calibration.brier_score(conf, alpha)),
            "auroc": float(calibration.auroc(logit, accepted)),
            "brier_alpha_0.5": float(calibration.brier_score(conf, accepted)),
            "alpha_below_0.5": float(np.mean(~accepted)),
            "auroc_teacher_sample": float(calibration.auroc(logit, matched)),
            "brier_teacher_sample": float(calibration.brier_score(conf, matched)),
            "teacher_prob_mean": float(flat["teacher_prob"].mean())}


def rollout_quality(runner: PipoRunner, teacher: PipoRunner, examples: list[dict], samples: int,
                    batch: int, bins: int, diagram: Path | None = None) -> dict[str, Any]:
    """Section 1 of the module docstring for one student; with ``diagram``, its reliability
    diagram (confidence against α) is drawn there when matplotlib is installed."""
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
        for name in ("kl_backbone", "kl_mtp", "confidence", "confidence_logit", "acceptance",
                     "teacher_prob"):
            mask = got["backbone" if name == "kl_backbone" else "mtp"]
            acc.setdefault(name, []).append(got[name][mask])
        scores.append(rollout_scores(tok, jax.device_get(rows), answers[start:start + batch]))
    flat = {k: np.concatenate(v) for k, v in acc.items()}
    conf = confidence_scores(flat, bins)
    png = None
    if diagram is not None:
        png = plot_diagram(flat["confidence"], flat["acceptance"], diagram, bins, conf,
                           f"PIPO {runner.stage.upper()}: confidence vs α on its rollouts "
                           f"({flat['acceptance'].size} drafts)")
    return {"kl_backbone": float(flat["kl_backbone"].mean()),
            "kl_mtp": float(flat["kl_mtp"].mean()),
            "confidence_mean": float(flat["confidence"].mean()),
            "acceptance_mean": float(flat["acceptance"].mean()),
            **conf,
            "rollout_accuracy": float(np.mean([s["rollout_accuracy"] for s in scores])),
            "positions": int(flat["acceptance"].size),
            "reliability_diagram": None if png is None else _shown(png)}


def _shown(path: Path) -> str:
    """``path`` relative to the working directory where it lies below it (the JSON stays the
    same from machine to machine), else absolute."""
    path = path.resolve()
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def plot_diagram(conf: np.ndarray, alpha: np.ndarray, path: Path, bins: int,
                 scores: dict[str, float], title: str) -> Path | None:
    """``calibration.plot_reliability`` with the headline scores, or None without matplotlib."""
    try:
        return calibration.plot_reliability(
            conf, alpha, path, bins=bins, title=title,
            scores={"ECE": scores["ece"], "Brier": scores["brier"],
                    "AUROC α≥0.5": scores["auroc"],
                    "AUROC teacher sample": scores["auroc_teacher_sample"]})
    except ImportError:
        print("matplotlib is not installed: no reliability diagram "
              "(pip install -r requirements-dev.txt)")
        return None


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
    plt = pyplot()
    if plt is None:
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
    return save_figure(fig, path)


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
    out_dir = Path(args.out).parent if args.out else RESULTS
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
        result["rollouts"][stage] = rollout_quality(
            runner, teacher, examples, args.samples, args.batch_size, args.ece_bins,
            diagram=out_dir / f"reliability_{stage}.png")
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
    print("Confidence head against acceptance (AUROC: label α ≥ 0.5 / teacher's sample = draft):")
    cols = [("stage", "s"), ("auroc", ".4f"), ("auroc_teacher_sample", ".4f"), ("brier", ".5f"),
            ("brier_teacher_sample", ".4f"), ("alpha_below_0.5", ".4f"),
            ("teacher_prob_mean", ".4f")]
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
    for stage in STAGES:
        if r[stage]["reliability_diagram"]:
            print(f"wrote {r[stage]['reliability_diagram']}")
    png = plot(result, Path(args.plot) if args.plot else RESULTS / "opd_accuracy_vs_speedup.png")
    if png:
        print(f"wrote {png}")


if __name__ == "__main__":
    main()

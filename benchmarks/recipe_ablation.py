"""PAD-augmentation and gated-OPD ablation on one task, in one run (issue #13's results).

    python -m benchmarks.recipe_ablation --run runs/default

Starting from the run's ``teacher`` and student ``ar`` stages (which every arm shares), trains:

* ``sft:split`` / ``sft:shift`` / ``sft:mix``: PIPO SFT with each ``sft.pad_augment`` mode, the
  run's SFT steps and every other setting (``pad_dense_frac`` included) unchanged;
* ``sft:<mode>-dense<f>`` and ``opd:gated-dense<f>`` (with ``--dense-frac f``): SFT in the run's
  own mode with ``sft.pad_dense_frac = f`` (``-no-dense`` when ``f`` is 0 and the run has dense
  rows), and gated OPD from it: what dense rows of rejections do at thresholds near 1;
* ``opd:ungated`` / ``opd:gated``: OPD from the SFT student of the run's own ``pad_augment``,
  rollouts with gating off (``opd.rollout_threshold = -1``) or at ``--gated-threshold``
  (default: the run's own gated threshold, else 0.9);
* ``opd:gated-from-split`` (with ``--with-split-opd``): gated OPD from the ``split`` student, the
  recipe whose rollouts ran away before issue #13;
* ``opd:per-row`` (with ``--per-row-thresholds 0.9,0.99``, or when the run sets
  ``opd.rollout_thresholds``: the run's own): OPD whose rollout row ``i`` is gated at the
  ``i mod n``-th of these thresholds, so that the states of high thresholds are trained
  on-policy too. ``opd:gated`` is then the single-threshold control.

An arm whose settings equal the run's own stage reuses that stage's checkpoints (a symlink), so
the default run's ``sft`` and ``opd`` are not trained twice. Arms live under ``--out-dir``
(default ``<run>/ablation``); a finished arm is not retrained.

Every arm is then measured on the first ``--num-problems`` held-out problems: pass@1 at
temperature 1 (``--samples`` per problem) and the committed-token rate / real tokens per backbone
pass at every threshold of ``--thresholds``; greedy pass@1 at ``--greedy-thresholds``; and, for
SFT arms, the teacher-forced top-1 accuracy of the backbone and of the MTP head on the held-out
responses (no augmentation). The AR teacher is one point (1 token per pass).

Prints one table, writes ``benchmarks/results/recipe_ablation.json`` and the plot
``benchmarks/results/recipe_ablation.png`` (accuracy against tokens per pass, a curve per arm).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import RESULTS, pyplot, save_figure, table, write
from benchmarks.opd_eval import sweep
from pipo_jax.config import Config, config_from_json
from pipo_jax.data.loader import example_to_ids, test_examples
from pipo_jax.decode.runner import PipoRunner, load
from pipo_jax.eval.heldout import evaluate
from pipo_jax.io import checkpoint as ckpt
from pipo_jax.model import pairs
from pipo_jax.model.pipo import PipoLM
from pipo_jax.train import losses
from pipo_jax.train.pipeline import train

MODES = ("split", "shift", "mix")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One recipe: SFT with ``pad_augment`` and ``pad_dense_frac``; then OPD with
    ``rollout_threshold`` unless None."""

    name: str
    pad_augment: str
    pad_dense_frac: float
    rollout_threshold: float | None = None
    rollout_thresholds: tuple[float, ...] = ()

    @property
    def stage(self) -> str:
        return "sft" if self.rollout_threshold is None else "opd"


def arms(base: Config, gated: float, with_split_opd: bool, per_row: tuple[float, ...] = (),
         dense_frac: float | None = None) -> list[Arm]:
    own, dense = base.sft.pad_augment, base.sft.pad_dense_frac
    out = [Arm(f"sft:{m}", m, dense) for m in MODES]
    out += [Arm("opd:ungated", own, dense, -1.0), Arm("opd:gated", own, dense, gated)]
    if dense_frac is not None and dense_frac != dense:
        tag = f"dense{dense_frac:g}" if dense_frac > 0 else "no-dense"
        out += [Arm(f"sft:{own}-{tag}", own, dense_frac),
                Arm(f"opd:gated-{tag}", own, dense_frac, gated)]
    if with_split_opd and own != "split":
        out.append(Arm("opd:gated-from-split", "split", dense, gated))
    per_row = per_row or base.opd.rollout_thresholds
    if per_row:
        out.append(Arm("opd:per-row", own, dense, gated, per_row))
    return out


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(target.resolve(), link.parent.resolve()), link)


def prepare_arm(base_run: Path, base: Config, arm: Arm, out_dir: Path) -> Path:
    """Trains ``arm`` (or links the base run's stage when it is the same recipe); returns the
    arm's run directory (with ``teacher``, ``ar``, ``sft`` and, for OPD arms, ``opd``)."""
    sft_dir = out_dir / f"sft-{arm.pad_augment}-d{arm.pad_dense_frac:g}"
    for shared in ("teacher", "ar"):
        _link(base_run / shared, sft_dir / shared)
    own_sft = (arm.pad_augment == base.sft.pad_augment
               and arm.pad_dense_frac == base.sft.pad_dense_frac)
    if own_sft:
        _link(base_run / "sft", sft_dir / "sft")
    sft_cfg = dataclasses.replace(base.sft, pad_augment=arm.pad_augment,
                                  pad_dense_frac=arm.pad_dense_frac)
    cfg = dataclasses.replace(base, run_dir=str(sft_dir), stages=("sft",), sft=sft_cfg)
    train(cfg, progress=True)
    if arm.rollout_threshold is None:
        return sft_dir
    thr = arm.rollout_threshold
    gates = "-".join(f"{t:g}" for t in arm.rollout_thresholds) if arm.rollout_thresholds \
        else f"{thr:g}"
    run = out_dir / f"opd-{arm.pad_augment}-d{arm.pad_dense_frac:g}-t{gates}"
    for shared in ("teacher", "ar", "sft"):
        _link(sft_dir / shared, run / shared)
    same_as_base = (own_sft and thr == base.opd.rollout_threshold
                    and arm.rollout_thresholds == base.opd.rollout_thresholds
                    and ckpt.latest_step(base_run / "opd") is not None)
    if same_as_base:
        _link(base_run / "opd", run / "opd")
    cfg = dataclasses.replace(base, run_dir=str(run), stages=("opd",),
                              opd=dataclasses.replace(base.opd, rollout_threshold=thr,
                                                      rollout_thresholds=arm.rollout_thresholds,
                                                      student_dir="", teacher_dir=""),
                              sft=sft_cfg)
    train(cfg, progress=True)
    return run


def heldout_teacher_forced(runner: PipoRunner, examples: list[dict], batch: int = 50,
                           reject_ratio: float = 0.0, seed: int = 0) -> dict[str, float]:
    """Top-1 accuracy of the backbone and the MTP head, teacher-forced on held-out responses
    (pair sequences with parity PADs): how often the drafted second token is the gold one when
    the context is right. With ``reject_ratio > 0`` every response pair is a rejected draft
    with that probability (``shift`` augmentation; 1: every pair ``(x, PAD)``, the τ = 1 state),
    and rows are never truncated."""
    cfg, tok = runner.config, runner.tokenizer
    rng = np.random.default_rng(seed)
    seqs = [pairs.build_pair_sequence(*example_to_ids(tok, ex), tok.pad_id) for ex in examples]
    if reject_ratio > 0:
        seqs = [pairs.random_pad_augment(t, m, reject_ratio, rng, tok.pad_id, "shift")
                for t, m in seqs]
    length = max(cfg.data.max_len, *(len(t) for t, _ in seqs))
    fwd = jax.jit(lambda p, t, m: losses.sft_loss(
        PipoLM(cfg.model, True).apply({"params": p}, t), p["embedder"]["embedding"], t, m,
        cfg.sft)[1])
    sums = {"accuracy_backbone": 0.0, "accuracy_mtp": 0.0}
    counts = {"accuracy_backbone": 0, "accuracy_mtp": 0}
    for start in range(0, len(seqs), batch):
        rows = [pairs.fit_to_length(t, m, length, tok.pad_id) for t, m in seqs[start:start + batch]]
        t = jnp.asarray(np.stack([r[0] for r in rows]))
        m = jnp.asarray(np.stack([r[1] for r in rows]))
        got = jax.device_get(fwd(runner.params, t, m))
        n_bb, n_mtp = int(m[:, 2::2].sum()), int(m[:, 3::2].sum())
        sums["accuracy_backbone"] += float(got["accuracy_backbone"]) * n_bb
        sums["accuracy_mtp"] += float(got["accuracy_mtp"]) * n_mtp
        counts["accuracy_backbone"] += n_bb
        counts["accuracy_mtp"] += n_mtp
    return {k: sums[k] / max(counts[k], 1) for k in sums}


def measure(runner: PipoRunner, examples: list[dict], thresholds: list[float],
            greedy_thresholds: list[float], samples: int, batch: int) -> list[dict[str, Any]]:
    """``opd_eval.sweep`` at temperature 1, plus greedy pass@1 at ``greedy_thresholds``."""
    rows = sweep(runner, examples, thresholds, samples, batch,
                 {"temperature": 1.0, "top_k": 0, "top_p": 1.0})
    for row in rows:
        if row["threshold"] in greedy_thresholds:
            g = evaluate(runner, examples, models=("pipo",), timing_problems=0, progress=False,
                         threshold=row["threshold"], batch_size=batch, temperature=0.0)["pipo"]
            row.update(greedy=g["pass@1"], greedy_tokens_per_pass=g["tokens_per_pass"])
    return rows


def plot(result: dict[str, Any], path: Path) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7.0, 4.6))
    markers = itertools.cycle("osD^v<>Px")  # as many arms as there are, never truncated
    for (name, arm), marker in zip(result["arms"].items(), markers, strict=False):
        rows = sorted(arm["sweep"], key=lambda r: r["tokens_per_pass"])
        ax.plot([r["tokens_per_pass"] for r in rows], [100 * r["pass@1"] for r in rows],
                marker=marker, label=name, alpha=0.85)
    t = result["teacher"]
    ax.plot([1.0], [100 * t["pass@1"]], marker="*", markersize=13, linestyle="none",
            color="k", label="AR teacher")
    ax.set_xlabel("real tokens per backbone pass (speed-up over AR in passes)")
    ax.set_ylabel("pass@1 (%), temperature 1")
    ax.set_title(f"{result['num_problems']} held-out problems x {result['samples']} samples; "
                 f"one point per threshold τ in {result['thresholds']}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/default")
    p.add_argument("--out-dir", help="where the arms are trained (default <run>/ablation)")
    p.add_argument("--num-problems", type=int, default=100)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--thresholds", default="-1,0.5,0.7,0.8,0.9,0.95,0.99,1")
    p.add_argument("--greedy-thresholds", default="-1,0.9,1",
                   help="thresholds also decoded greedily")
    p.add_argument("--gated-threshold", type=float,
                   help="rollout threshold of the gated OPD arm (default: the run's own when "
                        "gated, else 0.9)")
    p.add_argument("--with-split-opd", action="store_true",
                   help="also train gated OPD from the split-augmented SFT student")
    p.add_argument("--dense-frac", type=float,
                   help="also train SFT (and gated OPD from it) with this sft.pad_dense_frac")
    p.add_argument("--per-row-thresholds",
                   help="also train OPD with these per-row rollout thresholds, e.g. 0.9,0.99,1")
    p.add_argument("--arms", help="comma-separated subset of arm names to run")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--out", help="JSON path (default benchmarks/results/recipe_ablation.json)")
    p.add_argument("--plot", help="PNG path (default benchmarks/results/recipe_ablation.png)")
    args = p.parse_args()
    base_run = Path(args.run)
    if not (base_run / "config.json").is_file():
        raise SystemExit(f"{base_run} is not a run directory (no config.json): train it first "
                         f"with `python train.py run_dir={base_run}`")
    base = config_from_json(base_run / "config.json")
    for needed in ("teacher", "ar"):
        if ckpt.latest_step(base_run / needed) is None:
            raise SystemExit(f"{base_run} has no trained {needed} stage: run `python train.py "
                             f"run_dir={base_run} --stage {needed}` first")
    gated = args.gated_threshold
    if gated is None:
        gated = base.opd.rollout_threshold if base.opd.rollout_threshold >= 0 else 0.9
    per_row = tuple(float(t) for t in args.per_row_thresholds.split(",")) \
        if args.per_row_thresholds else ()
    todo = arms(base, gated, args.with_split_opd, per_row, args.dense_frac)
    if args.arms:
        wanted = set(args.arms.split(","))
        unknown = wanted - {a.name for a in todo}
        if unknown:
            raise SystemExit(f"unknown arm(s) {sorted(unknown)}; choose from "
                             f"{[a.name for a in todo]}")
        todo = [a for a in todo if a.name in wanted]
    thresholds = [float(t) for t in args.thresholds.split(",")]
    greedy = [float(t) for t in args.greedy_thresholds.split(",")] if args.greedy_thresholds \
        else []
    out_dir = Path(args.out_dir) if args.out_dir else base_run / "ablation"
    examples = test_examples(base, args.num_problems)
    result: dict[str, Any] = {"run": str(base_run), "num_problems": len(examples),
                              "samples": args.samples, "thresholds": thresholds,
                              "gated_threshold": gated, "default_pad_augment":
                              base.sft.pad_augment, "arms": {}}
    for arm in todo:
        print(f"{arm.name}: training", flush=True)
        run = prepare_arm(base_run, base, arm, out_dir)
        runner = load(run, stage=arm.stage, ar_stage="teacher")
        print(f"{arm.name}: measuring", flush=True)
        entry: dict[str, Any] = {"run_dir": str(run), "stage": arm.stage,
                                 "pad_augment": arm.pad_augment,
                                 "pad_dense_frac": arm.pad_dense_frac,
                                 "rollout_threshold": arm.rollout_threshold,
                                 "rollout_thresholds": list(arm.rollout_thresholds)}
        entry["teacher_forced"] = heldout_teacher_forced(runner, examples)
        entry["sweep"] = measure(runner, examples, thresholds, greedy, args.samples,
                                 args.batch_size)
        result["arms"][arm.name] = entry
    teacher = load(base_run, stage="sft", ar_stage="teacher")
    t = evaluate(teacher, examples, samples=args.samples, models=("ar",), timing_problems=0,
                 progress=False, batch_size=args.batch_size, temperature=1.0)["ar"]
    g = evaluate(teacher, examples, models=("ar",), timing_problems=0, progress=False,
                 batch_size=args.batch_size, temperature=0.0)["ar"]
    k = f"pass@{args.samples}"
    result["teacher"] = {"pass@1": t["pass@1"], k: t[k], "greedy": g["pass@1"],
                         "tokens_per_pass": 1.0}

    rows = [{"arm": name, **r} for name, arm in result["arms"].items() for r in arm["sweep"]]
    cols = [("arm", "s"), ("threshold", "g"), ("pass@1", ".3f"), (k, ".3f"), ("greedy", ".3f"),
            ("commit_rate", ".3f"), ("tokens_per_pass", ".2f")]
    print(f"\n{len(examples)} held-out problems, temperature 1 ({args.samples} samples) and "
          f"greedy:")
    print(table(rows, cols))
    print(f"AR teacher: pass@1 {t['pass@1']:.3f}, {k} {t[k]:.3f}, greedy {g['pass@1']:.3f} "
          f"(1 token per pass)")
    print("\nTeacher-forced top-1 on held-out responses:")
    print(table([{"arm": n, **a["teacher_forced"]} for n, a in result["arms"].items()],
                [("arm", "s"), ("accuracy_backbone", ".4f"), ("accuracy_mtp", ".4f")]))
    path = write("recipe_ablation", result, args.out)
    print(f"wrote {path}")
    png = plot(result, Path(args.plot) if args.plot else RESULTS / "recipe_ablation.png")
    if png:
        print(f"wrote {png}")


if __name__ == "__main__":
    main()

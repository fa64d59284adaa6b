"""Evaluation of PIPO against its AR baseline on the embedded task's test split.

Both models answer the same prompts with the same sampling settings and the same budget of
real (non-PAD) tokens. Accuracy is pass@1 (mean over samples) and pass@k with the unbiased
estimator; speed is time to first token (TTFT) and time per output token (TPOT), measured at
batch 1 after a warm-up call so that compilation is not timed.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pipo_jax.data.arith import to_messages
from pipo_jax.decode.runner import PipoRunner
from pipo_jax.eval.aggregate import aggregate
from pipo_jax.eval.scoring import verify
from pipo_jax.io.diskerrors import reporting

MODELS = ("pipo", "ar", "spec")  # table order; ratios are against "ar"


def _accuracy(runner: PipoRunner, examples: Sequence[dict], model: str, samples: int,
              options: dict[str, Any], progress: bool) -> dict[str, Any]:
    requests = [ex for ex in examples for _ in range(samples)]
    prompts = [to_messages(ex) for ex in requests]
    seeds = [options.get("seed", 0) + 1000 * i + s for i in range(len(examples))
             for s in range(samples)]
    # One call: continuous batching keeps every slot busy across the whole split.
    outs = runner.generate(prompts, model=model, seeds=seeds, progress=progress, **options)
    correct = [verify(o.text, ex["answer"]) for o, ex in zip(outs, requests, strict=True)]
    per_q = [sum(correct[i * samples:(i + 1) * samples]) for i in range(len(examples))]
    metrics = aggregate(per_q, samples, [o.stats for o in outs])
    return {
        "pass@1": metrics.pop(f"avg@{samples}"),
        **metrics,
        "samples": [{"question": examples[i // samples]["question"], "text": o.text,
                     "correct": correct[i], **o.stats} for i, o in enumerate(outs)],
    }


def time_requests(runner: PipoRunner, examples: Sequence[dict], model: str, options: dict[str, Any],
            progress: bool, repeats: int) -> dict[str, float]:
    """TTFT and TPOT at batch 1, after one untimed warm-up.

    Each problem runs ``repeats`` times and keeps its fastest prefill and decode (the run least
    disturbed by other work on the machine); the result is the median over problems.
    """
    opts = dict(options, batch_size=1)
    runner.generate(to_messages(examples[0]), model=model, **opts)  # compile
    ttft, tpot = [], []
    for ex in tqdm(examples, desc=f"{model} timing", disable=not progress, unit="prompt"):
        runs = [runner.generate(to_messages(ex), model=model, return_timing=True, **opts)
                for _ in range(repeats)]
        gen = runs[0][0][0]
        ttft.append(min(t.prefill for _, (t,) in runs))
        if gen.stats["tokens"] > 1:
            tpot.append(min(t.decode for _, (t,) in runs) / (gen.stats["tokens"] - 1))
    return {"ttft_ms": 1e3 * statistics.median(ttft),
            "tpot_ms": 1e3 * statistics.median(tpot) if tpot else float("nan")}


def evaluate(runner: PipoRunner, examples: Sequence[dict], *, samples: int = 1,
             timing_problems: int = 8, timing_repeats: int = 3, models: Sequence[str] = MODELS,
             progress: bool = True, **options: Any) -> dict[str, Any]:
    """Accuracy and speed of each model on ``examples``, plus PIPO/AR ratios.

    ``options`` are ``DecodeConfig`` fields (threshold, temperature, top_k, top_p,
    presence_penalty, max_new_tokens, batch_size, seed).
    """
    if not examples:
        raise ValueError("no examples to evaluate")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    result: dict[str, Any] = {"num_problems": len(examples), "samples": samples,
                              "options": {k: v for k, v in options.items() if v is not None}}
    for model in models:
        res = _accuracy(runner, examples, model, samples, options, progress)
        if timing_problems > 0:
            res.update(time_requests(runner, examples[:timing_problems], model, options, progress,
                               timing_repeats))
        result[model] = res
    for model, key in (("pipo", "ratios"), ("spec", "spec_ratios")):
        if model in result and "ar" in result and timing_problems > 0:
            p, a = result[model], result["ar"]
            result[key] = {"tpot_speedup": a["tpot_ms"] / p["tpot_ms"],
                           "ttft_speedup": a["ttft_ms"] / p["ttft_ms"],
                           "pass@1_diff_points": 100 * (p["pass@1"] - a["pass@1"])}
    return result


ROWS = (("pass@1", "{:.3f}"), ("pass@k", "{:.3f}"), ("commit_rate", "{:.3f}"),
        ("tokens_per_pass", "{:.2f}"), ("mean_tokens", "{:.1f}"), ("ttft_ms", "{:.2f}"),
        ("tpot_ms", "{:.3f}"))
# Rows whose ratio column is AR's value over the model's (times), not the model's over AR's.
_TIMES = ("ttft_ms", "tpot_ms")


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of ``evaluate``'s result: a column per model (PIPO, AR, SPEC) and,
    with AR, a speed-up column per other model (``X/AR``: AR's time over X's, X's tokens per
    pass over AR's). ``commit_rate`` is SPEC's draft acceptance rate. Throughput at several
    batch sizes is ``benchmarks/speculative.py``'s (it needs warmed-up programs)."""
    k = result["samples"]
    models = [m for m in MODELS if m in result]
    others = [m for m in models if m != "ar"] if "ar" in models else []
    lines = [f"{'metric':<18}" + "".join(f"{m.upper():>12}" for m in models)
             + "".join(f"{m.upper() + '/AR':>12}" for m in others)]
    for name, fmt in ROWS:
        key = f"pass@{k}" if name == "pass@k" else name
        if (name == "pass@k" and k == 1) or not all(key in result[m] for m in models):
            continue
        vals = {m: result[m][key] for m in models}
        row = f"{key:<18}" + "".join(f"{fmt.format(v):>12}" for v in vals.values())
        if name in _TIMES:
            row += "".join(f"{vals['ar'] / vals[m]:>11.2f}x" for m in others)
        elif name == "tokens_per_pass":
            row += "".join(f"{vals[m] / vals['ar']:>11.2f}x" for m in others)
        lines.append(row)
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: str | Path,
               elsewhere: str = "write elsewhere") -> None:
    """Writes ``result`` as JSON; a full or read-only disk raises ``StorageError`` (one line
    with the path and the free space, then "free space or ``elsewhere``")."""
    with reporting(path, "write the results to", elsewhere):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")

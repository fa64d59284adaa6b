"""Evaluates a run's models on benchmark files, resumably, and summarises the results.

For each (benchmark, model) the questions not yet in the result file (``store.ResultFile``) are
decoded in chunks of whole questions, ``samples`` requests each, and every chunk's records are
appended as soon as it finishes. Request seeds come from ``protocol.sample_seed`` (question id,
sample index), so resumed results equal uninterrupted ones: bit for bit when the chunks line up
(an interrupt always falls between chunks; ``max_questions`` that is not a multiple of the chunk
size can shift them), otherwise up to the floating-point differences of other batch shapes.

Metrics per (benchmark, model), with ``k`` = samples per question (PAPER §4):

- ``avg@k``: mean over questions of the fraction of correct samples (mean per-sample accuracy);
- ``pass@k``: the unbiased estimator of Chen et al. (``aggregate.pass_at_k``) at ``k`` = the
  number of samples, where it equals the paper's empirical pass@k (the fraction of questions with
  at least one correct sample);
- ``mean_tokens``: real (non-PAD) tokens per response; ``commit_rate``: committed drafts / drafts
  (PIPO; 0 for AR); ``tokens_per_pass``: real tokens per backbone pass; ``finished_rate``: the
  fraction of responses that ended with EOS within the budget; ``answered_rate``: the fraction
  with an extractable answer.

``overall`` is the plain mean over benchmarks of each model's ``avg@k`` and ``pass@k``.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pipo_jax.config import DecodeConfig
from pipo_jax.decode import engine as dec
from pipo_jax.decode.runner import PROMPT_BUCKET, Generation, PipoRunner
from pipo_jax.eval.aggregate import aggregate, pass_at_k
from pipo_jax.eval.code import score_code
from pipo_jax.eval.heldout import write_json
from pipo_jax.eval.protocol import sample_seed
from pipo_jax.eval.schema import BenchError, Benchmark, Question, to_messages
from pipo_jax.eval.scoring import score
from pipo_jax.eval.store import ResultFile, result_path
from pipo_jax.io import checkpoint as ckpt

SUMMARY_FILE = "summary.json"


def result_header(bench: Benchmark, model: str, samples: int, decode: DecodeConfig,
                  run_dir: str | Path | None, step: int | None,
                  system_prompt: str, stage: str | None = None) -> dict[str, Any]:
    """What decides a result file's contents; a file is resumed only under an equal header.

    The batch size is left out (it does not change a request's samples, up to floating-point
    noise), and so is the threshold for AR, which never drafts.
    """
    header = {"benchmark": bench.name, "benchmark_sha256": bench.sha256, "model": model,
              "run": None if run_dir is None else str(Path(run_dir).resolve()), "stage": stage,
              "step": step,
              "samples": samples, "system_prompt": system_prompt,
              "max_new_tokens": decode.max_new_tokens, "temperature": decode.temperature,
              "top_k": decode.top_k, "top_p": decode.top_p,
              "presence_penalty": decode.presence_penalty, "seed": decode.seed}
    if model == "pipo":
        header["threshold"] = decode.threshold
    return header


def _prompt_error(runner: PipoRunner, q: Question, max_new_tokens: int) -> str | None:
    ids = runner.encode_prompt(to_messages(q))
    try:
        dec.prepare_prompts([ids], True, runner.tokenizer.pad_id, PROMPT_BUCKET,
                            max_new_tokens, runner.config.model.max_context)
    except dec.PromptError as e:
        return str(e)
    return None


def fit_context(runner: PipoRunner, q: Question, max_new_tokens: int) -> tuple[Question, int]:
    """``(q, context tokens dropped)``: a question with a ``context`` whose prompt and budget
    exceed the model's context gets the context cut in the middle, as LongBench truncates, to the
    most tokens that fit (its first half and its last half kept; binary search over the kept
    count, since tokens re-encode across the cut). Other questions come back unchanged."""
    if q.context is None or _prompt_error(runner, q, max_new_tokens) is None:
        return q, 0
    tok = runner.tokenizer
    ids = tok.encode(q.context)

    def cut(keep: int) -> Question:
        head, tail = ids[:keep // 2], ids[len(ids) - (keep - keep // 2):] if keep else []
        return dataclasses.replace(q, context=tok.decode(head) + tok.decode(tail))

    lo, hi = 0, len(ids) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _prompt_error(runner, cut(mid), max_new_tokens) is None:
            lo = mid
        else:
            hi = mid - 1
    fitted = cut(lo)
    error = _prompt_error(runner, fitted, max_new_tokens)
    if error is not None:
        raise BenchError(f"{q.source}:{q.line}: question {q.id!r}: even without its context, "
                         f"{error}")
    return fitted, len(ids) - lo


def check_prompt_lengths(runner: PipoRunner, questions: Sequence[Question],
                         max_new_tokens: int) -> tuple[list[Question], dict[str, int]]:
    """Fits every question's context (``fit_context``) and refuses, before decoding anything, a
    question whose prompt and budget exceed the model's context (the error names its file and
    line); returns the questions to pose and the context tokens dropped per question id."""
    fitted, dropped = [], {}
    for q in questions:
        if q.context is not None:  # fit_context returns a question that fits, or raises
            q, n = fit_context(runner, q, max_new_tokens)
            if n:
                dropped[q.id] = n
        else:
            error = _prompt_error(runner, q, max_new_tokens)
            if error is not None:
                raise BenchError(f"{q.source}:{q.line}: question {q.id!r}: {error}")
        fitted.append(q)
    return fitted, dropped


def score_sample(q: Question, text: str) -> dict[str, Any]:
    """One sample's ``extracted``, ``correct`` and, for code, its per-test outcomes."""
    if q.kind == "code":
        assert q.tests is not None and q.limits is not None
        code, correct, tests = score_code(text, q.tests, q.limits)
        return {"extracted": code, "correct": correct, "tests": tests}
    extracted, correct = score(text, q.kind, q.answer, q.num_choices)
    return {"extracted": extracted, "correct": correct}


def question_record(q: Question, gens: Sequence[Generation], seeds: Sequence[int],
                    context_tokens_dropped: int = 0) -> dict[str, Any]:
    """One result line: the question's id, reference, per-question metrics and its samples
    (with ``tags`` and ``context_tokens_dropped`` when the question has them)."""
    samples = []
    for gen, seed in zip(gens, seeds, strict=True):
        samples.append({"seed": seed, "text": gen.text, **score_sample(q, gen.text),
                        "stats": gen.stats})
    num_correct = sum(s["correct"] for s in samples)
    record = {"id": q.id, "answer": q.answer, "num_correct": num_correct,
              "accuracy": num_correct / len(samples), "any_correct": num_correct > 0,
              "samples": samples}
    if q.tags:
        record["tags"] = dict(q.tags)
    if q.context is not None:
        record["context_tokens_dropped"] = context_tokens_dropped
    return record


def evaluate_questions(runner: PipoRunner, questions: Sequence[Question], model: str,
                       samples: int, decode: DecodeConfig, store: ResultFile,
                       progress: bool = True, desc: str = "",
                       dropped: dict[str, int] | None = None) -> None:
    """Decodes the questions not yet in ``store`` and appends each one's record as soon as its
    last sample finishes: one ``generate`` call for all of them (continuous batching keeps the
    slots busy, a question's samples share one prefill), resumable at any point."""
    pending = [q for q in questions if q.id not in store.done]
    options = {f.name: getattr(decode, f.name) for f in dataclasses.fields(DecodeConfig)
               if f.name != "seed"}  # seeds are given per request
    prompts = [to_messages(q) for q in pending for _ in range(samples)]
    seeds = [sample_seed(decode.seed, q.id, s) for q in pending for s in range(samples)]
    got: dict[int, dict[int, Generation]] = {}
    with tqdm(total=len(questions), initial=len(questions) - len(pending), desc=desc,
              unit="question", disable=not progress) as bar:

        def on_done(i: int, gen: Generation) -> None:
            q = i // samples
            got.setdefault(q, {})[i % samples] = gen
            if len(got[q]) == samples:
                done = got.pop(q)
                gens = [done[s] for s in range(samples)]
                store.append([question_record(pending[q], gens,
                                              seeds[q * samples:(q + 1) * samples],
                                              (dropped or {}).get(pending[q].id, 0))])
                bar.update(1)

        if prompts:
            runner.generate(prompts, model=model, seeds=seeds, on_done=on_done, **options)


def summarise(records: Sequence[dict[str, Any]], samples: int) -> dict[str, Any]:
    """Metrics of one (benchmark, model) from its question records (see the module docstring)."""
    if not records:
        raise ValueError("no records to summarise")
    outs = [s for r in records for s in r["samples"]]
    summary = {
        "num_questions": len(records),
        **aggregate([r["num_correct"] for r in records], samples, [s["stats"] for s in outs]),
        "answered_rate": statistics.fmean(s["extracted"] is not None for s in outs),
    }
    truncated = [r["context_tokens_dropped"] for r in records if "context_tokens_dropped" in r]
    if truncated:
        summary["truncated_rate"] = statistics.fmean(n > 0 for n in truncated)
    by_tag: dict[str, dict[str, list[int]]] = {}
    for r in records:
        for name, value in r.get("tags", {}).items():
            by_tag.setdefault(name, {}).setdefault(value, []).append(r["num_correct"])
    if by_tag:
        summary["by_tag"] = {
            name: {value: {"num_questions": len(counts),
                           f"avg@{samples}": statistics.fmean(c / samples for c in counts),
                           f"pass@{samples}": statistics.fmean(pass_at_k(samples, c, samples)
                                                               for c in counts)}
                   for value, counts in sorted(values.items())}
            for name, values in sorted(by_tag.items())}
    return summary


def _model_stage(runner: PipoRunner, model: str) -> str:
    return {"pipo": runner.stage, "spec": "mtp"}.get(model, runner.ar_stage)


def _latest_step(run_dir: str | Path | None, stage: str) -> int | None:
    if run_dir is None:
        return None
    return ckpt.latest_step(Path(run_dir) / stage)


def evaluate_benchmarks(runner: PipoRunner, benches: Sequence[Benchmark], *,
                        models: Sequence[str] = ("pipo", "ar"), samples: int = 1,
                        options: dict[str, Any] | None = None, out_dir: str | Path,
                        run_dir: str | Path | None = None, restart: bool = False,
                        max_questions: int | None = None,
                        progress: bool = True) -> dict[str, Any]:
    """Evaluates ``models`` on every benchmark, resuming from ``out_dir``; returns the summary
    (also written to ``<out_dir>/summary.json``).

    Args:
      runner: the loaded run (``pipo_jax.load``).
      benches: loaded benchmark files (``schema.load_benchmarks``).
      models: a subset of ``("pipo", "ar")``; both decode with the same options.
      samples: responses per question (the ``k`` of avg@k and pass@k).
      options: ``DecodeConfig`` overrides (None values are ignored); ``seed`` is the base of the
        per-request seeds.
      out_dir: where the per-(benchmark, model) result files and the summary go.
      run_dir: the run's directory, recorded with its checkpoint step in each file's header.
      restart: discard existing result files instead of resuming them.
      max_questions: evaluate only the first N questions of each file (None: all).
      progress: show a progress bar per (benchmark, model).
    """
    if samples < 1:
        raise BenchError(f"samples must be >= 1, got {samples}")
    if max_questions is not None and max_questions < 1:
        raise BenchError(f"--max-questions must be >= 1, got {max_questions}")
    decode = runner.decode_options(options or {})
    selected, dropped = {}, {}
    for b in benches:
        selected[b.name], dropped[b.name] = check_prompt_lengths(
            runner, b.questions[:max_questions], decode.max_new_tokens)
    out_dir = Path(out_dir)
    steps = {m: _latest_step(run_dir, _model_stage(runner, m)) for m in models}
    summary: dict[str, Any] = {
        "run": None if run_dir is None else str(run_dir), "steps": steps, "samples": samples,
        "options": dataclasses.asdict(decode), "system_prompt": runner.system_prompt,
        "max_questions": max_questions, "out_dir": str(out_dir), "benchmarks": {},
    }
    for b in benches:
        entry: dict[str, Any] = {"file": str(b.path), "total_questions": len(b.questions),
                                 "refused": list(b.refused),
                                 "models": {}}
        for model in models:
            header = result_header(b, model, samples, decode, run_dir, steps[model],
                                   runner.system_prompt, _model_stage(runner, model))
            path = result_path(out_dir, b.name, model)
            with ResultFile(path, header, restart=restart) as store:
                evaluate_questions(runner, selected[b.name], model, samples, decode, store,
                                   progress, desc=f"{b.name} {model}", dropped=dropped[b.name])
                records = [store.done[q.id] for q in selected[b.name]]
            entry["models"][model] = {**summarise(records, samples), "results": str(path)}
        entry["num_questions"] = len(selected[b.name])
        summary["benchmarks"][b.name] = entry
    summary["overall"] = {
        model: {key: statistics.fmean(e["models"][model][key]
                                      for e in summary["benchmarks"].values())
                for key in (f"avg@{samples}", f"pass@{samples}")}
        for model in models}
    write_json(summary, out_dir / SUMMARY_FILE, elsewhere="choose another --out-dir")
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Plain-text tables of ``evaluate_benchmarks``' summary: accuracy (avg@k / pass@k in %,
    one column per benchmark plus overall) and the per-(model, benchmark) decode statistics."""
    k = summary["samples"]
    benches = summary["benchmarks"]
    models = list(summary["overall"])
    names = [*benches, "overall"]
    width = max(17, *(len(n) + 2 for n in names))
    counts = ", ".join(f"{n} {e['num_questions']}" for n, e in benches.items())
    lines = [f"avg@{k} / pass@{k} (%), {k} samples per question; questions: {counts}",
             f"{'model':<8}" + "".join(f"{n:>{width}}" for n in names)]
    for model in models:
        cells = [benches[n]["models"][model] for n in benches] + [summary["overall"][model]]
        lines.append(f"{model.upper():<8}" + "".join(
            f"{100 * c[f'avg@{k}']:.2f} / {100 * c[f'pass@{k}']:.2f}".rjust(width)
            for c in cells))
    cols = (("mean_tokens", "{:.1f}"), ("commit_rate", "{:.3f}"), ("tokens_per_pass", "{:.2f}"),
            ("finished_rate", "{:.3f}"), ("answered_rate", "{:.3f}"))
    bench_w = max(11, *(len(n) + 2 for n in benches))
    lines += ["", f"{'model':<8}{'benchmark':<{bench_w}}"
              + "".join(f"{name:>16}" for name, _ in cols)]
    for model in models:
        for n, e in benches.items():
            m = e["models"][model]
            lines.append(f"{model.upper():<8}{n:<{bench_w}}"
                         + "".join(f"{fmt.format(m[name]):>16}" for name, fmt in cols))
    tagged = [(model, n, e["models"][model]) for model in models for n, e in benches.items()
              if "by_tag" in e["models"][model]]
    if tagged:
        lines += ["", f"avg@{k} / pass@{k} (%) by tag"]
        for model, n, m in tagged:
            for name, values in m["by_tag"].items():
                cells = ", ".join(f"{v} {100 * c[f'avg@{k}']:.2f} / {100 * c[f'pass@{k}']:.2f}"
                                  f" ({c['num_questions']})" for v, c in values.items())
                lines.append(f"{model.upper():<8}{n} {name}: {cells}")
    for n, e in benches.items():
        m = next(iter(e["models"].values()), {})
        notes = []
        if e.get("refused"):
            notes.append(f"{len(e['refused'])} line(s) refused (listed on stderr and in "
                         "summary.json)")
        if m.get("truncated_rate"):
            notes.append(f"context cut in the middle for {100 * m['truncated_rate']:.1f}% of "
                         "questions")
        if notes:
            lines.append(f"{n}: " + "; ".join(notes))
    return "\n".join(lines)

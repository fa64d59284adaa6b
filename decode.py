"""Evaluate a trained run: ``python decode.py --run runs/default``.

Decodes the test split with PIPO, with the AR baseline and, when the run has an ``mtp`` stage,
with the AR model decoding speculatively with its MTP drafter (``spec``), on the same prompts,
and prints a table (also written as JSON): pass@1 and pass@k, committed-token (SPEC: accepted
draft) rate, tokens per backbone pass, time to first token, time per output token, and each
model's ratios against AR. ``--prompt TEXT`` instead answers
one question with both models and prints the text and per-request stats. ``--mesh fsdp=8``
(axes ``data``, ``fsdp``, ``tensor``) shards the model over a device mesh and decodes there.

``--bench FILE [FILE ...]`` evaluates on benchmark files instead (JSONL, schema in
``pipo_jax/eval/schema.py``): avg@k and pass@k per file and overall, resumable from
``--out-dir`` (default ``<run>/eval/bench``). ``--preset paper`` sets the paper's sampling
(4 samples, T 1.0, top-p 0.95, top-k 20, presence penalty 1.5, threshold 0.95); explicit flags
override it. Both models always get the same options and the same budget of real tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from pipo_jax.cli import check_utf8, run_main
from pipo_jax.config import ConfigError, DecodeConfig
from pipo_jax.config.bounds import FieldError
from pipo_jax.data.loader import test_examples
from pipo_jax.decode.runner import load
from pipo_jax.distributed import simulate_cpu_devices
from pipo_jax.errors import PromptError
from pipo_jax.eval.harness import SUMMARY_FILE, evaluate_benchmarks, format_summary
from pipo_jax.eval.heldout import evaluate, format_table, write_json
from pipo_jax.eval.protocol import PRESETS, resolve_options
from pipo_jax.eval.schema import load_benchmarks
from pipo_jax.io.diskerrors import check_writable
from pipo_jax.model.sharding import build_mesh, parse_mesh


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run directory written by train.py")
    p.add_argument("--threshold", type=float, help="confidence threshold in [-1, 1] "
                   "(-1 commits every draft, 1 commits none and skips the MTP head)")
    p.add_argument("--num-problems", type=int,
                   help="test problems to evaluate (default: min(200, data.num_test))")
    p.add_argument("--samples", type=int,
                   help="samples per problem (pass@k, k = this; default 1, or the preset's)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--presence-penalty", type=float)
    p.add_argument("--max-new-tokens", type=int, help="budget of real (non-PAD) tokens")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--speculative-k", type=int,
                   help="spec: drafts per round of the MTP drafter (default decode.speculative_k)")
    p.add_argument("--seed", type=int)
    p.add_argument("--timing-problems", type=int,
                   help="problems timed one at a time (batch 1) for TTFT/TPOT; 0 disables "
                   "(default 8; not with --bench)")
    p.add_argument("--models", default="pipo,ar,spec",
                   help="comma-separated subset of pipo,ar,spec (spec: the AR model with its "
                        "MTP drafter, speculatively; dropped when the run has no mtp stage)")
    p.add_argument("--stage", choices=("opd", "sft"),
                   help="PIPO checkpoint to evaluate (default: opd when the run has it, else sft)")
    p.add_argument("--ar-stage", choices=("ar", "teacher"), default="ar",
                   help="the AR model: ar (same backbone, the speed baseline) or teacher (the "
                        "larger OPD teacher)")
    p.add_argument("--ar-run", metavar="RUN",
                   help="take the AR model and its MTP drafter (spec) from this run instead: "
                        "e.g. an AR base trained long enough to be competent (same backbone)")
    p.add_argument("--mesh", metavar="data=D,fsdp=F,tensor=T",
                   help="decode on a device mesh: parameters sharded by the logical rules, "
                        "programs compiled for it (axes left out are 1; default: one device)")
    p.add_argument("--cpu-devices", type=int, metavar="N",
                   help="simulate N CPU devices (trying --mesh without accelerators)")
    p.add_argument("--out", help="JSON output path (default: <run>/eval/decode.json)")
    p.add_argument("--prompt", help="answer this one question instead of evaluating")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--bench", nargs="+", metavar="FILE",
                   help="evaluate on these benchmark JSONL files instead of the test split")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="named sampling options (paper: the paper's evaluation protocol)")
    p.add_argument("--system-prompt",
                   help="system message for prompts without one (default: the embedded task's "
                   "for runs trained on it, none for runs trained on chat data; '' for none)")
    p.add_argument("--out-dir", help="--bench: result directory (default <run>/eval/bench)")
    p.add_argument("--restart", action="store_true",
                   help="--bench: discard existing results instead of resuming them")
    p.add_argument("--max-questions", type=int,
                   help="--bench: evaluate only the first N questions of each file")
    p.add_argument("--strict", action="store_true",
                   help="--bench: a malformed benchmark line is an error (default: refused "
                   "with its file:line, the rest evaluated)")
    args = p.parse_args(argv)
    for flag, text in (("--prompt", args.prompt), ("--system-prompt", args.system_prompt)):
        check_utf8(text, flag, PromptError)  # before anything is loaded
    if args.num_problems is not None and args.num_problems < 1:
        raise ConfigError(f"--num-problems must be >= 1, got {args.num_problems}")
    _check_mode_flags(args)
    samples, options = resolve_options(args.preset, {
        "samples": args.samples, "threshold": args.threshold,
        "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
        "presence_penalty": args.presence_penalty, "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size, "seed": args.seed, "speculative_k": args.speculative_k})
    _check_decode_options(options)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - {"pipo", "ar", "spec"}:
        raise ConfigError(f"--models must be a subset of pipo,ar,spec, got {args.models!r}")
    benches = None
    if args.bench:  # before loading a run: bad files fail fast
        benches = load_benchmarks(args.bench, skip_invalid=not args.strict)
        for refusal in (r for b in benches for r in b.refused):
            print(f"refused {refusal}", file=sys.stderr)
    mesh = None
    if args.mesh:
        mesh_cfg = parse_mesh(args.mesh)  # a bad flag fails before JAX starts
        simulate_cpu_devices(args.cpu_devices)
        mesh = build_mesh(mesh_cfg)
    elif args.cpu_devices is not None:
        raise ConfigError("--cpu-devices only applies with --mesh")
    out = _writable_output(args)  # before loading: results that cannot be written are lost
    runner = load(args.run, system_prompt=args.system_prompt, stage=args.stage,
                  ar_stage=args.ar_stage, mesh=mesh, ar_run=args.ar_run)
    if runner.ar_params is None and "ar" in models:
        models.remove("ar")
        print(f"note: this run has no {args.ar_stage} model; not evaluating AR",
              file=sys.stderr)
    by_default = args.models == "pipo,ar,spec"
    if "spec" in models and (runner.drafter_params is None or options.get("presence_penalty")):
        why = ("this run has no mtp stage (MTP drafter)" if runner.drafter_params is None
               else "speculative decoding takes no presence penalty")
        if not by_default:
            raise ConfigError(f"--models spec: {why}; leave spec out of --models")
        models.remove("spec")
    if benches is not None:
        summary = evaluate_benchmarks(
            runner, benches, models=models, samples=samples, options=options, out_dir=out,
            run_dir=args.run, restart=args.restart, max_questions=args.max_questions,
            progress=not args.no_progress)
        print(format_summary(summary))
        print(f"wrote {out / SUMMARY_FILE}")
        return 0
    if args.prompt is not None:
        for model in models:
            (gen,) = runner.generate(args.prompt, model=model, **options)
            if gen.error is not None:
                raise PromptError(gen.error)
            print(f"--- {model}\n{gen.text}\n{json.dumps(gen.stats)}")
        return 0
    if runner.config.data.source != "arith":
        raise ConfigError(
            f"{args.run} was trained on {runner.config.data.source} data, which has no test "
            "split: evaluate it on benchmark files with --bench FILE, or ask with --prompt TEXT")
    if args.num_problems is None:
        args.num_problems = min(200, runner.config.data.num_test)
    if args.num_problems > runner.config.data.num_test:
        raise ConfigError(
            f"--num-problems asks for {args.num_problems} test examples but the run's test "
            f"split has {runner.config.data.num_test} (data.num_test); ask for fewer")
    examples = test_examples(runner.config, args.num_problems)
    timing = 8 if args.timing_problems is None else args.timing_problems
    result = evaluate(runner, examples, samples=samples, models=models, timing_problems=timing,
                      progress=not args.no_progress, **options)
    result.update(run=str(args.run), stage=runner.stage, ar_stage=runner.ar_stage,
                  ar_run=args.ar_run)
    print(format_table(result))
    write_json(result, out, elsewhere="choose another --out")
    print(f"wrote {out}")
    return 0


def _check_decode_options(options: dict[str, object]) -> None:
    """Each sampling option against the range ``DecodeConfig`` declares for it, before a run is
    loaded; an error names the flag (``--presence-penalty nan`` once decoded only BOS tokens)."""
    fields = {f.name for f in dataclasses.fields(DecodeConfig)}
    try:
        DecodeConfig(**{k: v for k, v in options.items() if k in fields})
    except FieldError as e:
        raise ConfigError(f"--{e.field.replace('_', '-')} must be {e.rule}, got {e.value!r}"
                          ) from None


def _writable_output(args: argparse.Namespace) -> Path:
    """Where the results go (``--bench``: the result directory, else the JSON file), after
    checking that files can be written there (``--prompt`` writes none). A missing run is left
    to ``load``, whose error says more."""
    if args.bench:
        out = Path(args.out_dir) if args.out_dir else Path(args.run) / "eval" / "bench"
        directory, flag = out, "--out-dir"
    else:
        out = Path(args.out) if args.out else Path(args.run) / "eval" / "decode.json"
        directory, flag = out.parent, "--out"
    explicit = args.out_dir if args.bench else args.out
    if args.prompt is None and (explicit or Path(args.run).is_dir()):
        check_writable(directory, "write the results to", f"choose another {flag}")
    return out


def _check_mode_flags(args: argparse.Namespace) -> None:
    """Refuses flags that the chosen mode would otherwise silently ignore."""
    if args.bench:
        if args.max_questions is not None and args.max_questions < 1:
            raise ConfigError(f"--max-questions must be >= 1, got {args.max_questions}")
        wrong = {"--prompt": args.prompt, "--num-problems (use --max-questions)":
                 args.num_problems, "--out (use --out-dir)": args.out,
                 "--timing-problems": args.timing_problems}
        given = [flag for flag, value in wrong.items() if value is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} cannot be used with --bench")
    else:
        given = [flag for flag, value in (("--out-dir", args.out_dir),
                                          ("--max-questions", args.max_questions))
                 if value is not None] + (["--restart"] if args.restart else []) + (
                     ["--strict"] if args.strict else [])
        if given:
            raise ConfigError(f"{', '.join(given)} only apply with --bench")


if __name__ == "__main__":
    sys.exit(run_main(main))

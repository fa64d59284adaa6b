"""The decode engine on long contexts, long prompts and busy batches (issue #15), as ratios
measured in one process.

    python -m benchmarks.decode_engine                 # all three parts
    python -m benchmarks.decode_engine --parts tpot --filled 1024,4096,16384,32768

* ``tpot``: time per real output token against the filled context (tokens already in the
  cache) at a 32K-token budget, AR and PIPO, ``blocked`` (filled blocks only) against
  ``masked`` (every allocated slot), and at 1K filled with a 1K budget (what the budget
  costs). The cache is set to the filled length directly and a few steps are timed; PIPO
  commits every draft (threshold -1: 2 tokens per backbone pass, its cache holds half as many
  slots as AR's for the same text).
* ``ttft``: time to the first token of an 8K and 32K-token prompt with chunked prefill
  (``prefill_chunk`` 2048), AR and PIPO, and the peak temporary memory XLA plans for the
  prefill program, chunked against one-shot (compiled, not run).
* ``throughput``: real tokens per second of ``PipoRunner.generate`` (what ``decode.py
  --bench`` calls) on requests of mixed answer lengths (random weights at init scale: EOS
  about once per 272 tokens, so lengths are roughly geometric up to the budget), continuous
  against static batching at 8 and 64 slots, and PIPO/AR at 64 slots and at batch 1.

Random weights: these are costs of the engine, not of a trained model (whose accuracy is in
``decode.py``). Timings on a shared 2-core machine are noisy; compare ratios from one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from benchmarks.common import table, write
from pipo_jax.config import Config, DecodeConfig, ModelConfig
from pipo_jax.decode import engine
from pipo_jax.decode.runner import PipoRunner
from pipo_jax.decode.sampling import SamplingParams, request_keys
from pipo_jax.io.tokenizer import ByteTokenizer
from pipo_jax.model.attention import CacheAttention
from pipo_jax.model.pipo import init_params

Array = jax.Array
PAD, EOS = 0, 2
BUDGET = 32768
# Attention-dominated at long context: 8 query heads × 64 dims over a long cache outweigh the
# small MLP and vocabulary.
ATTN = ModelConfig(vocab_size=512, d_model=256, n_layers=4, n_heads=8, n_kv_heads=2,
                   head_dim=64, mlp_dim=512, max_context=70000)
# ATTN three times as deep: the MTP layer (PIPO's one extra attention layer per pass) is 1/12
# of the backbone instead of 1/4, closer to a real model's share (Qwen3.5-0.8B: 1/24).
DEEP = dataclasses.replace(ATTN, n_layers=12)
# The Qwen3.5 pattern (3 Gated DeltaNet : 1 gated attention), scaled the same way.
HYBRID = dataclasses.replace(
    ATTN, family="qwen3_5", n_layers=8, layer_types=("linear_attention",) * 3
    + ("full_attention",) + ("linear_attention",) * 3 + ("full_attention",),
    partial_rotary_factor=0.25, linear_n_key_heads=4, linear_n_value_heads=8,
    linear_key_head_dim=32, linear_value_head_dim=32)


def _params(cfg: ModelConfig, pipo: bool, seed: int = 0) -> Any:
    return nn.unbox(init_params(cfg, pipo, jax.random.key(seed)))


def _best(fn: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


# ------------------------------------------------------------------------------------ tpot


def _tpot(cfg: ModelConfig, pipo: bool, impl: str, filled_tokens: int, budget: int,
          steps: int, repeats: int) -> dict[str, Any]:
    spec = engine.DecodeSpec(cfg, pipo, SamplingParams(), budget, PAD, EOS, draft=pipo,
                             attention=CacheAttention(impl, 256))
    params = _params(cfg, pipo)
    prompt = np.full((1, 16), 5, np.int32)
    state = jax.jit(functools.partial(engine.prefill, spec=spec))(
        params, prompt, np.ones_like(prompt, bool), request_keys([0]), jnp.float32(-1.0))
    positions = filled_tokens // 2 if pipo else filled_tokens  # PIPO: a latent per pair
    state = state.replace(cache=state.cache.replace(length=jnp.full((1,), positions, jnp.int32)),
                          positions=jnp.full((1,), positions, jnp.int32), done=jnp.zeros(1, bool))

    @jax.jit
    def run(params: Any, st: engine.DecodeState, n: Array) -> engine.DecodeState:
        body = functools.partial(engine.step, params, threshold=jnp.float32(-1.0), spec=spec)
        return jax.lax.fori_loop(0, n, lambda _, s: body(s), st)

    # Per-step time as the difference of 3·steps and 1·steps steps: what a call costs besides
    # its steps (the copy of the undonated input state, dispatch) cancels out.
    jax.block_until_ready(run(params, state, jnp.int32(1)))  # compile
    short = _best(lambda: run(params, state, jnp.int32(steps)).out, repeats)
    long = _best(lambda: run(params, state, jnp.int32(3 * steps)).out, repeats)
    seconds = max(long - short, 1e-9)
    out = jax.device_get(run(params, state, jnp.int32(2 * steps)))
    tokens = int(out.n_tokens[0] - state.n_tokens[0])
    return {"pipo": pipo, "impl": impl, "filled_tokens": filled_tokens, "budget": budget,
            "slots": state.cache.slots, "ms_per_step": 1e3 * seconds / (2 * steps),
            "tokens_per_pass": tokens / (2 * steps), "tpot_ms": 1e3 * seconds / tokens}


CONFIGS = {"attention": ATTN, "deep": DEEP, "hybrid": HYBRID}


def tpot_part(filled: list[int], steps: int, repeats: int, configs: list[str],
              impls: list[str]) -> dict[str, Any]:
    if "blocked" not in impls:
        raise SystemExit("--impls must include blocked (the budget-cost row measures it)")
    out: dict[str, Any] = {}
    for name in configs:
        cfg = CONFIGS[name]
        rows = []
        for f in filled:
            for impl in impls:
                for pipo in (False, True):
                    rows.append(_tpot(cfg, pipo, impl, f, BUDGET, steps, repeats))
                    print(f"  {name} {impl:8s} {'pipo' if pipo else 'ar  '} filled {f:6d}: "
                          f"{rows[-1]['tpot_ms']:.2f} ms/token", flush=True)
        short = min(filled)
        small = {pipo: _tpot(cfg, pipo, "blocked", short, short, steps, repeats)
                 for pipo in (False, True)}
        summary = []
        for f in filled:
            r = {(x["pipo"], x["impl"]): x for x in rows if x["filled_tokens"] == f}
            s: dict[str, Any] = {"filled": f,
                                 "pipo tok/pass": r[True, impls[0]]["tokens_per_pass"]}
            for impl in impls:
                s[f"ar_{impl}_ms"] = r[False, impl]["tpot_ms"]
                s[f"pipo_{impl}_ms"] = r[True, impl]["tpot_ms"]
                s[f"pipo/ar {impl}"] = r[False, impl]["tpot_ms"] / r[True, impl]["tpot_ms"]
            summary.append(s)
        budget_cost = {("pipo" if pipo else "ar"): next(
            x["tpot_ms"] for x in rows if x["pipo"] == pipo and x["impl"] == "blocked"
            and x["filled_tokens"] == short) / small[pipo]["tpot_ms"] for pipo in (False, True)}
        print(f"\nTPOT ({name}), budget {BUDGET} tokens; speed-ups are AR/PIPO time per real "
              "token")
        cols = [("filled", "d")]
        for impl in impls:
            cols += [(f"ar_{impl}_ms", ".2f"), (f"pipo_{impl}_ms", ".2f"),
                     (f"pipo/ar {impl}", ".2f")]
        print(table(summary, [*cols, ("pipo tok/pass", ".2f")]))
        print(f"{short}-token fill at a {BUDGET} budget vs a {short} budget (blocked): "
              + ", ".join(f"{k} {v:.2f}x" for k, v in budget_cost.items()))
        out[name] = {"rows": rows, "summary": summary, "budget_cost_ratio": budget_cost,
                     "short_budget": [small[False], small[True]]}
    return out


# ------------------------------------------------------------------------------------ ttft


def _ttft(cfg: ModelConfig, pipo: bool, prompt_tokens: int, chunk: int,
          repeats: int) -> dict[str, Any]:
    spec = engine.DecodeSpec(cfg, pipo, SamplingParams(), 256, PAD, EOS, draft=pipo,
                             prefill_chunk=chunk)
    params = _params(cfg, pipo)
    rng = np.random.default_rng(0)
    prompt = rng.integers(3, cfg.vocab_size, size=(1, prompt_tokens)).astype(np.int32)
    valid = np.ones_like(prompt, bool)
    fn = jax.jit(functools.partial(engine.prefill, spec=spec))
    args = (params, prompt, valid, request_keys([0]), jnp.float32(0.5))
    temp = fn.lower(*args).compile().memory_analysis()
    jax.block_until_ready(fn(*args).out)
    seconds = _best(lambda: fn(*args).out, repeats)
    return {"pipo": pipo, "prompt_tokens": prompt_tokens, "chunk": chunk,
            "ttft_ms": 1e3 * seconds,
            "temp_mib": None if temp is None else temp.temp_size_in_bytes / 2**20}


def _temp_mib(cfg: ModelConfig, pipo: bool, prompt_tokens: int, chunk: int) -> float | None:
    spec = engine.DecodeSpec(cfg, pipo, SamplingParams(), 256, PAD, EOS, draft=pipo,
                             prefill_chunk=chunk)
    shapes = jax.eval_shape(lambda: _params(cfg, pipo))
    prompt = jax.ShapeDtypeStruct((1, prompt_tokens), jnp.int32)
    valid = jax.ShapeDtypeStruct((1, prompt_tokens), jnp.bool_)
    compiled = jax.jit(functools.partial(engine.prefill, spec=spec)).lower(
        shapes, prompt, valid, request_keys([0]), jnp.float32(0.5)).compile()
    mem = compiled.memory_analysis()
    return None if mem is None else mem.temp_size_in_bytes / 2**20


def ttft_part(lengths: list[int], chunk: int, repeats: int,
              memory_tokens: int) -> dict[str, Any]:
    rows = []
    for n in lengths:
        r = {"prompt_tokens": n}
        for pipo in (False, True):
            res = _ttft(ATTN, pipo, n, chunk, repeats)
            r["pipo_ms" if pipo else "ar_ms"] = res["ttft_ms"]
            r["pipo_temp_mib" if pipo else "ar_temp_mib"] = res["temp_mib"]
            print(f"  ttft {'pipo' if pipo else 'ar  '} {n}: {res['ttft_ms']:.0f} ms", flush=True)
        r["pipo/ar"] = r["ar_ms"] / r["pipo_ms"]
        rows.append(r)
    longest = memory_tokens
    memory = {"prompt_tokens": longest, "chunk": chunk,
              "chunked_temp_mib": {m: _temp_mib(ATTN, m == "pipo", longest, chunk)
                                   for m in ("ar", "pipo")},
              "one_shot_temp_mib": {m: _temp_mib(ATTN, m == "pipo", longest, 2 * longest)
                                    for m in ("ar", "pipo")}}
    print(f"\nTTFT (all-attention), chunked prefill ({chunk} tokens per chunk)")
    print(table(rows, [("prompt_tokens", "d"), ("ar_ms", ".0f"), ("pipo_ms", ".0f"),
                       ("pipo/ar", ".2f"), ("ar_temp_mib", ".0f"), ("pipo_temp_mib", ".0f")]))
    print(f"peak temporary memory of a {longest}-token prefill, chunked vs one-shot (MiB): "
          + ", ".join(f"{m} {memory['chunked_temp_mib'][m]:.0f} vs "
                      f"{memory['one_shot_temp_mib'][m]:.0f}" for m in ("ar", "pipo")))
    return {"rows": rows, "memory": memory}


# ------------------------------------------------------------------------------ throughput


THROUGHPUT_MODEL = ModelConfig(vocab_size=272, d_model=128, n_layers=4, n_heads=4,
                               n_kv_heads=2, head_dim=32, mlp_dim=256, max_context=2048)


def _runner(cfg: ModelConfig) -> PipoRunner:
    config = Config(model=cfg, decode=DecodeConfig(threshold=-1.0, temperature=1.0,
                                                   max_new_tokens=512))
    return PipoRunner(config, _params(cfg, True), _params(cfg, False, 1), ByteTokenizer(),
                      system_prompt="")


def _throughput(runner: PipoRunner, prompts: list[list[int]], model: str, slots: int,
                batching: str) -> dict[str, Any]:
    seeds = list(range(len(prompts)))
    opts = {"batch_size": slots, "batching": batching}
    runner.generate(prompts[:slots], model=model, seeds=seeds[:slots], **opts)  # compile
    t0 = time.perf_counter()
    gens = runner.generate(prompts, model=model, seeds=seeds, **opts)
    seconds = time.perf_counter() - t0
    tokens = sum(g.stats["tokens"] for g in gens)
    passes = sum(g.stats["backbone_passes"] for g in gens)
    return {"model": model, "slots": slots, "batching": batching, "requests": len(prompts),
            "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "tokens_per_pass": tokens / passes,
            "lengths": sorted(g.stats["tokens"] for g in gens)}


def throughput_part(requests: int, slot_counts: list[int]) -> dict[str, Any]:
    runner = _runner(THROUGHPUT_MODEL)
    rng = np.random.default_rng(0)
    rows = []
    plan = {1: max(4, requests // 16), 8: requests, 64: 2 * requests}
    for slots, n in ((s, plan.get(s, requests)) for s in slot_counts):
        prompts = [list(rng.integers(3, 256, size=int(rng.integers(16, 200))))
                   for _ in range(n)]
        for model in ("ar", "pipo"):
            for mode in (("continuous",) if slots == 1 else ("static", "continuous")):
                r = _throughput(runner, prompts, model, slots, mode)
                rows.append(r)
                print(f"  {model:4s} {slots:2d} slots {mode:10s}: {r['tokens_per_s']:.0f} tok/s",
                      flush=True)
    summary = []
    for slots in slot_counts:
        s: dict[str, Any] = {"slots": slots}
        for model in ("ar", "pipo"):
            got = {r["batching"]: r for r in rows if r["slots"] == slots and r["model"] == model}
            s[f"{model}_cont_tok/s"] = got["continuous"]["tokens_per_s"]
            if "static" in got:
                s[f"{model}_static_tok/s"] = got["static"]["tokens_per_s"]
                s[f"{model} cont/static"] = (got["continuous"]["tokens_per_s"]
                                             / got["static"]["tokens_per_s"])
            s[f"{model} tok/pass"] = got["continuous"]["tokens_per_pass"]
        s["pipo/ar"] = s["pipo_cont_tok/s"] / s["ar_cont_tok/s"]
        summary.append(s)
    print("\nThroughput (real tokens/s) of PipoRunner.generate, mixed answer lengths")
    print(table(summary, [("slots", "d"), ("ar_static_tok/s", ".0f"), ("ar_cont_tok/s", ".0f"),
                          ("ar cont/static", ".2f"), ("pipo_static_tok/s", ".0f"),
                          ("pipo_cont_tok/s", ".0f"), ("pipo cont/static", ".2f"),
                          ("pipo/ar", ".2f"), ("pipo tok/pass", ".2f")]))
    return {"rows": rows, "summary": summary}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="tpot,ttft,throughput")
    p.add_argument("--filled", default="1024,4096,16384,32768")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--configs", default="attention,hybrid",
                   help=f"tpot: model shapes, of {','.join(CONFIGS)}")
    p.add_argument("--impls", default="blocked,masked", help="tpot: decode.attention forms")
    p.add_argument("--ttft-lengths", default="2048,8192")
    p.add_argument("--memory-tokens", type=int, default=32768,
                   help="prompt length of the prefill memory comparison (compiled only)")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--requests", type=int, default=64,
                   help="throughput: requests at 8 slots (64 slots get twice as many, 1 slot "
                        "a sixteenth)")
    p.add_argument("--slots", default="1,8,64", help="throughput: slot counts")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args()
    parts = args.parts.split(",")
    result: dict[str, Any] = {"command": "python -m benchmarks.decode_engine " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)}
    if "tpot" in parts:
        result["tpot"] = tpot_part([int(x) for x in args.filled.split(",")], args.steps,
                                   args.repeats, args.configs.split(","),
                                   args.impls.split(","))
    if "ttft" in parts:
        result["ttft"] = ttft_part([int(x) for x in args.ttft_lengths.split(",")], args.chunk,
                                   args.repeats, args.memory_tokens)
    if "throughput" in parts:
        result["throughput"] = throughput_part(args.requests,
                                               [int(s) for s in args.slots.split(",")])
    print(f"wrote {write('decode_engine', result, args.out)}")


if __name__ == "__main__":
    main()

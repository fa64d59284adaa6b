"""PIPO vs AR speed on the same backbone: TTFT against prompt length, TPOT against context.

    python -m benchmarks.speed --run runs/default

Every number is a ratio measured in one process on the same machine (AR time / PIPO time).
Decoding ignores EOS here (the budget sets the length) so both models emit the same number of
tokens; PIPO is timed at the run's default threshold and with every draft committed
(threshold -1, the upper bound of two tokens per pass).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from benchmarks.common import table, write
from pipo_jax.decode.engine import Decoder, DecodeSpec, prepare_prompts
from pipo_jax.decode.runner import load
from pipo_jax.decode.sampling import SamplingParams, request_keys

NO_EOS = -1  # an id no token has: decoding runs to the budget


def _prompt(runner, length: int, rng: np.random.Generator) -> list[int]:
    """A prompt of ``length`` tokens: the task's chat prompt, preceded by filler text."""
    tail = runner.encode_prompt("What is 123 + 456?")
    filler = runner.tokenizer.encode(" ".join(str(x) for x in rng.integers(0, 999, size=length)))
    return (filler[: max(0, length - len(tail))] + tail)[-length:]


def _time(fn, repeats: int, setup=lambda: None) -> float:
    """Median seconds of ``fn(setup())`` (setup untimed) after one untimed warm-up call."""
    fn(setup())  # compile + warm up
    ts = []
    for _ in range(repeats):
        arg = setup()
        t = time.perf_counter()
        fn(arg)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def measure(runner, prompt: list[int], new_tokens: int, threshold: float | None,
            repeats: int) -> dict[str, float]:
    """(ttft, decode seconds, tokens, passes) of one batch-1 request; threshold None = AR."""
    cfg = runner.config.model
    tok = runner.tokenizer
    pipo = threshold is not None
    tokens, valid = prepare_prompts([prompt], pipo, tok.pad_id, 64, new_tokens,
                                        cfg.max_context)
    keys = request_keys([0])
    spec = DecodeSpec(cfg, pipo, SamplingParams(), new_tokens, tok.pad_id, NO_EOS,
                      draft=pipo and threshold < 1.0)
    decoder = Decoder(spec)
    params = runner.params if pipo else runner.ar_params
    thr = np.float32(threshold if pipo else -1.0)
    prefill = lambda: decoder.prefill(params, tokens, valid, keys, thr)
    loop = lambda s: decoder.loop(params, s, thr)
    ttft = _time(lambda _: jax.block_until_ready(prefill().out), repeats)
    # The loop donates its input state, so each timed call gets a fresh (untimed) prefill.
    decode = _time(lambda s: jax.block_until_ready(loop(s).out), repeats,
                   setup=lambda: jax.block_until_ready(prefill()))
    s = jax.block_until_ready(loop(prefill()))
    n_tokens, passes = int(s.n_tokens[0]), int(s.n_passes[0])
    return {"ttft_ms": 1e3 * ttft, "tpot_ms": 1e3 * decode / max(n_tokens - 1, 1),
            "tokens": n_tokens, "passes": passes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--run", default="runs/default")
    p.add_argument("--prompt-lengths", default="128,256,512,1024")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out")
    args = p.parse_args()
    runner = load(args.run)
    thr = runner.config.decode.threshold
    rng = np.random.default_rng(0)
    rows = []
    for length in [int(x) for x in args.prompt_lengths.split(",")]:
        prompt = _prompt(runner, length, rng)
        ar = measure(runner, prompt, args.new_tokens, None, args.repeats)
        pipo = measure(runner, prompt, args.new_tokens, thr, args.repeats)
        pipo_all = measure(runner, prompt, args.new_tokens, -1.0, args.repeats)
        rows.append({
            "prompt_tokens": length, "ar_ttft_ms": ar["ttft_ms"], "pipo_ttft_ms": pipo["ttft_ms"],
            "ttft_speedup": ar["ttft_ms"] / pipo["ttft_ms"],
            "ar_tpot_ms": ar["tpot_ms"], "pipo_tpot_ms": pipo["tpot_ms"],
            "tpot_speedup": ar["tpot_ms"] / pipo["tpot_ms"],
            "tokens_per_pass": pipo["tokens"] / pipo["passes"],
            "tpot_speedup_all": ar["tpot_ms"] / pipo_all["tpot_ms"]})
        print(f"prompt {length}: done", flush=True)
    cols = [("prompt_tokens", "d"), ("ar_ttft_ms", ".2f"), ("pipo_ttft_ms", ".2f"),
            ("ttft_speedup", ".2f"), ("ar_tpot_ms", ".3f"), ("pipo_tpot_ms", ".3f"),
            ("tpot_speedup", ".2f"), ("tokens_per_pass", ".2f"), ("tpot_speedup_all", ".2f")]
    print(f"batch 1, {args.new_tokens} new tokens, PIPO threshold {thr} "
          f"(tpot_speedup_all: threshold -1)")
    print(table(rows, cols))
    path = write("speed", {"run": args.run, "threshold": thr, "new_tokens": args.new_tokens,
                           "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

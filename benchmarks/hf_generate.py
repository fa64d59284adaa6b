"""Our AR decode against ``transformers`` ``generate`` on the same random Qwen3.5 weights, on CPU.

    python -m benchmarks.hf_generate
    python -m benchmarks.hf_generate --quick      # tiny config, 16 tokens: a smoke run

A ``Qwen3_5ForCausalLM`` is built from a config, every parameter randomised (QWEN3_5.md §5),
and its state dict mapped into our parameters with ``pipo_jax.io.hf.mapping.load_into``. Both sides
then decode greedily, batch ``B``, exactly ``--new-tokens`` tokens (no EOS):

* ours: ``pipo_jax.decode.engine.Decoder`` prefill + decode loop (jitted, compiled by an untimed
  warm-up call);
* HF: ``model.generate(do_sample=False, use_cache=True, eos_token_id=None)`` after one untimed
  warm-up call, once per torch thread count in ``--torch-threads`` (default 2 and 1: with 2
  threads on a busy 2-core machine torch's OpenMP barriers made HF's decode 5-20x slower than
  with 1). Our sampler never draws the PAD id, so HF gets ``suppress_tokens=[PAD]`` to decode
  under the same rule.

Decode time is the loop for ours and ``generate(N) − generate(1)`` for HF (both make N − 1
tokens after the prefill's first); ``e2e`` includes the prefill. Times are medians of
``--repeats`` (HF's warm-up is a short ``generate``: it has nothing to compile). ``match`` counts
positions where both emitted the same token, ``prefix`` the tokens before the first difference
(the shortest row's); at a first difference ``hf_gap`` is HF's top-1 minus top-2 logit there
(a small gap: a near-tie that float rounding can flip).

Timings on a shared 2-core machine are noisy; compare ratios from one run, not across runs.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from benchmarks.common import set_blas_threads, table, write
from pipo_jax.decode.engine import Decoder, DecodeSpec
from pipo_jax.decode.sampling import SamplingParams, request_keys
from pipo_jax.io.hf import mapping as hm
from pipo_jax.model.pipo import init_params

PAD = 0  # never drawn by our sampler; suppressed in HF
NO_EOS = -1

_COMMON = dict(num_hidden_layers=8, linear_conv_kernel_dim=4, rms_norm_eps=1e-6,
               max_position_embeddings=4096, tie_word_embeddings=False,
               rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                "partial_rotary_factor": 0.25})
SIZES: dict[str, dict[str, Any]] = {
    # QWEN3_5.md §5: [lin, lin, lin, full] × 2.
    "tiny": dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
                 linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8),
    # A scaled-down Qwen3.5 (~45 M parameters, same hybrid layout).
    "small": dict(vocab_size=16384, hidden_size=512, intermediate_size=1536,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                  linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64,
                  linear_value_head_dim=64),
}


def build_hf(size: str, seed: int = 0) -> Any:
    """A random ``Qwen3_5ForCausalLM`` (fp32, eval): norms 0.3·N(0,1), A_log = log U(0.01, 2),
    dt_bias 0.5·N(0,1), matrices N(0, 1.2²/fan_in) (0.15 at hidden 64), the conv 0.15·N(0,1)."""
    import torch
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(seed)
    model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**_COMMON, **SIZES[size])).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(0.3 * noise)
            elif name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=g) * 1.99 + 0.01))
            elif name.endswith("dt_bias"):
                p.copy_(0.5 * noise)
            elif p.ndim == 2:
                p.copy_(1.2 / p.shape[1] ** 0.5 * noise)
            else:
                p.copy_(0.15 * noise)
    return model


def ours_from_hf(model: Any) -> tuple[Any, dict]:
    """(ModelConfig, our AR parameters) holding the HF model's weights."""
    cfg = hm.config_from_hf(model.config.to_dict())
    params = jax.tree.map(np.array, nn.unbox(init_params(cfg, False, jax.random.key(0))))
    groups = hm.load_into(cfg, ((k, v.numpy()) for k, v in model.state_dict().items()), params)
    assert groups == {"backbone"}, groups
    return cfg, jax.tree.map(jnp.asarray, params)


def _median(fn: Callable[[], Any], repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def run_ours(cfg: Any, params: dict, prompt_BxP: np.ndarray, new_tokens: int,
             repeats: int) -> dict[str, Any]:
    b = prompt_BxP.shape[0]
    tokens = jnp.asarray(prompt_BxP, jnp.int32)
    valid = jnp.ones(prompt_BxP.shape, bool)
    keys = request_keys(list(range(b)))
    decoder = Decoder(DecodeSpec(cfg, False, SamplingParams(), new_tokens, PAD, NO_EOS))
    thr = np.float32(-1.0)  # read only by PIPO
    prefill = lambda: decoder.prefill(params, tokens, valid, keys, thr)
    loop = lambda s: decoder.loop(params, s, thr)
    t = time.perf_counter()
    out = np.asarray(jax.block_until_ready(loop(prefill())).out)  # compiles both
    compile_s = time.perf_counter() - t
    ttft = _median(lambda: jax.block_until_ready(prefill().out), repeats)
    decode = []
    for _ in range(repeats):  # the loop donates its state: a fresh, untimed prefill each time
        s = jax.block_until_ready(prefill())
        t = time.perf_counter()
        jax.block_until_ready(loop(s).out)
        decode.append(time.perf_counter() - t)
    return {"tokens": out, "ttft_s": ttft, "decode_s": statistics.median(decode),
            "compile_s": compile_s}


def run_hf(model: Any, prompt_BxP: np.ndarray, new_tokens: int,
           repeats: int) -> dict[str, Any]:
    import torch
    from transformers import GenerationConfig

    ids = torch.as_tensor(prompt_BxP, dtype=torch.long)
    mask = torch.ones_like(ids)

    def generate(n: int, **extra: Any) -> Any:
        gen = GenerationConfig(max_new_tokens=n, do_sample=False, use_cache=True,
                               eos_token_id=None, pad_token_id=PAD, suppress_tokens=[PAD],
                               **extra)
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, generation_config=gen)

    def step_logits() -> np.ndarray:
        """B × N × V: HF's logits of every step (before logits processors)."""
        res = generate(new_tokens, return_dict_in_generate=True, output_logits=True)
        return torch.stack(res.logits, 1).float().numpy()

    generate(min(new_tokens, 8))  # warm-up
    ttft = _median(lambda: generate(1), repeats)
    outs: list[Any] = []
    full = _median(lambda: outs.append(generate(new_tokens)), repeats)
    return {"tokens": outs[-1][:, ids.shape[1]:].numpy(), "logits_fn": step_logits,
            "ttft_s": ttft, "decode_s": full - ttft, "total_s": full}


def agreement(ours_BxN: np.ndarray, hf_BxN: np.ndarray,
              hf_logits: Callable[[], np.ndarray]) -> dict[str, Any]:
    """Matching tokens, the shortest matching prefix, and HF's top-2 gap at the first miss
    (``hf_logits`` is only called when there is one)."""
    same = ours_BxN == hf_BxN
    prefixes = [int(np.argmin(r)) if not r.all() else r.size for r in same]
    row = int(np.argmin(prefixes))
    first = prefixes[row]
    gap = None
    if first < same.shape[1]:
        lg = np.delete(hf_logits()[row, first], PAD)
        top2 = np.sort(lg)[-2:]
        gap = float(top2[1] - top2[0])
    return {"match": int(same.sum()), "of": int(same.size), "prefix": first, "hf_gap": gap}


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,small", help=f"of {sorted(SIZES)}")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--torch-threads", default="2,1",
                   help="HF is timed once per torch thread count in this list")
    p.add_argument("--blas-threads", type=int, default=1,
                   help="OpenBLAS threads for our prefill's triangular solve (CPU)")
    p.add_argument("--quick", action="store_true",
                   help="tiny config, batch 1, 16+16 tokens, 1 torch thread")
    p.add_argument("--out", help="JSON path (default benchmarks/results/hf_generate.json, "
                   "or hf_generate_quick.json with --quick)")
    args = p.parse_args()
    set_blas_threads(args.blas_threads)  # before transformers loads scipy's OpenBLAS
    import torch
    import transformers

    transformers.logging.set_verbosity_error()  # "falling back to the reference kernel"
    if args.quick:
        args.sizes, args.batches, args.prompt_tokens, args.new_tokens = "tiny", "1", 16, 16
        args.repeats, args.torch_threads = 1, "1"
    rows = []
    for size in args.sizes.split(","):
        model = build_hf(size)
        cfg, params = ours_from_hf(model)
        for batch in _ints(args.batches):
            rng = np.random.default_rng(batch)
            prompt = rng.integers(1, cfg.vocab_size, (batch, args.prompt_tokens))
            ours = run_ours(cfg, params, prompt, args.new_tokens, args.repeats)
            for threads in _ints(args.torch_threads):
                torch.set_num_threads(threads)
                hf = run_hf(model, prompt, args.new_tokens, args.repeats)
                n, decoded = args.new_tokens, batch * (args.new_tokens - 1)
                rows.append({
                    "size": size, "batch": batch, "prompt": args.prompt_tokens, "new": n,
                    "torch_threads": threads,
                    "ours_decode_tok_s": decoded / ours["decode_s"],
                    "hf_decode_tok_s": decoded / hf["decode_s"],
                    "decode_ratio": hf["decode_s"] / ours["decode_s"],
                    "ours_ttft_ms": 1e3 * ours["ttft_s"], "hf_ttft_ms": 1e3 * hf["ttft_s"],
                    "ours_e2e_tok_s": batch * n / (ours["ttft_s"] + ours["decode_s"]),
                    "hf_e2e_tok_s": batch * n / hf["total_s"],
                    "ours_compile_s": ours["compile_s"],
                    **agreement(ours["tokens"], hf["tokens"], hf["logits_fn"]),
                    "ours_tokens_row0": ours["tokens"][0].tolist(),
                    "hf_tokens_row0": hf["tokens"][0].tolist()})
                print(f"{size} batch {batch} torch threads {threads}: done", flush=True)
    print(f"\ngreedy decode, prompt {args.prompt_tokens}, {args.new_tokens} new tokens, median of "
          f"{args.repeats}; decode_ratio = ours tok/s / HF tok/s; JAX {jax.default_backend()}, "
          f"{args.blas_threads} BLAS threads")
    print(table(rows, [("size", "s"), ("batch", "d"), ("torch_threads", "d"),
                       ("ours_decode_tok_s", ",.0f"),
                       ("hf_decode_tok_s", ",.0f"), ("decode_ratio", ".1f"),
                       ("ours_ttft_ms", ".1f"), ("hf_ttft_ms", ".1f"), ("ours_e2e_tok_s", ",.0f"),
                       ("hf_e2e_tok_s", ",.0f"), ("match", "d"), ("of", "d"), ("prefix", "d"),
                       ("hf_gap", ".2e")]))
    path = write("hf_generate_quick" if args.quick else "hf_generate", {
        "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_threads": _ints(args.torch_threads), "blas_threads": args.blas_threads,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "quick": args.quick,
        "configs": {s: {**_COMMON, **SIZES[s]} for s in args.sizes.split(",")},
        "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Peak host memory of ``python -m pipo_jax.io.hf.convert hf-to-pipo`` (and of ``pipo-to-hf``).

    python -m benchmarks.convert_memory [--sizes tiny,mid] [--no-export]

Each size is a random Qwen3.5 checkpoint (text tower + ``mtp.*``, fp32) written straight to
safetensors from numpy, one tensor at a time, with a tiny tokenizer.json. Every measurement runs
in a fresh subprocess that reports its RSS high-water mark (``getrusage``); the baseline is a
process that only imports the converter's libraries and starts the JAX CPU backend. The ratio
(peak − baseline) / parameter bytes is the converter's memory cost in copies of the model: a
loader that materialises a second full copy is at 2 or more.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import table, write
from pipo_jax.io.hf import mapping as hm
from pipo_jax.io.hf.convert import SafetensorsWriter

ROOT = Path(__file__).resolve().parent.parent
SIZES = {
    # The tiny config of QWEN3_5.md §5.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                 linear_value_head_dim=8),
    # About 350M parameters (1.4 GB in fp32).
    "mid": dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=16,
                num_attention_heads=8, num_key_value_heads=2, head_dim=128,
                linear_num_key_heads=8, linear_num_value_heads=16, linear_key_head_dim=64,
                linear_value_head_dim=64),
}
BASELINE = ("import resource, jax, numpy, safetensors, orbax.checkpoint, tokenizers\n"
            "import pipo_jax.io.hf.convert, pipo_jax.decode.runner\n"
            "jax.devices()\n")
MEASURE = ("import resource, sys, time\n"
           "from pipo_jax.io.hf.convert import main\n"
           "t = time.perf_counter()\n"
           "main(sys.argv[1:])\n"
           "print('SECONDS', time.perf_counter() - t)\n")
REPORT = "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"


def write_checkpoint(folder: Path, size: str, seed: int = 0) -> dict:
    """A random Qwen3.5 folder of ``SIZES[size]``: config.json, shards, tokenizer.json."""
    text = dict(SIZES[size], model_type="qwen3_5_text", linear_conv_kernel_dim=4,
                rms_norm_eps=1e-6, max_position_embeddings=4096, tie_word_embeddings=False,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                 "partial_rotary_factor": 0.25},
                mtp_num_hidden_layers=1, dtype="float32", architectures=["Qwen3_5ForCausalLM"])
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(text, indent=2))
    cfg = hm.config_from_hf(text)
    rng = np.random.default_rng(seed)
    table_ = hm.key_table(cfg)
    writer = SafetensorsWriter(folder, 500 * 10**6, table_)
    n = 0
    for key, target in table_.items():
        if target.group not in ("backbone", "mtp"):
            continue
        flax = rng.standard_normal(target.shape, dtype=np.float32) * 0.02
        writer.add(key, target.to_torch(flax))
        n += flax.size
    writer.finish()
    _tokenizer(folder)
    return {"checkpoint_params": n, "checkpoint_bytes": 4 * n}


def _tokenizer(folder: Path) -> None:
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world", "what is 12 + 30?"], trainer)
    tok.save(str(folder / "tokenizer.json"))


def _run(code: str, argv: list[str]) -> dict[str, float]:
    """Runs ``code`` in a fresh interpreter; returns its reported peak RSS (MB) and seconds."""
    proc = subprocess.run([sys.executable, "-c", code + REPORT, *argv], cwd=ROOT,
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"measurement failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    out: dict[str, float] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("MAXRSS_KB "):
            out["peak_mb"] = int(line.split()[1]) / 1024
        elif line.startswith("SECONDS "):
            out["seconds"] = float(line.split()[1])
    return out


def _param_count(run: Path) -> tuple[int, str]:
    """PIPO parameters of a converted run (from its config; no arrays are loaded)."""
    import jax

    from pipo_jax.config import config_from_json
    from pipo_jax.io.hf.convert import abstract_pipo_params

    cfg = config_from_json(run / "config.json").model
    leaves = jax.tree.leaves(abstract_pipo_params(cfg))
    return sum(int(np.prod(x.shape)) for x in leaves), cfg.param_dtype


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,mid")
    p.add_argument("--no-export", action="store_true", help="skip measuring pipo-to-hf")
    p.add_argument("--out")
    args = p.parse_args()
    baseline = _run(BASELINE, [])["peak_mb"]
    print(f"baseline (imports + JAX CPU backend): {baseline:.0f} MB", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="convert_memory_") as tmp:
        for size in args.sizes.split(","):
            hf, run, back = Path(tmp, size, "hf"), Path(tmp, size, "run"), Path(tmp, size, "back")
            t = time.perf_counter()
            info = write_checkpoint(hf, size)
            print(f"{size}: wrote {info['checkpoint_bytes'] / 1e6:.0f} MB of safetensors in "
                  f"{time.perf_counter() - t:.0f}s", flush=True)
            steps = [("hf-to-pipo", ["hf-to-pipo", "--hf-dir", str(hf), "--out", str(run)])]
            if not args.no_export:
                steps.append(("pipo-to-hf", ["pipo-to-hf", "--run", str(run), "--out",
                                             str(back)]))
            for name, argv in steps:
                m = _run(MEASURE, argv)
                n_params, dtype = _param_count(run)
                param_mb = n_params * (4 if dtype == "float32" else 2) / 2**20
                rows.append({"size": size, "command": name, "params_M": n_params / 1e6,
                             "param_MB": param_mb, "baseline_MB": baseline,
                             "peak_MB": m["peak_mb"], "seconds": m["seconds"],
                             "ratio": (m["peak_mb"] - baseline) / param_mb,
                             "checkpoint_MB": info["checkpoint_bytes"] / 2**20})
                print(f"{size} {name}: peak {m['peak_mb']:.0f} MB in {m['seconds']:.0f}s",
                      flush=True)
    cols = [("size", "s"), ("command", "s"), ("params_M", ".1f"), ("param_MB", ".1f"),
            ("baseline_MB", ".0f"), ("peak_MB", ".0f"), ("ratio", ".2f"), ("seconds", ".1f")]
    print("ratio = (peak RSS - baseline RSS) / PIPO parameter bytes (MB = 2^20 bytes)")
    print(table(rows, cols))
    path = write("convert_memory", {"baseline_MB": baseline, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

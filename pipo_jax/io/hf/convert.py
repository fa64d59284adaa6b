"""Hugging Face Qwen3 / Qwen3.5 checkpoints ↔ pipo-jax run directories.

    python -m pipo_jax.io.hf.convert hf-to-pipo --hf-dir DIR --out RUN_DIR [--param-dtype float32]
        [--compressor-type mlp|linear] [--max-context N] [--seed S] [--no-drafter] [--force]
    python -m pipo_jax.io.hf.convert pipo-to-hf --run RUN_DIR --out DIR [--dtype float32|bfloat16]
        [--step N] [--max-shard-size 2GB] [--force]
    python -m pipo_jax.io.hf.convert merge-lora --run RUN_DIR --out RUN_DIR [--step N] [--force]

``hf-to-pipo`` reads a local Hugging Face folder (config.json, ``*.safetensors`` with or without
``model.safetensors.index.json``, tokenizer.json and tokenizer_config.json; nothing is fetched)
and writes a run directory that ``pipo_jax.load`` and ``train.py`` start from::

    <out>/config.json           the run's Config (stages: sft; tokenizer: "tokenizer")
    <out>/hf_config.json        the source config.json, kept as is for the export
    <out>/hf_dtypes.json        only for mixed-dtype checkpoints: tensors not in the main dtype
    <out>/tokenizer/            tokenizer.json (+ tokenizer_config.json ...)
    <out>/ar/checkpoints/0      params-only checkpoint of the AR model (embedder + backbone)
    <out>/sft/checkpoints/0     params-only checkpoint of the PIPO model
    <out>/mtp/checkpoints/0     only with a native ``mtp.*``: the AR model with that module as
                                its speculative drafter (``decode.py --models spec``)

Tensors are read one at a time into a preallocated numpy tree of the model's final shapes
(``hf_mapping.load_into``): reading never holds more than that one copy of the parameters plus
a tensor (and the mapped pages of the shard being read). Saving it with orbax buffers about one
more copy of what each checkpoint holds (OCDBT), so the peak is about two copies
(``benchmarks/convert_memory.py``). Every key of the checkpoint must have a place in the model
and every backbone key must be present. The MTP
head is the checkpoint's own ``mtp.*`` module when it has one (``mtp_init: native``), else a
copy of the last full-attention layer; the compressor and the confidence head come from the
checkpoint when it is a PIPO export, else they are freshly initialised.

``pipo-to-hf`` writes the PIPO parameters (``opd`` when the run has them, else ``sft``) back in
the reference key layout, streamed one tensor at a time into safetensors shards, with
config.json (the imported one plus ``compressor_type``) and the run's tokenizer files.
HF → PIPO → HF is bit-exact for every text and MTP tensor; the vision tower of a VLM checkpoint
is not carried. A LoRA run is exported with its adapters merged.

``merge-lora`` folds the LoRA adapters of a run's stages into their kernels and writes a new run
directory of params-only checkpoints in the plain layout (tuner ``full``), with the run's
tokenizer and Hugging Face config: load it, export it, or fine-tune it further with any tuner.

Each command refuses an ``--out`` that is, contains or is inside its input, and writes into a
staging folder beside ``--out`` that replaces the converter's own entries there only once it is
complete (``_staged_out``): a failed conversion never costs the previous output.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import resource
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import jax
import ml_dtypes
import numpy as np
from flax import linen as nn

from pipo_jax.cli import parse_bytes, run_main
from pipo_jax.config import (
    PIPO_STAGES,
    STAGES,
    Config,
    DataConfig,
    ModelConfig,
    config_from_json,
    save_config,
)
from pipo_jax.errors import ConvertError
from pipo_jax.io import checkpoint as ckpt
from pipo_jax.io.hf import mapping as hm
from pipo_jax.io.run_dir import checkpoint_adapters, latest_pipo_stage, load_params
from pipo_jax.io.tokenizer import HFTokenizer, tokenizer_path
from pipo_jax.model.layers import layer_slot
from pipo_jax.model.pipo import backbone_layer, init_params, pipo_from_ar

HF_CONFIG = "hf_config.json"  # the source config.json, in the run directory
HF_DTYPES = "hf_dtypes.json"  # {key: dtype} of tensors stored in another dtype than the config's
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD = "2GB"
# Module of the PIPO tree ← group of hf_mapping's key table.
MODULES = {"mtp": "mtp_head", "compressor": "compressor", "confidence": "confidence_head"}
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
          "float16": np.dtype(np.float16)}
_ST_DTYPE = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16",
             np.dtype(np.float16): "F16", np.dtype(np.float64): "F64"}


# ------------------------------------------------------------------------------------ helpers


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ConvertError(f"{path} is missing: {what}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path} is not valid JSON ({e})") from e


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                    encoding="utf-8")


def _check_out(out: Path, force: bool, inputs: dict[str, Path]) -> None:
    """Refuses a non-empty ``out`` unless ``force``, and always an ``out`` that is, contains or
    is inside one of the ``inputs`` (flag → path): a conversion never writes over its source."""
    target = out.resolve()
    for flag, path in inputs.items():
        source = path.resolve()
        relation = ("is" if target == source else "is inside" if source in target.parents
                    else "contains" if target in source.parents else None)
        if relation is not None:
            raise ConvertError(f"--out {out} {relation} the input {flag} {path}; choose an "
                               "output directory outside the input")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConvertError(f"--out {out} is not empty; choose a new directory or pass --force "
                           "to replace the converted files in it")


@contextlib.contextmanager
def _staged_out(out: Path, force: bool, inputs: dict[str, Path],
                replaced: Iterable[str]) -> Iterator[Path]:
    """Yields an empty staging directory beside ``out`` for the conversion to write into; on
    success its entries replace those of ``out``, on failure it is deleted and ``out`` is as it
    was. With ``force``, ``replaced`` names (globs) the entries of ``out`` a conversion owns:
    they are moved aside only once the new output is complete, then deleted; anything else in
    ``out`` is kept."""
    _check_out(out, force, inputs)
    out = out.resolve()  # "." must stage beside the directory, not inside it
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.partial"
    old = out.parent / f".{out.name}.replaced"
    if old.exists():  # a conversion killed while swapping: those are the old output's entries
        raise ConvertError(f"{old} holds entries of {out} from a conversion interrupted while "
                           "replacing them; move them back into it or delete that folder")
    if stage.exists():  # an incomplete output of a conversion killed while writing
        shutil.rmtree(stage)
    stage.mkdir()
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    out.mkdir(exist_ok=True)
    old.mkdir()
    if force:
        for pattern in replaced:
            for entry in out.glob(pattern):
                entry.rename(old / entry.name)
    for entry in stage.iterdir():
        if (out / entry.name).exists() or (out / entry.name).is_symlink():
            (out / entry.name).rename(old / entry.name)
        entry.rename(out / entry.name)
    shutil.rmtree(old)
    stage.rmdir()


def _release_freed_memory() -> None:
    """Returns freed heap pages to the OS (glibc only; elsewhere a no-op).

    An orbax/OCDBT save buffers about one copy of what it writes; glibc keeps those pages
    after the save, spread over per-thread arenas that the next save does not reliably reuse,
    so two saves in a row could peak at three copies of the model instead of two.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def _dtype_name(dtype: np.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(np.dtype(dtype), str(dtype))


# ------------------------------------------------------------------------- reading safetensors


def safetensors_files(hf_dir: Path) -> list[Path]:
    """The checkpoint's shard files: those named by the index, else every ``*.safetensors``."""
    index = hf_dir / INDEX
    if index.is_file():
        weight_map = _read_json(index, "").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConvertError(f"{index} has no weight_map")
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConvertError(f"{index} names shard(s) missing from {hf_dir}: "
                               f"{', '.join(missing)}")
        return files
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise ConvertError(f"no *.safetensors file in {hf_dir} (only safetensors checkpoints are "
                           "read; convert .bin/.pth ones with transformers first)")
    return files


def iter_checkpoint(files: list[Path], wanted: Any = None, dtypes: dict[str, str] | None = None,
                    keys: set[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(key, array)`` of every tensor, reading one at a time (bf16 as ml_dtypes).

    ``wanted(key)`` False skips a tensor without reading it; ``dtypes`` collects each yielded
    key's stored dtype and ``keys`` every key of the files, skipped ones included.
    """
    from safetensors import SafetensorError, safe_open

    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as f:
                for key in f.keys():
                    if keys is not None:
                        keys.add(key)
                    if wanted is not None and not wanted(key):
                        continue
                    value = f.get_tensor(key)
                    if dtypes is not None:
                        dtypes[key] = _dtype_name(value.dtype)
                    yield key, value
        except (SafetensorError, OSError) as e:
            raise ConvertError(f"{file} is not a readable safetensors file ({e}); copy it again "
                               "from the model's repository") from e


def _check_index(hf_dir: Path, seen: set[str]) -> None:
    """The index's weight_map must list exactly the tensors the shards hold."""
    index = hf_dir / INDEX
    if not index.is_file():
        return
    listed = set(_read_json(index, "")["weight_map"])
    extra, absent = sorted(seen - listed), sorted(listed - seen)
    if extra or absent:
        raise ConvertError(
            f"{index} does not match its shards: "
            + "; ".join(p for p in (f"not listed: {', '.join(extra[:4])}" if extra else "",
                                    f"listed but absent: {', '.join(absent[:4])}" if absent
                                    else "") if p))


# ------------------------------------------------------------------------- writing safetensors


class SafetensorsWriter:
    """Streams tensors into ``model.safetensors`` or ``model-0000i-of-0000N.safetensors``
    shards of at most ``max_bytes`` (a larger tensor gets a shard of its own), one tensor in
    memory at a time, plus ``model.safetensors.index.json`` when there are several shards.

    Each shard's header space is reserved up front from ``all_keys`` (an upper bound), padded
    with spaces as the format allows, and written once the shard's tensors are on disk.
    """

    def __init__(self, out_dir: Path, max_bytes: int, all_keys: Iterable[str]) -> None:
        self.out_dir, self.max_bytes = out_dir, max_bytes
        reserve = 64 + sum(len(json.dumps(k)) + 192 for k in all_keys)
        self._reserve = -(-reserve // 8) * 8  # the data starts 8-byte aligned
        self._shards: list[tuple[Path, dict[str, Any]]] = []  # (tmp path, header entries)
        self._file: Any = None
        self._offset = 0
        self.total_bytes = 0

    def _open(self) -> None:
        path = self.out_dir / f".shard-{len(self._shards):05d}.tmp"
        self._file = open(path, "wb")  # noqa: SIM115 - closed in _close
        self._file.seek(8 + self._reserve)
        self._shards.append((path, {}))
        self._offset = 0

    def _close(self) -> None:
        if self._file is None:
            return
        entries = self._shards[-1][1]
        header = json.dumps({"__metadata__": {"format": "pt"}, **entries},
                            separators=(",", ":")).encode()
        if len(header) > self._reserve:  # pragma: no cover - the reserve is an upper bound
            raise AssertionError(f"safetensors header of {len(header)} bytes exceeds its reserve")
        self._file.seek(0)
        self._file.write(self._reserve.to_bytes(8, "little"))
        self._file.write(header + b" " * (self._reserve - len(header)))
        self._file.close()
        self._file = None

    def add(self, key: str, value: np.ndarray) -> None:
        value = np.ascontiguousarray(value)
        if value.dtype not in _ST_DTYPE:
            raise ConvertError(f"{key}: dtype {value.dtype} cannot be written to safetensors")
        if self._file is not None and self._offset and \
                self._offset + value.nbytes > self.max_bytes:
            self._close()
        if self._file is None:
            self._open()
        self._file.write(value.reshape(-1).view(np.uint8).data)
        self._shards[-1][1][key] = {"dtype": _ST_DTYPE[value.dtype], "shape": list(value.shape),
                                    "data_offsets": [self._offset, self._offset + value.nbytes]}
        self._offset += value.nbytes
        self.total_bytes += value.nbytes

    def finish(self) -> list[Path]:
        """Closes the last shard, names the files and writes the index; returns the files."""
        self._close()
        n = len(self._shards)
        names = (["model.safetensors"] if n == 1 else
                 [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        weight_map = {}
        for (tmp, entries), name in zip(self._shards, names, strict=True):
            tmp.replace(self.out_dir / name)
            weight_map.update(dict.fromkeys(entries, name))
        if n > 1:
            _write_json(self.out_dir / INDEX, {"metadata": {"total_size": self.total_bytes},
                                               "weight_map": weight_map})
        return [self.out_dir / name for name in names]

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        for tmp, _ in self._shards:
            tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- hf → pipo


def model_config(hf_config: dict[str, Any], param_dtype: str = "float32",
                 compressor_type: str | None = None, max_context: int | None = None,
                 source: str = "config.json") -> ModelConfig:
    """The ``ModelConfig`` of a config.json (``source``: its path, for error messages) plus
    the converter's options."""
    overrides: dict[str, Any] = {"param_dtype": param_dtype}
    if compressor_type is not None:
        saved = hf_config.get("compressor_type")
        if saved is not None and saved != compressor_type:
            raise ConvertError(f"--compressor-type {compressor_type} conflicts with this PIPO "
                               f"export's compressor_type {saved!r} (its compressor weights "
                               "would not fit); drop the option")
        overrides["compressor_type"] = compressor_type
    if max_context is not None:
        overrides["max_context"] = max_context
    try:
        return hm.config_from_hf(hf_config, source, **overrides)
    except hm.MappingError as e:
        raise ConvertError(str(e)) from e


def abstract_pipo_params(cfg: ModelConfig) -> Any:
    """Shapes and dtypes of the (unboxed) PIPO parameter tree, without allocating it."""
    return jax.eval_shape(lambda k: nn.unbox(init_params(cfg, True, k)), jax.random.key(0))


def fresh_modules(cfg: ModelConfig, params: dict, modules: Iterable[str], seed: int) -> dict:
    """The PIPO ``modules`` a checkpoint lacks, as ``model.pipo_from_ar`` builds them.

    None of them depends on the vocabulary or on the depth, so ``pipo_from_ar`` runs on a
    stand-in model of one layer pattern and a two-token vocabulary whose backbone is the last
    full-attention layer of ``params`` (all the ``last_layer`` MTP init reads): no second copy
    of the backbone or the embedding is ever built.
    """
    modules = tuple(modules)
    if not modules:
        return {}
    pattern = cfg.layer_pattern
    slot, _ = layer_slot(cfg, cfg.last_full_attention)
    layer = jax.tree.map(lambda x: x[None],
                         backbone_layer(cfg, params["backbone"], cfg.last_full_attention))
    small = dataclasses.replace(
        cfg, vocab_size=2, n_layers=len(pattern),
        layer_types=pattern if cfg.layer_types else (),
        mtp_init="random" if cfg.mtp_init == "native" else cfg.mtp_init)

    @jax.jit  # one compile instead of one per op of the init
    def build(layer: dict, final_norm: dict, rng: jax.Array) -> dict:
        stand_in = {"embedder": None, "backbone": {"final_norm": final_norm,
                                                   "layers": {slot: layer}}}
        built = pipo_from_ar(small, stand_in, rng)
        return {m: built[m] for m in modules}

    built = build(layer, params["backbone"]["final_norm"], jax.random.key(seed))
    return jax.tree.map(np.asarray, built)


def hf_to_pipo(hf_dir: str | Path, out: str | Path, param_dtype: str = "float32",
               compressor_type: str | None = None, max_context: int | None = None,
               seed: int = 0, force: bool = False, log: Any = print,
               drafter: bool = True) -> dict[str, Any]:
    """Converts a local Hugging Face folder into a run directory; returns a summary dict.

    ``drafter``: with a native ``mtp.*``, also write the ``mtp`` stage (the AR model with that
    module as its speculative drafter; one more copy of the backbone on disk)."""
    hf_dir, out = Path(hf_dir), Path(out)
    if not hf_dir.is_dir():
        raise ConvertError(f"--hf-dir {hf_dir} is not a directory")
    inputs = {"--hf-dir": hf_dir}
    _check_out(out, force, inputs)  # first: an output over the input is refused whatever else
    hf_config = _read_json(hf_dir / "config.json",
                           "--hf-dir must be a Hugging Face model folder with its config.json")
    if not isinstance(hf_config, dict):
        raise ConvertError(f"{hf_dir / 'config.json'} is not a JSON object")
    cfg = model_config(hf_config, param_dtype, compressor_type, max_context,
                       str(hf_dir / "config.json"))
    if not (hf_dir / "tokenizer.json").is_file():
        raise ConvertError(f"no tokenizer.json in {hf_dir}: copy the model's tokenizer.json and "
                           "tokenizer_config.json there")
    try:
        HFTokenizer.from_dir(hf_dir, cfg.vocab_size)
    except (ValueError, OSError, ImportError) as e:
        raise ConvertError(f"the tokenizer in {hf_dir} cannot be used: {e}") from e
    files = safetensors_files(hf_dir)

    # One preallocated numpy tree of the final shapes; untouched pages cost no memory.
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract_pipo_params(cfg))
    seen: dict[str, str] = {}  # key → dtype of the tensors read
    stored: set[str] = set()  # every key of the files, the ignored vision tower's included
    wanted = lambda key: hm.canonical_key(cfg, key) is not None
    try:
        groups = hm.load_into(cfg, iter_checkpoint(files, wanted, seen, stored), params)
    except hm.MappingError as e:
        raise ConvertError(f"{hf_dir}: {e}") from e
    _check_index(hf_dir, stored)

    cfg = dataclasses.replace(cfg, mtp_init="native" if "mtp" in groups else "last_layer")
    missing = [MODULES[g] for g in ("mtp", "compressor", "confidence") if g not in groups]
    for module, value in fresh_modules(cfg, params, missing, seed).items():
        params[module] = jax.tree.map(lambda new, old: new.astype(old.dtype), value,
                                      params[module])

    # The default training length, unless the model's context is shorter (a row must fit it).
    data = DataConfig(max_len=min(DataConfig().max_len, cfg.max_context))
    config = Config(run_dir=str(out), stages=("sft",), tokenizer=TOKENIZER_DIR, model=cfg,
                    data=data)
    ar_params = {"embedder": params["embedder"], "backbone": params["backbone"]}
    trees = [("ar", ar_params), ("sft", params)]
    if drafter and "mtp" in groups:  # its own drafter: the speculative baseline (issue #16)
        trees.insert(1, ("mtp", {**ar_params, "mtp_head": params["mtp_head"]}))
    with _staged_out(out, force, inputs, ("ar", "mtp", "sft", TOKENIZER_DIR, "config.json",
                                          HF_CONFIG, HF_DTYPES)) as stage:
        _copy_tokenizer(hf_dir, stage / TOKENIZER_DIR)
        shutil.copyfile(hf_dir / "config.json", stage / HF_CONFIG)
        main_dtype = _source_dtype(hf_config)
        odd = {hm.canonical_key(cfg, k): d for k, d in seen.items() if d != main_dtype}
        if odd:
            _write_json(stage / HF_DTYPES, odd)
        save_config(config, stage / "config.json")
        for name, tree in trees:
            ckpt.save_params(stage / name, 0, tree, config, name,
                             getattr(config, name).keep_checkpoints)
            _release_freed_memory()

    n_params = sum(x.size for x in jax.tree.leaves(params))
    summary = {
        "family": cfg.family, "n_layers": cfg.n_layers, "layer_pattern": list(cfg.layer_pattern),
        "params": n_params, "param_dtype": cfg.param_dtype,
        "from_checkpoint": sorted(groups), "initialised": missing, "mtp_init": cfg.mtp_init,
        "stages": [stage for stage, _ in trees],
        "compressor_type": cfg.compressor_type, "tensors_read": len(seen),
        "peak_rss_mb": round(peak_rss_mb(), 1), "run_dir": str(out)}
    pattern = "/".join("full" if t == "full_attention" else "linear" for t in cfg.layer_pattern)
    log(f"{hf_dir} → {out}\n"
        f"  family {cfg.family}, {cfg.n_layers} layers ({cfg.n_blocks} × [{pattern}]), "
        f"{n_params / 1e6:.2f}M params ({cfg.param_dtype})\n"
        f"  from the checkpoint: {', '.join(sorted(groups))} ({len(seen)} tensors); "
        f"initialised: {', '.join(missing) or 'nothing'} (mtp_init {cfg.mtp_init}, "
        f"{cfg.compressor_type} compressor)\n"
        f"  stages written: {', '.join(stage for stage, _ in trees)}\n"
        f"  peak host RSS {summary['peak_rss_mb']:.0f} MB")
    return summary


def _source_dtype(hf_config: dict[str, Any]) -> str:
    """The dtype a config.json records ("dtype", older "torch_dtype", or its text_config's)."""
    for node in (hf_config, hf_config.get("text_config")):
        for key in ("dtype", "torch_dtype"):
            if isinstance(node, dict) and isinstance(node.get(key), str) and node[key] in DTYPES:
                return node[key]
    return "float32"


# ---------------------------------------------------------------------------------- pipo → hf


def pipo_to_hf(run: str | Path, out: str | Path, dtype: str | None = None,
               step: int | None = None, max_shard_size: str = DEFAULT_SHARD,
               force: bool = False, log: Any = print, stage: str | None = None) -> dict[str, Any]:
    """Exports a run's PIPO parameters (``stage``: default the latest, ``opd`` when the run has
    it, else ``sft``) as a Hugging Face folder; returns a summary."""
    run, out = Path(run), Path(out)
    max_bytes = parse_bytes(max_shard_size, "--max-shard-size", ConvertError)
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    base = _read_json(run / HF_CONFIG, "") if (run / HF_CONFIG).is_file() else None
    per_key: dict[str, str] = {}
    if dtype is None:
        dtype = _source_dtype(base) if base is not None else "float32"
        if (run / HF_DTYPES).is_file():
            per_key = _read_json(run / HF_DTYPES, "")
    inputs = {"--run": run}
    _check_out(out, force, inputs)
    params, config = load_params(run / (stage or latest_pipo_stage(run)), True, step)
    cfg = config.model
    with _staged_out(out, force, inputs, ("config.json", INDEX, *TOKENIZER_FILES,
                                          "*.safetensors")) as staging:
        writer = SafetensorsWriter(staging, max_bytes, hm.key_table(cfg))
        try:
            for key, value in hm.iter_hf_tensors(cfg, params):
                writer.add(key, value.astype(DTYPES[per_key.get(key, dtype)], copy=False))
            files = writer.finish()
        except BaseException:
            writer.abort()
            raise
        hf_config = hm.hf_config_from_model(cfg, base, dtype)
        if base is not None and dtype != _source_dtype(base):
            for node in (hf_config, hf_config.get("text_config") or {}):
                for key in ("dtype", "torch_dtype"):
                    if key in node:
                        node[key] = dtype
        _write_json(staging / "config.json", hf_config)
        tok_path = tokenizer_path(config.tokenizer, run)
        tok_dir = tok_path if tok_path is None or tok_path.is_dir() else tok_path.parent
        copied = _copy_tokenizer(tok_dir, staging) if tok_dir is not None else []

    summary = {"files": [f.name for f in files], "bytes": writer.total_bytes, "dtype": dtype,
               "tokenizer_files": copied, "peak_rss_mb": round(peak_rss_mb(), 1),
               "out": str(out)}
    note = ""
    if base is not None and base.get("vision_config") is not None:
        note = "\n  note: the vision tower of the source VLM checkpoint is not included"
    log(f"{run} → {out}\n  {len(files)} safetensors file(s), {writer.total_bytes / 1e6:.1f} MB "
        f"({dtype}), tokenizer: {', '.join(copied) or 'none'}\n"
        f"  peak host RSS {summary['peak_rss_mb']:.0f} MB{note}")
    return summary


# ---------------------------------------------------------------------------------- merge-lora


def merge_lora(run: str | Path, out: str | Path, step: int | None = None, force: bool = False,
               log: Any = print) -> dict[str, Any]:
    """Writes ``out``: ``run`` with every stage's LoRA adapters merged (``lora.merge``).

    Each stage keeps its checkpoint step (``step`` selects the ``sft`` one; default the latest)
    and becomes a params-only checkpoint, so ``train.py`` on ``out`` starts from it with a fresh
    optimizer. Refuses a run without adapters (there is nothing to merge).
    """
    run, out = Path(run), Path(out)
    if not (run / "config.json").is_file():
        raise ConvertError(f"--run {run} is not a run directory (no config.json)")
    inputs = {"--run": run}
    _check_out(out, force, inputs)
    stages = [s for s in STAGES if ckpt.latest_step(run / s) is not None]
    if not stages:
        raise ConvertError(f"{run} has no checkpoints to merge")
    with_lora = [s for s in stages if checkpoint_adapters(
        run / s, s in PIPO_STAGES, step if s == "sft" else None)[0] is not None]
    if not with_lora:
        raise ConvertError(f"{run} has no LoRA adapters to merge (its stages were trained with "
                           "tuner: full or are params-only); use it as it is")
    base = config_from_json(run / "config.json")
    config = dataclasses.replace(
        base, run_dir=str(out),
        **{s: dataclasses.replace(getattr(base, s), tuner="full") for s in STAGES
           if getattr(base, s).tuner == "lora"})
    extra = [n for n in (HF_CONFIG, HF_DTYPES) if (run / n).is_file()]
    tok = tokenizer_path(base.tokenizer, run)
    steps = {}
    with _staged_out(out, force, inputs, (*STAGES, TOKENIZER_DIR, "config.json",
                                          *extra)) as staging:
        if tok is not None:
            tok_dir = tok if tok.is_dir() else tok.parent
            _copy_tokenizer(tok_dir, staging / TOKENIZER_DIR)
            config = dataclasses.replace(config, tokenizer=TOKENIZER_DIR)
        for name in extra:
            shutil.copyfile(run / name, staging / name)
        save_config(config, staging / "config.json")
        for stage in stages:
            at = step if stage == "sft" and step is not None else ckpt.latest_step(run / stage)
            params, _ = load_params(run / stage, stage in PIPO_STAGES, at)
            steps[stage] = int(at)
            ckpt.save_params(staging / stage, at, params, config, stage,
                             getattr(config, stage).keep_checkpoints)
    log(f"{run} → {out}\n  merged LoRA adapters of: {', '.join(with_lora)}; steps "
        + ", ".join(f"{s} {n}" for s, n in steps.items()))
    return {"merged": with_lora, "steps": steps, "out": str(out)}


# ----------------------------------------------------------------------------------------- cli


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipo_jax.io.hf.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("hf-to-pipo", help="a local Hugging Face folder → a run directory")
    imp.add_argument("--hf-dir", required=True, help="folder with config.json, *.safetensors "
                     "and tokenizer.json")
    imp.add_argument("--out", required=True, help="run directory to create")
    imp.add_argument("--param-dtype", choices=("float32", "bfloat16"), default="float32")
    imp.add_argument("--compressor-type", choices=("mlp", "linear"),
                     help="default: the checkpoint's (a PIPO export), else mlp")
    imp.add_argument("--max-context", type=int,
                     help="longest context the decode caches hold (default: the checkpoint's "
                     "max_position_embeddings)")
    imp.add_argument("--seed", type=int, default=0, help="seed of the freshly initialised modules")
    imp.add_argument("--no-drafter", action="store_true", help="do not write the mtp/ stage "
                     "(the native MTP module as a speculative drafter: one more copy of the "
                     "backbone on disk)")
    imp.add_argument("--force", action="store_true", help="replace a previous conversion in --out")
    exp = sub.add_parser("pipo-to-hf", help="a run's PIPO model → a Hugging Face folder")
    exp.add_argument("--run", required=True, help="run directory (its sft/ checkpoint)")
    exp.add_argument("--out", required=True, help="folder to write")
    exp.add_argument("--dtype", choices=sorted(DTYPES),
                     help="tensor dtype (default: the imported checkpoint's, else float32)")
    exp.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    exp.add_argument("--stage", choices=PIPO_STAGES,
                     help="PIPO stage to export (default: opd when the run has it, else sft)")
    exp.add_argument("--max-shard-size", default=DEFAULT_SHARD,
                     help=f"largest safetensors file (default {DEFAULT_SHARD})")
    exp.add_argument("--force", action="store_true", help="replace the files of a previous "
                     "export in --out")
    merge = sub.add_parser("merge-lora", help="a LoRA run → a run with the adapters merged")
    merge.add_argument("--run", required=True, help="run directory trained with tuner: lora")
    merge.add_argument("--out", required=True, help="run directory to create")
    merge.add_argument("--step", type=int, help="sft checkpoint step (default: the latest)")
    merge.add_argument("--force", action="store_true", help="replace a previous merge in --out")
    args = parser.parse_args(argv)
    if args.command == "merge-lora":
        merge_lora(args.run, args.out, args.step, args.force)
    elif args.command == "hf-to-pipo":
        if args.max_context is not None and (args.max_context <= 0 or args.max_context % 2):
            raise ConvertError(f"--max-context must be a positive even number, got "
                               f"{args.max_context}")
        hf_to_pipo(args.hf_dir, args.out, args.param_dtype, args.compressor_type,
                   args.max_context, args.seed, args.force, drafter=not args.no_drafter)
    else:
        pipo_to_hf(args.run, args.out, args.dtype, args.step, args.max_shard_size, args.force,
                   stage=args.stage)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))

"""``python -m pipo_jax.io.hf.convert``: tiny random Hugging Face models built locally (no hub).

Covers hf-to-pipo (Qwen3.5 tied/untied, bf16, sharded with an index, the VLM layout with a
vision tower, Qwen3), logits parity with ``transformers``, the native MTP head, exact round trips
HF → PIPO → HF and PIPO → HF → PIPO, and the one-line user errors.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import random_params

from pipo_jax.cli import run_main
from pipo_jax.config import Config, ConfigError, DataConfig, ModelConfig
from pipo_jax.decode.runner import load, load_params
from pipo_jax.io import checkpoint as ckpt
from pipo_jax.io.hf import mapping as hm
from pipo_jax.io.hf.convert import main
from pipo_jax.model.pipo import PipoLM, backbone_layer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
import hf_reference  # noqa: E402 (imports torch and transformers: after the skips)
from safetensors.numpy import load_file, save_file  # noqa: E402

VOCAB = 288  # ≥ the tiny tokenizer's ids
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CORPUS = ["hello world", "what is 12 + 30? the answer is 42.", "the quick brown fox"]
TEXT35 = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
              linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
              linear_conv_kernel_dim=4, rms_norm_eps=1e-6, max_position_embeddings=512,
              rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                               "partial_rotary_factor": 0.25})


def _tokenizer(directory: Path) -> None:
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 8, special_tokens=SPECIALS,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>"}))


def _mtp_tensors(d: int, seed: int, dtype: np.dtype) -> dict[str, np.ndarray]:
    """Random ``mtp.*`` tensors (QWEN3_5.md §4) of the tiny Qwen3.5 config."""
    rng = np.random.default_rng(seed)
    hd, h, kv, f = TEXT35["head_dim"], TEXT35["num_attention_heads"], \
        TEXT35["num_key_value_heads"], TEXT35["intermediate_size"]
    shapes = {"mtp.fc.weight": (d, 2 * d), "mtp.pre_fc_norm_embedding.weight": (d,),
              "mtp.pre_fc_norm_hidden.weight": (d,), "mtp.norm.weight": (d,),
              "mtp.layers.0.input_layernorm.weight": (d,),
              "mtp.layers.0.post_attention_layernorm.weight": (d,),
              "mtp.layers.0.self_attn.q_proj.weight": (2 * h * hd, d),
              "mtp.layers.0.self_attn.k_proj.weight": (kv * hd, d),
              "mtp.layers.0.self_attn.v_proj.weight": (kv * hd, d),
              "mtp.layers.0.self_attn.o_proj.weight": (d, h * hd),
              "mtp.layers.0.self_attn.q_norm.weight": (hd,),
              "mtp.layers.0.self_attn.k_norm.weight": (hd,),
              "mtp.layers.0.mlp.gate_proj.weight": (f, d),
              "mtp.layers.0.mlp.up_proj.weight": (f, d),
              "mtp.layers.0.mlp.down_proj.weight": (d, f)}
    return {k: (rng.normal(size=s) * (0.3 if len(s) == 1 else 0.15)).astype(dtype)
            for k, s in shapes.items()}


def _add_mtp(folder: Path, tensors: dict[str, np.ndarray]) -> None:
    """Adds ``tensors`` as their own shard (sharded folders) or into model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        save_file(tensors, str(folder / "mtp.safetensors"), metadata={"format": "pt"})
        data = json.loads(index.read_text())
        data["weight_map"].update(dict.fromkeys(tensors, "mtp.safetensors"))
        index.write_text(json.dumps(data))
    else:
        file = folder / "model.safetensors"
        save_file({**load_file(str(file)), **tensors}, str(file), metadata={"format": "pt"})


@dataclasses.dataclass
class HFModel:
    folder: Path
    model: object  # the torch model, fp32, eval mode
    tensors: dict[str, np.ndarray]  # every tensor of the folder (text + mtp + visual)
    mtp: object = None  # HF's MtpModel whose weights are the folder's mtp.* (mtp="hf")


def _build(root: Path, kind: str, tie: bool, dtype: str = "float32", mtp: str | None = "random",
           shard: str | None = None, seed: int = 0) -> HFModel:
    """``mtp``: ``"random"`` tensors, ``"hf"`` (the weights of a randomised ``MtpModel``, a
    reference forward for the native drafter), or None."""
    t = transformers
    torch.manual_seed(seed)
    if kind == "qwen3_5":
        model = t.Qwen3_5ForCausalLM(t.Qwen3_5TextConfig(**TEXT35, tie_word_embeddings=tie))
    elif kind == "vlm":
        vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                      out_hidden_size=TEXT35["hidden_size"], patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        model = t.Qwen3_5ForConditionalGeneration(t.Qwen3_5Config(
            text_config={**TEXT35, "tie_word_embeddings": tie}, vision_config=vision,
            tie_word_embeddings=tie))
    else:
        model = t.Qwen3ForCausalLM(t.Qwen3Config(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
            max_position_embeddings=512, tie_word_embeddings=tie, rope_theta=1e4))
    model.eval()
    hf_reference.randomize_(model, seed, plain_norms=kind == "qwen3")
    if tie:
        model.tie_weights()
    folder = root / f"{kind}-{'tied' if tie else 'untied'}-{dtype}{'-sharded' if shard else ''}"
    saved = model.to(getattr(torch, dtype))
    saved.save_pretrained(str(folder), **({"max_shard_size": shard} if shard else {}))
    model = model.float()
    reference = None
    if mtp == "hf":
        assert dtype == "float32", "the MtpModel reference is float32"
        reference = hf_reference.build_mtp(model, seed + 1)
        _add_mtp(folder, hf_reference.mtp_checkpoint(reference))
    elif mtp == "random":
        np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
        _add_mtp(folder, _mtp_tensors(TEXT35["hidden_size"], seed + 1, np_dtype))
    _tokenizer(folder)
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return HFModel(folder, model, tensors, reference)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, HFModel]:
    root = tmp_path_factory.mktemp("hf")
    return {
        "q35_untied_sharded": _build(root, "qwen3_5", tie=False, mtp="hf", shard="40KB"),
        "q35_tied_bf16": _build(root, "qwen3_5", tie=True, dtype="bfloat16", seed=1),
        "vlm": _build(root, "vlm", tie=False, seed=2, shard="200KB"),
        "qwen3": _build(root, "qwen3", tie=True, mtp=None, seed=3),
    }


@pytest.fixture(scope="module")
def runs(hf_models: dict[str, HFModel], tmp_path_factory: pytest.TempPathFactory
         ) -> dict[str, Path]:
    """Each HF model converted with the CLI (in process)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, hf in hf_models.items():
        out[name] = root / name
        extra = ["--compressor-type", "linear"] if name == "qwen3" else []
        assert main(["hf-to-pipo", "--hf-dir", str(hf.folder), "--out", str(out[name]),
                     "--max-context", "256", *extra]) == 0
    return out


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens)).logits.float().numpy()


@functools.partial(jax.jit, static_argnums=0)
def _ar_forward(cfg: ModelConfig, params: dict, tokens: jax.Array) -> jax.Array:
    model = PipoLM(cfg, False)
    h = model.apply({"params": params}, tokens)["h"]
    return model.apply({"params": params}, h, method=PipoLM.logits)


def _ar_logits(run: Path, tokens: np.ndarray) -> np.ndarray:
    params, config = load_params(run / "ar", False)
    return np.asarray(_ar_forward(config.model, params, jnp.asarray(tokens)))


# ------------------------------------------------------------------------------------ hf→pipo


def test_converted_runs_generate(runs: dict[str, Path]):
    run = runs["q35_untied_sharded"]
    config = json.loads((run / "config.json").read_text())
    assert config["stages"] == ["sft"] and config["tokenizer"] == "tokenizer"
    assert config["model"]["mtp_init"] == "native" and config["model"]["max_context"] == 256
    assert (run / "tokenizer" / "tokenizer.json").is_file()
    assert json.loads((run / "hf_config.json").read_text())["model_type"] == "qwen3_5_text"
    assert ckpt.all_steps(run / "ar") == [0] and ckpt.all_steps(run / "sft") == [0]
    # PIPO on the hybrid Qwen3.5 run (native MTP head), AR on the Qwen3 one: each compile of
    # a decode loop costs seconds, so each family decodes once.
    for name, model in (("q35_untied_sharded", "pipo"), ("qwen3", "ar")):
        runner = load(runs[name])
        assert runner.tokenizer.vocab_size == VOCAB and runner.ar_params is not None
        out = runner.generate("What is 12 + 30?", model=model, max_new_tokens=4)
        assert isinstance(out[0].text, str) and 0 < out[0].stats["tokens"] <= 4


@pytest.mark.parametrize("name", ["q35_untied_sharded", "q35_tied_bf16", "vlm", "qwen3"])
def test_ar_logits_match_transformers(name: str, hf_models: dict[str, HFModel],
                                      runs: dict[str, Path]):
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, 11))
    ref = _hf_logits(hf_models[name].model, tokens)[:, :-1]  # the VLM: text-only input
    ours = _ar_logits(runs[name], tokens)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
    assert np.abs(ref).max() > 0.5  # not a trivially small comparison


@pytest.mark.parametrize("name", ["q35_untied_sharded", "q35_tied_bf16", "qwen3"])
def test_mtp_head(name: str, hf_models: dict[str, HFModel], runs: dict[str, Path]):
    params, config = load_params(runs[name] / "sft", True)
    cfg = config.model
    if name == "qwen3":  # no native MTP: a copy of the last full-attention layer
        assert cfg.mtp_init == "last_layer" and cfg.compressor_type == "linear"
        last = backbone_layer(cfg, params["backbone"], cfg.n_layers - 1)
        jax.tree.map(np.testing.assert_array_equal, params["mtp_head"]["layer"], last)
        return
    assert cfg.mtp_init == "native"
    source = {k: v for k, v in hf_models[name].tensors.items() if k.startswith("mtp.")}
    ours = dict(hm.iter_hf_tensors(cfg, params, groups=("mtp",)))
    assert sorted(ours) == sorted(source)
    for key, value in source.items():
        np.testing.assert_array_equal(ours[key], value.astype(np.float32), err_msg=key)


@functools.partial(jax.jit, static_argnums=0)
def _draft_logits(cfg: ModelConfig, params: dict, tokens: jax.Array) -> jax.Array:
    """The drafter's logits for token t+2 from the backbone state at t and token t+1."""
    def run(m: PipoLM, tokens: jax.Array) -> jax.Array:
        h = m(tokens)["h"]  # the states of tokens[:, :-1] (the teacher-forced AR forward)
        positions = jnp.broadcast_to(jnp.arange(h.shape[1]), h.shape[:2])
        out, _ = m.mtp_head(h, m.embedder(tokens[:, 1:]), positions)
        return m.logits(out)
    return PipoLM(cfg, False, drafter=True).apply({"params": params}, tokens, method=run)


def test_native_drafter_matches_transformers_mtp(hf_models: dict[str, HFModel],
                                                  runs: dict[str, Path]):
    """An imported native ``mtp.*`` becomes the run's ``mtp`` stage: the AR model with that
    module as its speculative drafter. End to end (our backbone, our drafter) its logits equal
    ``transformers``' main model followed by its ``MtpModel``, and speculative decoding with it
    answers exactly as AR greedy does. A checkpoint without ``mtp.*`` gets no ``mtp`` stage."""
    hf, run = hf_models["q35_untied_sharded"], runs["q35_untied_sharded"]
    assert ckpt.all_steps(run / "mtp") == [0]
    assert ckpt.latest_step(runs["qwen3"] / "mtp") is None
    params, config = load_params(run / "mtp", False)
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=(2, 17))
    ids = torch.tensor(tokens)
    with torch.no_grad():
        h = hf.model.model(ids).last_hidden_state[:, :-1]  # after the final norm
        positions = torch.arange(h.shape[1])[None].expand(2, -1)
        want = hf.mtp.shared_head(
            hf.mtp.forward_layer(0, h, positions, None, input_ids=ids[:, 1:])).numpy()
    got = np.asarray(_draft_logits(config.model, params, jnp.asarray(tokens)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert np.abs(want).max() > 0.5

    runner = load(run)
    assert runner.drafter_params is not None
    prompt = "What is 12 + 30?"
    spec = runner.generate(prompt, model="spec", max_new_tokens=12)[0]
    ar = runner.generate(prompt, model="ar", max_new_tokens=12)[0]
    assert spec.text == ar.text and spec.stats["tokens"] == ar.stats["tokens"] > 0


# ------------------------------------------------------------------------------- round trips


def _same_config(exported: dict, source: dict) -> None:
    assert exported.pop("compressor_type") in ("mlp", "linear")
    assert exported.pop("pipo")["compressor_type"]
    assert exported == source


@pytest.mark.parametrize("name", ["q35_untied_sharded", "q35_tied_bf16", "vlm", "qwen3"])
def test_hf_pipo_hf_is_exact(name: str, hf_models: dict[str, HFModel], runs: dict[str, Path],
                             tmp_path: Path):
    hf = hf_models[name]
    sharded = name.startswith("q35")  # fp32 and bf16 shards
    argv = ["pipo-to-hf", "--run", str(runs[name]), "--out", str(tmp_path)]
    assert main(argv + (["--max-shard-size", "60KB"] if sharded else [])) == 0
    index = tmp_path / "model.safetensors.index.json"
    files = sorted(tmp_path.glob("*.safetensors"))
    assert (len(files) > 1) == sharded == index.is_file()
    exported = {}
    for file in files:
        exported.update(load_file(str(file)))
    if index.is_file():
        assert set(json.loads(index.read_text())["weight_map"]) == set(exported)
    for key, value in hf.tensors.items():
        if key.startswith("model.visual."):
            continue
        key_out = key  # Qwen3.5 exports write the reference prefix model.language_model.
        if name != "qwen3" and key.startswith("model.") and "language_model." not in key:
            key_out = "model.language_model." + key[len("model."):]
        got = exported.pop(key_out)
        assert got.dtype == value.dtype and got.shape == value.shape, key
        assert got.tobytes() == value.tobytes(), f"{key} is not bit-identical"
    assert all(k.startswith(("mtp.", "compressor.", "confidence_head.")) for k in exported)
    _same_config(json.loads((tmp_path / "config.json").read_text()),
                 json.loads((hf.folder / "config.json").read_text()))
    assert (tmp_path / "tokenizer.json").read_bytes() == \
        (hf.folder / "tokenizer.json").read_bytes()


def test_export_loads_in_transformers(hf_models: dict[str, HFModel], runs: dict[str, Path],
                                      tmp_path: Path):
    """The model.language_model.* layout of an export loads into Qwen3_5ForCausalLM."""
    assert main(["pipo-to-hf", "--run", str(runs["q35_untied_sharded"]), "--out",
                 str(tmp_path)]) == 0
    model = transformers.Qwen3_5ForCausalLM.from_pretrained(str(tmp_path)).eval()
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=(1, 9))
    np.testing.assert_array_equal(_hf_logits(model, tokens),
                                  _hf_logits(hf_models["q35_untied_sharded"].model, tokens))


@pytest.mark.parametrize("compressor", ["mlp", "linear"])
def test_pipo_hf_pipo_is_exact(compressor: str, tmp_path: Path, capsys: pytest.CaptureFixture):
    """A trained-looking run (every module random, no hf_config.json) survives the round trip."""
    cfg = dataclasses.replace(
        ModelConfig(), family="qwen3_5", vocab_size=VOCAB, n_layers=4, d_model=64, mlp_dim=96,
        head_dim=16, layer_types=("linear_attention",) * 3 + ("full_attention",),
        partial_rotary_factor=0.25, tie_embeddings=False, compressor_type=compressor,
        max_context=128)
    params = jax.tree.map(np.asarray, random_params(cfg, True, seed=5))
    run = tmp_path / "run"
    with ckpt.open_manager(run / "sft", keep=1) as m:
        ckpt.save(m, 7, {"step": np.int32(7), "params": params},
                  Config(run_dir=str(run), model=cfg, data=DataConfig(max_len=128)), "sft",
                  wait=True)
    hf = tmp_path / "hf"
    assert main(["pipo-to-hf", "--run", str(run), "--out", str(hf)]) == 0
    exported = json.loads((hf / "config.json").read_text())
    assert exported["compressor_type"] == compressor and exported["dtype"] == "float32"
    assert exported["model_type"] == "qwen3_5_text"
    _tokenizer(hf)  # the run uses the byte tokenizer: there is no tokenizer.json to carry
    assert main(["hf-to-pipo", "--hf-dir", str(hf), "--out", str(tmp_path / "back")]) == 0
    assert "peak host RSS" in capsys.readouterr().out
    back, back_config = load_params(tmp_path / "back" / "sft", True)
    assert back_config.model.compressor_type == compressor
    assert back_config.model.mtp_init == "native"
    assert dataclasses.replace(back_config.model, mtp_init=cfg.mtp_init) == cfg
    jax.tree.map(np.testing.assert_array_equal, back, params)


# ------------------------------------------------------------------------------------ errors


def _copy(hf: HFModel, tmp_path: Path) -> Path:
    return Path(shutil.copytree(hf.folder, tmp_path / "src"))


def _break_missing_config(folder: Path) -> None:
    (folder / "config.json").unlink()


def _break_model_type(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))


def _break_extra_tensor(folder: Path) -> None:
    file = folder / "model.safetensors"
    extra = {"model.layers.0.mlp.bias": np.zeros(3, np.float32)}
    save_file({**load_file(str(file)), **extra}, str(file), metadata={"format": "pt"})


def _break_missing_tensor(folder: Path) -> None:
    file = folder / "model.safetensors"
    tensors = load_file(str(file))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(file), metadata={"format": "pt"})


def _break_corrupt(folder: Path) -> None:
    file = folder / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])


def _break_no_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()


@pytest.mark.parametrize("breaker, message", [
    (_break_missing_config, "config.json is missing"),
    (_break_model_type, "model_type 'llama' is not supported"),
    (_break_extra_tensor, "no place in the model (wrong config or family?): "
                          "model.layers.0.mlp.bias"),
    (_break_missing_tensor, "lacks 1 backbone key(s): model.layers.1.mlp.up_proj.weight"),
    (_break_corrupt, "is not a readable safetensors file"),
    (_break_no_tokenizer, "no tokenizer.json"),
])
def test_user_errors(breaker, message: str, hf_models: dict[str, HFModel], tmp_path: Path,
                     capsys: pytest.CaptureFixture):
    folder = _copy(hf_models["qwen3"], tmp_path)
    breaker(folder)
    out = tmp_path / "run"
    assert run_main(main, ["hf-to-pipo", "--hf-dir", str(folder), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err
    assert not out.exists() or not any(out.iterdir())


def test_existing_out_needs_force(hf_models: dict[str, HFModel], tmp_path: Path,
                                  capsys: pytest.CaptureFixture):
    run = tmp_path / "run"
    argv = ["hf-to-pipo", "--hf-dir", str(hf_models["qwen3"].folder), "--out", str(run)]
    assert run_main(main, argv) == 0
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "not empty" in err and "\n" not in err
    assert run_main(main, [*argv, "--force", "--param-dtype", "bfloat16"]) == 0
    params, config = load_params(run / "sft", True)
    assert config.model.param_dtype == "bfloat16" and ckpt.all_steps(run / "sft") == [0]
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    (tmp_path / "hf" / "x").parent.mkdir()
    (tmp_path / "hf" / "x").write_text("")
    assert run_main(main, ["pipo-to-hf", "--run", str(run), "--out", str(tmp_path / "hf")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert run_main(main, ["pipo-to-hf", "--run", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


def _write_chat_jsonl(path: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(10, 99, size=2))
        lines.append(json.dumps({"id": i, "messages": [
            {"role": "system", "content": "Solve step by step."},
            {"role": "user", "content": f"what is {a} + {b}?"},
            {"role": "assistant", "content": f"<think>\n{a} + {b} = {a + b}.\n</think>\n\n"
                                             f"the answer is {a + b}."}]}))
    path.write_text("\n".join(lines) + "\n")


# Out of the default run (about 3 CPU-minutes of compiles): each piece has a faster test of its
# own — LoRA SFT (tests/test_lora.py), chat JSONL batches (tests/test_chat_jsonl.py), merged
# export read by transformers (test_export_loads_in_transformers, test_pipo_hf_pipo_is_exact),
# decode.py --bench on a run (tests/test_bench.py). `pytest -m slow` runs it.
@pytest.mark.slow
def test_lora_sft_on_chat_jsonl_from_imported_run_exports_to_transformers(
        runs: dict[str, Path], hf_models: dict[str, HFModel], tmp_path: Path):
    """The user's path end to end: a tiny random HF checkpoint (converted by the ``runs``
    fixture) is fine-tuned with LoRA on a chat JSONL file with length buckets, exported back to
    safetensors, and read by transformers. The params-only step-0 checkpoint is the start, the
    optimizer is fresh, the run resumes and loads, and only what LoRA trains has moved."""
    from safetensors.torch import load_file as torch_load_file

    from pipo_jax.config import load_config
    from pipo_jax.train.pipeline import train

    run = tmp_path / "run"
    shutil.copytree(runs["q35_untied_sharded"], run)
    _write_chat_jsonl(tmp_path / "sft.jsonl", 12)
    overrides = [f"run_dir={run}", f"data.data_dir={tmp_path / 'tfds'}", "data.source=chat_jsonl",
                 f"data.train_files=[{tmp_path / 'sft.jsonl'}]", "data.max_len=96",
                 "data.overlength=drop", "data.buckets=[64]", "data.bucket_window=2",
                 "sft.steps=3", "sft.batch_size=2", "sft.log_every=1", "sft.ckpt_every=3",
                 "sft.tuner=lora", "sft.lora.rank=4", "sft.lora.alpha=8",
                 "sft.learning_rate=1e-2"]
    cfg = load_config(run / "config.json", overrides)
    assert cfg.stages == ("sft",) and cfg.model.family == "qwen3_5"
    before, _ = load_params(run / "sft", True, step=0)
    [result] = train(cfg, progress=False)
    assert result.steps == 3 and np.isfinite(result.final_metrics["loss"])
    assert ckpt.all_steps(run / "sft") == [0, 3]
    assert "opt_state" in ckpt.saved_keys(run / "sft", 3)
    after, _ = load_params(run / "sft", True)  # adapters merged
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), before, after)
    assert moved["compressor"]["fc1"]["kernel"] and moved["confidence_head"]["fc1"]["kernel"]
    assert moved["backbone"]["layers"]["layer_3"]["attn"]["q_proj"]["kernel"]  # via LoRA
    assert moved["backbone"]["layers"]["layer_0"]["mlp"]["down_proj"]["kernel"]
    assert not any(jax.tree.leaves(moved["backbone"]["layers"]["layer_0"]["linear_attn"]))
    assert not any(jax.tree.leaves(moved["embedder"]))
    assert ckpt.all_steps(run / "ar") == [0]  # the AR baseline (the import) is untouched

    # Export (adapters merged) and read it back with transformers.
    exported = tmp_path / "hf"
    assert main(["pipo-to-hf", "--run", str(run), "--out", str(exported)]) == 0
    tensors = {}
    for file in sorted(exported.glob("*.safetensors")):
        tensors.update(torch_load_file(str(file)))
    cfg_model = cfg.model
    q = backbone_layer(cfg_model, after["backbone"], 3)["attn"]["q_proj"]["kernel"]
    np.testing.assert_array_equal(
        tensors["model.language_model.layers.3.self_attn.q_proj.weight"].numpy(),
        np.asarray(q).reshape(q.shape[0], -1).T)
    assert "compressor.mlp.0.weight" in tensors and "mtp.fc.weight" in tensors
    model = transformers.Qwen3_5ForCausalLM.from_pretrained(str(exported)).eval()
    tokens = np.random.default_rng(1).integers(0, VOCAB, size=(1, 9))
    backbone_only = {"embedder": after["embedder"], "backbone": after["backbone"]}
    ours = np.asarray(_ar_forward(cfg_model, backbone_only, jnp.asarray(tokens)))
    theirs = _hf_logits(model, tokens)[:, :-1]
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    # …and the fine-tuned model is not the imported one.
    assert np.abs(theirs - _hf_logits(hf_models["q35_untied_sharded"].model, tokens)[:, :-1]
                  ).max() > 1e-3
    # Evaluate on a benchmark file with decode.py; a chat-data run has no embedded test split,
    # and no default system prompt (its data carries its own).
    import decode

    bench = tmp_path / "mini.jsonl"
    bench.write_text("\n".join(json.dumps(q) for q in (
        {"id": "a", "question": "what is 12 + 30?", "answer": "42", "kind": "boxed"},
        {"id": "b", "question": "which is larger?", "choices": ["1", "2"], "answer": "B",
         "kind": "choice"})) + "\n")
    # The import wrote the native drafter too (mtp/), which decode.py would also run by
    # default; speculative decoding of an import is test_native_drafter_matches_transformers_mtp's.
    # PIPO only: the AR path of --bench is test_bench's, and each model is one more compile.
    assert decode.main(["--run", str(run), "--bench", str(bench), "--max-new-tokens", "4",
                        "--samples", "2", "--temperature", "1.0", "--models", "pipo",
                        "--no-progress"]) == 0
    summary = json.loads((run / "eval" / "bench" / "summary.json").read_text())
    assert summary["benchmarks"]["mini"]["models"]["pipo"]["num_questions"] == 2
    assert set(summary["benchmarks"]["mini"]["models"]) == {"pipo"}
    with pytest.raises(ConfigError, match="no test split"):
        decode.main(["--run", str(run), "--no-progress"])
    assert load(run).system_prompt == ""


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob("*"))
            if f.is_file()}


@pytest.mark.parametrize("where, relation", [("same", "is"), ("inside", "is inside"),
                                             ("parent", "contains")])
def test_out_overlapping_the_input_is_refused_and_the_input_kept(
        where: str, relation: str, hf_models: dict[str, HFModel], tmp_path: Path,
        capsys: pytest.CaptureFixture):
    """Issue #19: ``--out D --force`` with ``--hf-dir D`` used to delete ``D/config.json``."""
    folder = _copy(hf_models["qwen3"], tmp_path)
    before = _tree_bytes(folder)
    out = {"same": folder, "inside": folder / "run", "parent": tmp_path}[where]
    argv = ["hf-to-pipo", "--hf-dir", str(folder), "--out", str(out), "--force"]
    assert run_main(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: --out {out} {relation} the input --hf-dir {folder}; choose an "
                   "output directory outside the input"), err
    assert _tree_bytes(folder) == before


def test_export_into_its_run_is_refused(runs: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture):
    """Issue #19: ``pipo-to-hf --run R --out R --force`` used to replace the run's config."""
    run = Path(shutil.copytree(runs["qwen3"], tmp_path / "run"))
    before = _tree_bytes(run)
    for out in (run, run / "hf"):
        assert run_main(main, ["pipo-to-hf", "--run", str(run), "--out", str(out),
                               "--force"]) == 2
        assert "the input --run" in capsys.readouterr().err
    assert _tree_bytes(run) == before


def test_a_failed_conversion_leaves_the_previous_output_whole(
        hf_models: dict[str, HFModel], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture):
    """``--force`` replaces the old output only once the new one is complete: a disk-full
    error halfway through leaves the previous conversion as it was and no staging folder."""
    run = tmp_path / "run"
    argv = ["hf-to-pipo", "--hf-dir", str(hf_models["qwen3"].folder), "--out", str(run)]
    assert run_main(main, argv) == 0
    (run / "notes.txt").write_text("mine")  # not the converter's: kept through --force
    before = _tree_bytes(run)
    real_save, calls = ckpt.save_params, []

    def failing_save(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_params", failing_save)
    with pytest.raises(OSError, match="No space left"):
        main([*argv, "--force", "--param-dtype", "bfloat16"])
    assert calls[0].parent.name == ".run.partial"  # written beside the output, not into it
    assert _tree_bytes(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    monkeypatch.setattr(ckpt, "save_params", real_save)
    assert run_main(main, [*argv, "--force", "--param-dtype", "bfloat16"]) == 0
    params, config = load_params(run / "sft", True)
    assert config.model.param_dtype == "bfloat16" and (run / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    capsys.readouterr()

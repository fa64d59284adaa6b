"""Hugging Face Qwen3 / Qwen3.5 checkpoints ↔ pipo-jax parameters: configs and key tables.

One table per family maps every checkpoint key to a place in the Flax parameter tree and a pair
of exact (lossless) transforms. Torch ``Linear`` weights are ``[out, in]``; Flax kernels are
``[in, out]`` (attention projections split the head axis out). Backbone layer ``i`` lives at
index ``i // P`` of the stacked slot ``backbone/layers/layer_{i % P}`` (``P`` = the length of
``ModelConfig.layer_pattern``).

Key layout (the reference PyTorch implementation's, QWEN3_5.md §4):
* text tower ``model.language_model.*`` (Qwen3.5) or ``model.*`` (Qwen3; also accepted for
  Qwen3.5 on import), ``lm_head.weight`` when untied, ``model.visual.*`` ignored on import;
* the MTP module ``mtp.*`` (Qwen3.5's native one, or PIPO's head on export);
* PIPO's own modules ``compressor.*`` and ``confidence_head.*``.

This module never touches files: ``pipo_jax.io.hf.convert`` streams tensors through these tables.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from pipo_jax.config import ConfigError, ModelConfig
from pipo_jax.errors import MappingError
from pipo_jax.model.layers import layer_slot

Path_ = tuple[str, ...]
SUPPORTED_MODEL_TYPES = ("qwen3_5", "qwen3_5_text", "qwen3")


# ------------------------------------------------------------------------------------- configs


_KINDS: dict[type, str] = {int: "an integer", float: "a number", bool: "true or false",
                           str: "a string", list: "a list", dict: "a JSON object"}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Typed reads of one JSON object of a config.json, so that every missing or ill-typed key
    is a ``MappingError`` naming the key (dotted from the file's top) and the file.

    ``need`` reads a key the model cannot do without; ``get`` one with a default (JSON null,
    as Hugging Face writes unset keys, counts as absent); ``section`` a nested object.
    """

    values: dict[str, Any]
    source: str = "config.json"  # the file, as the message names it
    prefix: str = ""  # the dotted path of ``values`` in the file: "text_config."

    def need(self, key: str, kind: type) -> Any:
        if self.values.get(key) is None:
            raise MappingError(f"{self.source} has no {self.prefix}{key} ({_KINDS[kind]}), "
                               f"which a {self.values.get('model_type')} model needs; it is not "
                               "a complete Hugging Face config")
        return self._checked(key, kind)

    def get(self, key: str, kind: type, default: Any) -> Any:
        return default if self.values.get(key) is None else self._checked(key, kind)

    def section(self, key: str) -> Settings:
        return Settings(self.get(key, dict, {}), self.source, f"{self.prefix}{key}.")

    def _checked(self, key: str, kind: type) -> Any:
        value = self.values[key]
        # JSON has one number type: an integer is a fine float; a bool is neither.
        fits = (isinstance(value, kind if kind is not float else (int, float))
                and (kind is bool or not isinstance(value, bool)))
        if not fits:
            raise MappingError(f"{self.source}: {self.prefix}{key} must be {_KINDS[kind]}, got "
                               f"{value!r}")
        return float(value) if kind is float else value


def text_config(hf_config: dict[str, Any], source: str = "config.json") -> Settings:
    """The text-model settings of a config.json (VLM checkpoints nest them in ``text_config``)."""
    top = Settings(hf_config, source)
    model_type = top.get("model_type", str, None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise MappingError(f"{source} model_type {model_type!r} is not supported; supported: "
                           f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if model_type == "qwen3_5":
        text = top.section("text_config")
        values = dict(text.values)
        # Top-level flags (tie_word_embeddings) apply to the text tower too.
        for key in ("tie_word_embeddings",):
            if key in hf_config and key not in values:
                values[key] = hf_config[key]
        values.setdefault("model_type", "qwen3_5_text")
        return dataclasses.replace(text, values=values)
    return top


def _rope(text: Settings) -> tuple[float, float]:
    rope = text.section("rope_parameters" if text.values.get("rope_parameters") is not None
                        else "rope_scaling")
    rope_type = rope.get("rope_type", str, rope.get("type", str, "default"))
    if rope_type != "default":
        raise MappingError(f"rope_type {rope_type!r} is not supported (only 'default' RoPE)")
    theta = rope.get("rope_theta", float, text.get("rope_theta", float, 10000.0))
    partial = rope.get("partial_rotary_factor", float,
                       text.get("partial_rotary_factor", float, None))
    if partial is None:
        partial = 0.25 if text.values["model_type"] == "qwen3_5_text" else 1.0
    return theta, partial


def config_from_hf(hf_config: dict[str, Any], source: str = "config.json",
                   **overrides: Any) -> ModelConfig:
    """A ``ModelConfig`` equal in math to a Hugging Face config.json (text settings only).

    ``source`` names the file in error messages. ``overrides`` set pipo-jax-only fields
    (``max_context``, ``param_dtype``, ...). Settings the model cannot reproduce (biases,
    sliding windows, scaled RoPE, several MTP layers) are errors, and so is every missing or
    ill-typed key (``Settings``).
    """
    text = text_config(hf_config, source)
    qwen35 = text.values["model_type"] == "qwen3_5_text"
    hidden_act = text.get("hidden_act", str, "silu")
    if hidden_act != "silu":
        raise MappingError(f"hidden_act {hidden_act!r} is not supported (only silu)")
    if text.get("attention_bias", bool, False):
        raise MappingError("attention_bias: true is not supported (Qwen3/3.5 have no biases)")
    if text.get("use_sliding_window", bool, False):
        raise MappingError("use_sliding_window: true is not supported")
    if qwen35 and text.get("attn_output_gate", bool, True) is False:
        raise MappingError("attn_output_gate: false is not supported for Qwen3.5")
    mtp_layers = text.get("mtp_num_hidden_layers", int, 1) if qwen35 else 1
    if mtp_layers > 1:
        raise MappingError(f"mtp_num_hidden_layers {mtp_layers} > 1: PIPO's MTP head is one "
                           "layer")
    n_layers = text.need("num_hidden_layers", int)
    if qwen35:
        layer_types = text.get("layer_types", list, None)
        if layer_types is None:
            interval = text.get("full_attention_interval", int, 4)
            layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                           for i in range(n_layers)]
    else:
        layer_types = ["full_attention"] * n_layers
    theta, partial = _rope(text)
    d_model = text.need("hidden_size", int)
    n_heads = text.need("num_attention_heads", int)
    fields: dict[str, Any] = dict(
        family="qwen3_5" if qwen35 else "qwen3",
        vocab_size=text.need("vocab_size", int), d_model=d_model, n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=text.get("num_key_value_heads", int, n_heads),
        head_dim=text.get("head_dim", int, None) or d_model // max(n_heads, 1),
        mlp_dim=text.need("intermediate_size", int),
        layer_types=tuple(layer_types) if qwen35 else (),
        rope_theta=theta, partial_rotary_factor=partial,
        rms_eps=text.get("rms_norm_eps", float, 1e-6),
        tie_embeddings=text.get("tie_word_embeddings", bool, False),
        max_context=text.get("max_position_embeddings", int, 32768) // 2 * 2,
    )
    if qwen35:
        fields.update(
            linear_n_key_heads=text.need("linear_num_key_heads", int),
            linear_n_value_heads=text.need("linear_num_value_heads", int),
            linear_key_head_dim=text.need("linear_key_head_dim", int),
            linear_value_head_dim=text.need("linear_value_head_dim", int),
            linear_conv_kernel=text.need("linear_conv_kernel_dim", int))
    if "compressor_type" in hf_config:  # a PIPO export
        fields["compressor_type"] = Settings(hf_config, source).need("compressor_type", str)
    fields.update(overrides)
    try:
        return ModelConfig(**fields)
    except (ConfigError, TypeError) as e:
        raise MappingError(f"{source} does not give a usable model: {e}") from e


def hf_config_from_model(cfg: ModelConfig, base: dict[str, Any] | None = None,
                         dtype: str = "float32") -> dict[str, Any]:
    """config.json for an export: ``base`` (the imported checkpoint's own config.json, kept
    as is) or a fresh text-only config, plus ``compressor_type`` and PIPO's settings."""
    if base is not None:
        out = dict(base)
    else:
        out = {"architectures": ["Qwen3_5ForCausalLM" if cfg.family == "qwen3_5"
                                 else "Qwen3ForCausalLM"],
               "model_type": "qwen3_5_text" if cfg.family == "qwen3_5" else "qwen3",
               "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
               "intermediate_size": cfg.mlp_dim, "num_hidden_layers": cfg.n_layers,
               "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
               "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.rms_eps,
               "max_position_embeddings": cfg.max_context, "attention_bias": False,
               "tie_word_embeddings": cfg.tie_embeddings, "dtype": dtype}
        if cfg.family == "qwen3_5":
            out.update(
                layer_types=list(cfg.resolved_layer_types),
                rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta,
                                 "partial_rotary_factor": cfg.partial_rotary_factor},
                linear_num_key_heads=cfg.linear_n_key_heads,
                linear_num_value_heads=cfg.linear_n_value_heads,
                linear_key_head_dim=cfg.linear_key_head_dim,
                linear_value_head_dim=cfg.linear_value_head_dim,
                linear_conv_kernel_dim=cfg.linear_conv_kernel, mtp_num_hidden_layers=1)
        else:
            out.update(rope_theta=cfg.rope_theta)
    # The reference implementation's config class defaults to "linear" when this key is
    # absent while its training scripts default to "mlp" (SPEC §8): always write it.
    out["compressor_type"] = cfg.compressor_type
    out["pipo"] = {"compressor_type": cfg.compressor_type, "mtp_num_hidden_layers": 1}
    return out


# ---------------------------------------------------------------------------------- key table


@dataclasses.dataclass(frozen=True)
class Target:
    """Where one checkpoint tensor goes: ``path`` in the Flax tree (``index`` along a stacked
    layer axis, or None), the Flax ``shape``, and the exact torch→flax / flax→torch maps."""

    path: Path_
    index: int | None
    shape: tuple[int, ...]
    to_flax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    group: str  # "backbone", "mtp", "compressor", "confidence": what a missing key means

    @property
    def torch_shape(self) -> tuple[int, ...]:
        """The checkpoint tensor's shape (checked before any reshape, so that a transposed or
        mis-sized tensor can never be reshaped into the right number of elements)."""
        return tuple(self.to_torch(np.zeros(self.shape, np.int8)).shape)


def _same(x: np.ndarray) -> np.ndarray:
    return x


def _t(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.T)


def _linear(in_dim: int, out_shape: tuple[int, ...]) -> tuple[Callable, Callable]:
    """``[out, in]`` → kernel ``[in, *out_shape]`` and back."""
    def to_flax(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.T).reshape(in_dim, *out_shape)

    def to_torch(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.reshape(in_dim, -1).T)

    return to_flax, to_torch


def _out_linear(in_shape: tuple[int, ...], out_dim: int) -> tuple[Callable, Callable]:
    """``[out, prod(in_shape)]`` → kernel ``[*in_shape, out]`` (o_proj) and back."""
    def to_flax(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.T).reshape(*in_shape, out_dim)

    def to_torch(x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x.reshape(-1, out_dim).T)

    return to_flax, to_torch


def _conv() -> tuple[Callable, Callable]:
    return (lambda x: np.ascontiguousarray(x[:, 0, :]), lambda x: np.ascontiguousarray(x[:, None]))


def _layer_entries(cfg: ModelConfig, layer_type: str) -> Iterator[tuple[str, Path_, tuple, tuple]]:
    """(HF suffix, Flax sub-path, Flax shape, transforms) of one decoder layer."""
    d, f = cfg.d_model, cfg.mlp_dim
    n, kv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    yield "input_layernorm.weight", ("input_norm", "scale"), (d,), (_same, _same)
    yield "post_attention_layernorm.weight", ("post_attn_norm", "scale"), (d,), (_same, _same)
    yield "mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), (d, f), (_t, _t)
    yield "mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), (d, f), (_t, _t)
    yield "mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), (f, d), (_t, _t)
    if layer_type == "full_attention":
        qw = hd * (2 if cfg.attn_output_gate else 1)
        yield "self_attn.q_proj.weight", ("attn", "q_proj", "kernel"), (d, n, qw), \
            _linear(d, (n, qw))
        yield "self_attn.k_proj.weight", ("attn", "k_proj", "kernel"), (d, kv, hd), \
            _linear(d, (kv, hd))
        yield "self_attn.v_proj.weight", ("attn", "v_proj", "kernel"), (d, kv, hd), \
            _linear(d, (kv, hd))
        yield "self_attn.o_proj.weight", ("attn", "o_proj", "kernel"), (n, hd, d), \
            _out_linear((n, hd), d)
        yield "self_attn.q_norm.weight", ("attn", "q_norm", "scale"), (hd,), (_same, _same)
        yield "self_attn.k_norm.weight", ("attn", "k_norm", "scale"), (hd,), (_same, _same)
        return
    nv, dv = cfg.linear_n_value_heads, cfg.linear_value_head_dim
    c = cfg.linear_conv_dim
    la = "linear_attn"
    yield "linear_attn.in_proj_qkv.weight", (la, "in_proj_qkv", "kernel"), (d, c), (_t, _t)
    yield "linear_attn.in_proj_z.weight", (la, "in_proj_z", "kernel"), (d, nv * dv), (_t, _t)
    yield "linear_attn.in_proj_b.weight", (la, "in_proj_b", "kernel"), (d, nv), (_t, _t)
    yield "linear_attn.in_proj_a.weight", (la, "in_proj_a", "kernel"), (d, nv), (_t, _t)
    yield "linear_attn.conv1d.weight", (la, "conv1d"), (c, cfg.linear_conv_kernel), _conv()
    yield "linear_attn.A_log", (la, "A_log"), (nv,), (_same, _same)
    yield "linear_attn.dt_bias", (la, "dt_bias"), (nv,), (_same, _same)
    yield "linear_attn.norm.weight", (la, "norm", "scale"), (dv,), (_same, _same)
    yield "linear_attn.out_proj.weight", (la, "out_proj", "kernel"), (nv * dv, d), (_t, _t)


def text_prefix(cfg: ModelConfig) -> str:
    """The text tower's key prefix written on export (and preferred on import)."""
    return "model.language_model." if cfg.family == "qwen3_5" else "model."


def key_table(cfg: ModelConfig) -> dict[str, Target]:
    """Every checkpoint key of a PIPO model of ``cfg`` (text prefix per ``text_prefix``)."""
    d = cfg.d_model
    pre = text_prefix(cfg)
    table: dict[str, Target] = {}

    def add(key: str, path: Path_, index: int | None, shape: tuple, maps: tuple,
            group: str) -> None:
        table[key] = Target(path, index, tuple(shape), maps[0], maps[1], group)

    add(pre + "embed_tokens.weight", ("embedder", "embedding"), None, (cfg.vocab_size, d),
        (_same, _same), "backbone")
    if not cfg.tie_embeddings:
        add("lm_head.weight", ("embedder", "lm_head"), None, (cfg.vocab_size, d),
            (_same, _same), "backbone")
    add(pre + "norm.weight", ("backbone", "final_norm", "scale"), None, (d,), (_same, _same),
        "backbone")
    for i, layer_type in enumerate(cfg.resolved_layer_types):
        for suffix, sub, shape, maps in _layer_entries(cfg, layer_type):
            slot, block = layer_slot(cfg, i)
            add(f"{pre}layers.{i}.{suffix}", ("backbone", "layers", slot, *sub), block, shape,
                maps, "backbone")
    add("mtp.fc.weight", ("mtp_head", "fc", "kernel"), None, (2 * d, d), (_t, _t), "mtp")
    for hf, ours in (("pre_fc_norm_embedding", "norm_emb"), ("pre_fc_norm_hidden", "norm_hidden"),
                     ("norm", "final_norm")):
        add(f"mtp.{hf}.weight", ("mtp_head", ours, "scale"), None, (d,), (_same, _same), "mtp")
    for suffix, sub, shape, maps in _layer_entries(cfg, "full_attention"):
        add(f"mtp.layers.0.{suffix}", ("mtp_head", "layer", *sub), None, shape, maps, "mtp")
    if cfg.compressor_type == "mlp":
        for hf, ours, shape in (("mlp.0", "fc1", (2 * d, 2 * d)), ("mlp.2", "fc2", (2 * d, d))):
            add(f"compressor.{hf}.weight", ("compressor", ours, "kernel"), None, shape, (_t, _t),
                "compressor")
            add(f"compressor.{hf}.bias", ("compressor", ours, "bias"), None, shape[1:],
                (_same, _same), "compressor")
    else:
        add("compressor.linear.weight", ("compressor", "fc", "kernel"), None, (2 * d, d),
            (_t, _t), "compressor")
        add("compressor.linear.bias", ("compressor", "fc", "bias"), None, (d,), (_same, _same),
            "compressor")
    add("confidence_head.norm.weight", ("confidence_head", "norm", "scale"), None, (2 * d,),
        (_same, _same), "confidence")
    add("confidence_head.fc1.weight", ("confidence_head", "fc1", "kernel"), None, (2 * d, d),
        (_t, _t), "confidence")
    add("confidence_head.fc2.weight", ("confidence_head", "fc2", "kernel"), None, (d, 1),
        (_t, _t), "confidence")
    return table


def canonical_key(cfg: ModelConfig, key: str) -> str | None:
    """Maps a checkpoint key onto ``key_table``'s spelling; None for keys to ignore.

    Accepts both ``model.language_model.X`` and ``model.X`` for the text tower and drops the
    vision tower (``model.visual.*``) of the official VLM checkpoints.
    """
    if key.startswith(("model.visual.", "visual.")):
        return None
    for prefix in ("model.language_model.", "model."):
        if key.startswith(prefix):
            return text_prefix(cfg) + key[len(prefix):]
    return key


def get_path(tree: dict, path: Path_) -> Any:
    for p in path:
        tree = tree[p]
    return tree


def tensor_to_flax(target: Target, key: str, value: np.ndarray) -> np.ndarray:
    """Checks a checkpoint tensor's shape against the model and converts it."""
    if tuple(value.shape) != target.torch_shape:
        raise MappingError(f"{key}: shape {tuple(value.shape)} does not fit the model, which "
                           f"expects {target.torch_shape}")
    return target.to_flax(value)


def iter_hf_tensors(cfg: ModelConfig, params: dict,
                    groups: tuple[str, ...] = ("backbone", "mtp", "compressor", "confidence"),
                    ) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(key, torch-layout array)`` for every parameter, one tensor at a time."""
    for key, target in key_table(cfg).items():
        if target.group not in groups:
            continue
        value = np.asarray(get_path(params, target.path))
        if target.index is not None:
            value = value[target.index]
        yield key, target.to_torch(value)


def load_into(cfg: ModelConfig, items: Iterable[tuple[str, np.ndarray]],
              params: dict) -> set[str]:
    """Writes checkpoint tensors into ``params`` (a mutable tree of numpy arrays of the model's
    shapes, e.g. a fresh init), one at a time; returns the groups the checkpoint held.

    Every backbone key must be present exactly once; ``mtp``, ``compressor`` and ``confidence``
    are all-or-nothing (absent → the caller initialises them). Any key the model has no place
    for is an error, so nothing is silently dropped.
    """
    table = key_table(cfg)
    seen: set[str] = set()
    unused: list[str] = []
    tied_head: np.ndarray | None = None
    for key, value in items:
        name = canonical_key(cfg, key)
        if name is None:
            continue
        if name == "lm_head.weight" and cfg.tie_embeddings:
            # A tied model's in-memory state_dict lists the head too; accept it only if it is
            # the embedding (checked once both are read).
            tied_head = np.asarray(value)
            continue
        target = table.get(name)
        if target is None:
            unused.append(key)
            continue
        if name in seen:
            raise MappingError(f"{key} appears twice in the checkpoint")
        seen.add(name)
        out = tensor_to_flax(target, key, np.asarray(value))
        leaf = get_path(params, target.path)
        if target.index is None:
            leaf[...] = out
        else:
            leaf[target.index] = out
    if unused:
        raise MappingError(
            f"{len(unused)} checkpoint key(s) have no place in the model (wrong config or "
            f"family?): {', '.join(sorted(unused)[:6])}{' ...' if len(unused) > 6 else ''}")
    if tied_head is not None:
        embedding = get_path(params, ("embedder", "embedding"))
        if tied_head.shape != embedding.shape or not np.array_equal(tied_head, embedding):
            raise MappingError("lm_head.weight differs from the embedding although "
                               "tie_word_embeddings is true; fix the config.json")
    groups = set()
    for group in ("backbone", "mtp", "compressor", "confidence"):
        keys = [k for k, t in table.items() if t.group == group]
        missing = [k for k in keys if k not in seen]
        if len(missing) < len(keys):
            groups.add(group)
        if missing and (group == "backbone" or len(missing) < len(keys)):
            raise MappingError(
                f"checkpoint lacks {len(missing)} {group} key(s): "
                f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
    return groups

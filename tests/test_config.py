"""pipo_jax.config: strict loading, overrides, validation, round trips."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipo_jax import config as C
from pipo_jax.config import Config, ConfigError, DecodeConfig, ModelConfig, schema
from pipo_jax.config.bounds import bounds_of

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


# ------------------------------------------------------------------------------- unknown keys


def test_unknown_key_in_file_is_named(tmp_path):
    p = _write(tmp_path, "model:\n  d_modle: 64\n")
    with pytest.raises(ConfigError, match=r"model\.d_modle"):
        C.load_config(p)
    p = _write(tmp_path, "optimiser: adam\n")
    with pytest.raises(ConfigError, match="optimiser"):
        C.load_config(p)


def test_unknown_key_in_override_is_named():
    with pytest.raises(ConfigError, match=r"sft\.stepz"):
        C.load_config(None, ["sft.stepz=3"])
    with pytest.raises(ConfigError, match=r"trian\.steps"):
        C.load_config(None, ["trian.steps=3"])
    # A value is not a section.
    with pytest.raises(ConfigError, match=r"sft\.steps\.x"):
        C.load_config(None, ["sft.steps.x=1"])


def test_unknown_key_in_dict():
    with pytest.raises(ConfigError, match=r"decode\.temp\b"):
        C.from_dict({"decode": {"temp": 1.0}})


# --------------------------------------------------------------------------------- wrong types


@pytest.mark.parametrize(("override", "key"), [
    ("sft.steps=ten", "sft.steps"),
    ("sft.steps=1.5", "sft.steps"),
    ("sft.steps=true", "sft.steps"),
    ("model.d_model=[64]", "model.d_model"),
    ("sft.learning_rate=fast", "sft.learning_rate"),
    ("sft.detach_confidence_inputs=1", "sft.detach_confidence_inputs"),
    ("model.compressor_type=conv", "model.compressor_type"),
    ("data.levels=2", "data.levels"),
    ("data.levels=[2, x]", r"data.levels\[1\]"),
    ("run_dir=3", "run_dir"),
    ("model=3", "model"),
])
def test_wrong_type_override_names_key(override, key):
    with pytest.raises(ConfigError, match=key):
        C.load_config(None, [override])


def test_wrong_type_in_file_names_key(tmp_path):
    p = _write(tmp_path, "ar:\n  batch_size: '32'\n")
    with pytest.raises(ConfigError, match=r"ar\.batch_size"):
        C.load_config(p)


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        C.load_config(None, ["sft.steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        C.load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        C.load_config(_write(tmp_path, "model: [unclosed\n"))


def test_key_twice_in_a_file_and_binary_files_are_one_line_errors(tmp_path):
    """Issue #19: PyYAML keeps the last of two equal keys silently."""
    p = _write(tmp_path, "sft:\n  steps: 3\n  learning_rate: 0.1\n  steps: 30\n")
    with pytest.raises(ConfigError, match=r"not valid YAML: .*key 'steps' is set twice "
                                          r"\(first on line 2\).*line 4") as e:
        C.load_config(p)
    assert "\n" not in str(e.value)
    top = _write(tmp_path, "sft: {steps: 3}\nsft: {steps: 4}\n")
    with pytest.raises(ConfigError, match="key 'sft' is set twice"):
        C.load_config(top)
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        C.load_config(binary)
    # The same key in two different sections is fine, and so is overriding a merged anchor.
    assert C.load_config(_write(tmp_path, "sft: {steps: 3}\nar: {steps: 4}\n")).sft.steps == 3
    merged = _write(tmp_path, "ar: &base {steps: 4, batch_size: 2}\nsft:\n  <<: *base\n"
                              "  steps: 5\n")
    cfg = C.load_config(merged)
    assert (cfg.sft.steps, cfg.sft.batch_size, cfg.ar.steps) == (5, 2, 4)


def test_same_key_overridden_twice_is_an_error():
    with pytest.raises(ConfigError, match=r"sft\.steps.*twice"):
        C.load_config(None, ["sft.steps=3", "sft.steps=4"])
    with pytest.raises(ConfigError, match="twice"):
        C.load_config(None, ["sft.steps=3", " sft.steps =4"])


# ----------------------------------------------------------------------------------- parsing


def test_override_value_parsing():
    cfg = C.load_config(None, [
        "sft.steps=200",
        "sft.learning_rate=0.001",
        "ar.learning_rate=2.5e-3",
        "ar.weight_decay=0",  # an int where a float is expected becomes a float
        "data.levels=[2, 3]",
        "stages=[sft]",
        "sft.detach_confidence_inputs=false",
        "model.layer_types=[full_attention, full_attention, full_attention, full_attention, "
        "full_attention, full_attention, full_attention, full_attention]",
        "run_dir=runs/x=y",  # only the first '=' splits
        "decode.threshold=-1",
        "model.compressor_type=linear",
    ])
    assert cfg.sft.steps == 200 and type(cfg.sft.steps) is int
    assert cfg.sft.learning_rate == 0.001 and type(cfg.sft.learning_rate) is float
    assert cfg.ar.learning_rate == 2.5e-3
    assert cfg.ar.weight_decay == 0.0 and type(cfg.ar.weight_decay) is float
    assert cfg.data.levels == (2, 3)
    assert cfg.stages == ("sft",)
    assert cfg.sft.detach_confidence_inputs is False
    assert cfg.model.layer_types == ("full_attention",) * 8
    assert cfg.run_dir == "runs/x=y"
    assert cfg.decode.threshold == -1.0 and type(cfg.decode.threshold) is float
    assert cfg.model.compressor_type == "linear"
    # Untouched keys keep their defaults.
    assert cfg.ar.steps == C.TrainConfig().steps


def test_float_override_in_exponent_notation():
    assert C.load_config(None, ["sft.learning_rate=1e-3"]).sft.learning_rate == 1e-3


def test_override_onto_file(tmp_path):
    p = _write(tmp_path, "sft:\n  steps: 5\n  batch_size: 2\n")
    cfg = C.load_config(p, ["sft.steps=7"])
    assert cfg.sft.steps == 7 and cfg.sft.batch_size == 2


# -------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("thr", [-1.5, 1.01, 2.0, float("nan")])
def test_threshold_out_of_range_rejected(thr):
    with pytest.raises(ConfigError, match="threshold"):
        C.validate_threshold(thr)
    with pytest.raises(ConfigError, match=r"decode\.threshold must be in \[-1, 1\]"):
        DecodeConfig(threshold=thr)


def test_threshold_range_inclusive():
    for thr in (-1.0, -1, 0.0, 0.5, 1.0, 1):
        C.validate_threshold(thr)
    with pytest.raises(ConfigError, match=r"decode\.threshold must be in \[-1, 1\].*1\.5"):
        C.load_config(None, ["decode.threshold=1.5"])
    assert C.load_config(None, ["decode.threshold=1"]).decode.threshold == 1.0


def test_model_validation():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ConfigError, match="layer_types"):
        ModelConfig(n_layers=3, layer_types=("full_attention",) * 2)
    with pytest.raises(ConfigError, match="unsupported"):
        ModelConfig(n_layers=1, layer_types=("mamba",))
    with pytest.raises(ConfigError, match="at least one full_attention"):
        ModelConfig(n_layers=1, layer_types=("linear_attention",))
    with pytest.raises(ConfigError, match="rotary"):
        ModelConfig(head_dim=7)
    with pytest.raises(ConfigError, match="rotary"):
        ModelConfig(head_dim=8, partial_rotary_factor=0.1)
    with pytest.raises(ConfigError, match="partial_rotary_factor"):
        ModelConfig(partial_rotary_factor=1.5)
    with pytest.raises(ConfigError, match="linear_n_value_heads"):
        ModelConfig(linear_n_key_heads=3, linear_n_value_heads=4)
    with pytest.raises(ConfigError, match="linear_chunk"):
        ModelConfig(linear_chunk=0)
    with pytest.raises(ConfigError, match="family"):
        C.load_config(None, ["model.family=llama"])
    with pytest.raises(ConfigError, match="d_model"):
        ModelConfig(d_model=0)
    with pytest.raises(ConfigError, match="n_kv_heads"):
        C.load_config(None, ["model.n_heads=6", "model.n_kv_heads=4"])
    m = ModelConfig(n_layers=2, layer_types=("full_attention",) * 2)
    assert m.resolved_layer_types == ("full_attention", "full_attention")
    assert ModelConfig(n_layers=3).resolved_layer_types == ("full_attention",) * 3


def test_layer_pattern_is_the_shortest_period():
    lin, full = "linear_attention", "full_attention"
    qwen35 = ModelConfig(n_layers=8, layer_types=(lin, lin, lin, full) * 2)
    assert qwen35.layer_pattern == (lin, lin, lin, full) and qwen35.n_blocks == 2
    assert ModelConfig(n_layers=6).layer_pattern == (full,)
    assert ModelConfig(n_layers=6).n_blocks == 6
    odd = (lin, full, full)
    irregular = ModelConfig(n_layers=3, layer_types=odd)
    assert irregular.layer_pattern == odd and irregular.n_blocks == 1
    m = ModelConfig(head_dim=32, partial_rotary_factor=0.25, linear_n_key_heads=2,
                    linear_n_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8)
    assert m.rotary_dim == 8 and m.linear_conv_dim == 2 * 2 * 16 + 4 * 8
    q35 = ModelConfig(family="qwen3_5")
    assert q35.norm_offset and q35.attn_output_gate
    assert not ModelConfig(family="qwen3").norm_offset


def test_other_section_validation():
    with pytest.raises(ConfigError, match="max_len"):
        C.load_config(None, ["data.max_len=33"])
    with pytest.raises(ConfigError, match="stages"):
        C.load_config(None, ["stages=[rl]"])
    with pytest.raises(ConfigError, match="pad_ratio_max"):
        C.load_config(None, ["sft.pad_ratio_max=1.5"])
    for bad in ("-0.1", ".nan"):
        with pytest.raises(ConfigError, match="pad_ratio_max"):
            C.load_config(None, [f"sft.pad_ratio_max={bad}"])
    for bad in ("1.5", "-0.25", ".nan"):
        with pytest.raises(ConfigError, match="pad_dense_frac"):
            C.load_config(None, [f"sft.pad_dense_frac={bad}"])
    with pytest.raises(ConfigError, match=r"sft\.pad_augment must be one of \['split', 'shift', "
                                          r"'mix'\], got 'insert'") as e:
        C.load_config(None, ["sft.pad_augment=insert"])
    assert "\n" not in str(e.value)
    assert C.load_config(None, ["sft.pad_augment=mix"]).sft.pad_augment == "mix"
    with pytest.raises(ConfigError, match="top_p"):
        C.load_config(None, ["decode.top_p=0"])


# ------------------------------------------------------------------- declared numeric ranges


def _numeric_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """``(key, field type, Bounds)`` of every numeric field reachable from ``cls``."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _numeric_keys(tp, f"{prefix}{f.name}.")
            continue
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else tp
        if item in (int, float):
            out.append((prefix + f.name, tp, bounds_of(f)))
    return out


NUMERIC_KEYS = _numeric_keys()


def test_every_numeric_field_declares_its_range():
    assert len(NUMERIC_KEYS) > 100  # every section, ar / teacher / sft / … and their lora
    missing = [key for key, _, b in NUMERIC_KEYS if b is None]
    assert not missing, f"numeric config fields without a declared range: {missing}"


def test_a_numeric_field_without_a_range_cannot_be_built():
    @dataclasses.dataclass(frozen=True)
    class Careless(schema._Section):
        SECTION = "careless"
        steps: int = 3

    with pytest.raises(TypeError, match=r"Careless\.steps is numeric but declares no range"):
        Careless()


def _outside(tp: Any, b: Any) -> list[Any]:
    """Values just outside ``b`` (NaN and infinity too for a float field)."""
    item = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else tp
    step = 1 if item is int else 1e-3
    bad: list[Any] = []
    if b.lo is not None:
        bad.append(b.lo if b.lo_open else b.lo - step)
    if b.hi is not None:
        bad.append(b.hi if b.hi_open else b.hi + step)
    if item is float:
        bad += [".nan", ".inf", "-.inf"]
    bad = [v for v in bad if not (isinstance(v, (int, float)) and v in b.also)]
    return [[v] if typing.get_origin(tp) is tuple else v for v in bad]


@pytest.mark.parametrize("key,tp,bounds", NUMERIC_KEYS, ids=[k for k, _, _ in NUMERIC_KEYS])
def test_each_numeric_field_refuses_values_outside_its_range(key, tp, bounds):
    """Every numeric key, through the loader: each value just past a bound (and NaN / ±inf for a
    float) is a one-line error naming the key's full path; the default is accepted."""
    C.load_config(None, [])  # the defaults are inside every range
    values = _outside(tp, bounds)
    assert values, f"{key}: no value lies outside {bounds.describe()}"
    for v in values:
        text = yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()
        with pytest.raises(ConfigError) as e:
            C.load_config(None, [f"{key}={text}"])
        message = str(e.value)
        assert "\n" not in message and message.startswith(key.split("[")[0]), (key, v, message)


@pytest.mark.parametrize("override,message", [
    # The cases of issue #19: each trained (or decoded) silently wrong before.
    ("ar.clip_norm=-1", r"ar\.clip_norm must be > 0, got -1\.0"),
    ("ar.b1=1.5", r"ar\.b1 must be in \[0, 1\) \(Adam's first-moment decay\), got 1\.5"),
    ("sft.weight_decay=.nan", r"sft\.weight_decay must be >= 0, got nan"),
    ("ar.b2=nan", r"ar\.b2 must be in \[0, 1\)"),  # the string "nan" reads as a float
    ("opd.end_lr_frac=.nan", r"opd\.end_lr_frac must be in \[0, 1\], got nan"),
    ("sft.w_conf=.nan", r"sft\.w_conf must be >= 0, got nan"),
    ("sft.w_mtp=-1", r"sft\.w_mtp must be >= 0, got -1\.0"),
    ("model.rms_eps=-1e-6", r"model\.rms_eps must be in \(0, 1\), got -1e-06"),
    ("model.rope_theta=0", r"model\.rope_theta must be > 0, got 0\.0"),
    ("ar.seed=-1", r"ar\.seed must be in \[0, 4294967295\], got -1"),
    ("teacher.lora.rank=0", r"teacher\.lora\.rank must be >= 1, got 0"),
    ("teacher_model.d_model=0", r"teacher_model\.d_model must be >= 1"),
    ("data.levels=[2, 13]", r"data\.levels\[1\] must be in \[1, 12\] \(digits per operand\)"),
    ("mesh.fsdp=0", r"mesh\.fsdp must be >= 1 or -1 \(-1: all remaining devices\), got 0"),
    ("decode.presence_penalty=.nan", r"decode\.presence_penalty must be in \[-2, 2\], got nan"),
    ("opd.rollout_thresholds=[0.5, 2]", r"opd\.rollout_thresholds\[1\] must be in \[-1, 1\]"),
])
def test_issue_19_values_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        C.load_config(None, [override])


def test_direct_construction_names_the_section():
    with pytest.raises(ConfigError, match=r"^sft\.w_conf must be >= 0, got nan$"):
        C.SftConfig(w_conf=float("nan"))
    with pytest.raises(ConfigError, match=r"^model\.vocab_size must be >= 1, got 0$"):
        ModelConfig(vocab_size=0)
    with pytest.raises(ConfigError, match=r"^decode\.top_k must be >= 0 \(0 turns it off\)"):
        DecodeConfig(top_k=-1)
    with pytest.raises(ConfigError, match="must be >= 1, got True"):  # a bool is not a count
        ModelConfig(n_layers=True)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match=r"model\.max_context \(64\) is below data\.max_len "
                                          r"\(320\)"):
        C.load_config(None, ["model.max_context=64"])
    C.load_config(None, ["model.max_context=64", "data.max_len=64"])
    # The teacher's context matters only when the teacher stage trains it.
    C.load_config(None, ["teacher_model.max_context=64"])
    with pytest.raises(ConfigError, match=r"teacher_model\.max_context"):
        C.load_config(None, ["teacher_model.max_context=64", "stages=[teacher, ar]"])
    with pytest.raises(ConfigError, match=r"opd\.rollout_max_new_tokens \(2048\) leaves no room"):
        C.load_config(None, ["stages=[opd]", "opd.rollout_max_new_tokens=2048"])
    with pytest.raises(ConfigError, match=r"ar\.batch_size \(32\) cannot be split evenly over "
                                          r"mesh\.data × mesh\.fsdp = 3"):
        C.load_config(None, ["mesh.fsdp=3"])
    with pytest.raises(ConfigError, match=r"sft\.batch_size \(6\) .* = 4"):
        C.load_config(None, ["mesh.data=2", "mesh.fsdp=2", "ar.batch_size=8",
                             "sft.batch_size=6"])
    C.load_config(None, ["mesh.data=2", "mesh.fsdp=-1"])  # -1: the device count decides later
    for empty in ("run_dir=", "run_dir=' '"):
        with pytest.raises(ConfigError, match="run_dir is empty"):
            C.load_config(None, [empty])


# -------------------------------------------------------------------------------- round trip


def _nondefault() -> Config:
    return C.load_config(CONFIGS / "tiny.yaml", [
        "model.layer_types=[full_attention, full_attention, full_attention, full_attention, "
        "full_attention, full_attention, full_attention, full_attention]",
        "decode.threshold=0.25", "data.levels=[4]", "stages=[sft]"])


def test_round_trip_dict_and_json(tmp_path):
    for cfg in (Config(), _nondefault()):
        d = C.to_dict(cfg)
        assert isinstance(d["model"]["layer_types"], list)  # plain data
        back = C.from_dict(d)
        assert back == cfg
        C.save_config(cfg, tmp_path / "config.json")
        assert C.config_from_json(tmp_path / "config.json") == cfg
    assert _nondefault() != Config()


def test_config_from_json_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing"):
        C.config_from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="corrupt"):
        C.config_from_json(tmp_path / "config.json")


def _assert_matches_yaml(cfg, raw: dict, prefix: str = "") -> int:
    """Every key the YAML sets has that value in the loaded config; returns how many were set."""
    n = 0
    for key, value in raw.items():
        got = getattr(cfg, key)
        if isinstance(value, dict):
            n += _assert_matches_yaml(got, value, prefix + key + ".")
            continue
        want = tuple(value) if isinstance(value, list) else value
        assert got == want and (type(got) is type(want) or isinstance(got, float)), prefix + key
        n += 1
    return n


@pytest.mark.parametrize("name", ["tiny.yaml", "micro.yaml"])
def test_shipped_configs_load(name):
    """The shipped configs load, and every value they set arrives (compared with a plain YAML
    parse, so the test follows edits to the files)."""
    path = CONFIGS / name
    cfg = C.load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert _assert_matches_yaml(cfg, raw) >= 10
    assert C.from_dict(C.to_dict(cfg)) == cfg
    assert cfg != Config()


def test_micro_config_is_micro():
    micro = C.load_config(CONFIGS / "micro.yaml")
    assert micro.model.d_model <= 64 and micro.model.n_layers <= 4
    assert micro.sft.steps <= 20 and micro.ar.steps <= 20


@pytest.mark.parametrize("key", ["ar.w_mtp", "teacher.pad_ratio_max", "ar.pad_augment",
                                 "opd.pad_ratio_max", "sft.rollout_threshold"])
def test_a_key_of_another_stage_is_refused(key):
    """Each stage has its own config class: a key it would not read is an error naming it,
    not a value silently ignored."""
    with pytest.raises(ConfigError, match=f"unknown config key {key}"):
        C.load_config(None, [f"{key}=0.5"])
    assert C.load_config(None, ["sft.w_mtp=5", "opd.w_mtp=2"]).sft.w_mtp == 5.0
    assert type(C.Config().ar) is C.ArConfig and type(C.Config().sft) is C.SftConfig


def test_a_config_saved_before_per_stage_classes_still_loads():
    """Saved configs of older runs list every shared field in every stage section; the keys a
    stage never read are dropped, the rest round-trip."""
    raw = C.to_dict(C.Config())
    for stage in ("teacher", "ar"):
        raw[stage].update(w_mtp=1.0, w_conf=1.0, pad_augment="shift", pad_ratio_max=0.25,
                          pad_dense_frac=0.0, detach_confidence_inputs=True)
    raw["opd"].update(pad_augment="shift", pad_ratio_max=0.25, pad_dense_frac=0.0)
    assert C.saved_from_dict(raw) == C.Config()
    with pytest.raises(ConfigError, match="unknown config keys teacher.detach_confidence_inputs"):
        C.from_dict(raw)  # only saved configs get the allowance

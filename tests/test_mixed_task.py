"""The mixed arithmetic task (``data.task: mixed``): determinism, split hygiene, worked lines
read back and checked, varied wording, config errors and the TFDS round trip."""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from pipo_jax import config as config_lib
from pipo_jax.config import (
    DEFAULT_MIXED_OPS,
    Config,
    ConfigError,
    DataConfig,
    SftConfig,
    load_config,
)
from pipo_jax.data import arith, loader, mixed, tfds_builder
from pipo_jax.eval.scoring import verify
from pipo_jax.io.tokenizer import ByteTokenizer
from pipo_jax.model import pairs

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PATTERNS = {op: {kind: [mixed.line_pattern(t) for t in templates]
                 for kind, templates in forms.items()}
            for op, forms in mixed.PHRASINGS.items()}


def _key(op: str, a: int, b: int) -> tuple[str, int, int]:
    # Unordered for + and *: a + b in train would leak b + a in test.
    return (op, a, b) if op == "sub" else (op, min(a, b), max(a, b))


def _match(op: str, kind: str, line: str) -> tuple[int, dict[str, int]]:
    """The phrasing ``line`` uses (its index in ``PHRASINGS[op][kind]``) and its numbers."""
    hits = [(i, m) for i, p in enumerate(PATTERNS[op][kind]) if (m := p.fullmatch(line))]
    assert len(hits) == 1, (op, kind, line)
    i, m = hits[0]
    return i, {k: int(v) for k, v in m.groupdict().items()}


def _check_example(ex: dict) -> list[tuple[str, str, int]]:
    """Asserts that every line of ``ex``'s worked solution is right arithmetic; returns the
    ``(op, kind, phrasing)`` of each line."""
    op, a, b = mixed.parse_question(ex["question"])
    result = {"add": a + b, "sub": a - b, "mul": a * b}[op]
    assert ex["answer"] == str(result) and result >= 0
    assert verify(ex["response"], ex["answer"])
    lines = ex["response"].split("\n")
    assert lines[-2:] == ["</think>", f"\\boxed{{{result}}}"]
    used = []

    def read(kind: str, line: str) -> dict[str, int]:
        i, f = _match(op, kind, line)
        used.append((op, kind, i))
        # Operands shown in a line are the problem's.
        assert f.get("a", a) == a and f.get("b", b) == b, line
        return f

    read("open", lines[0])
    width = len(str(a)) if op == "mul" else max(len(str(a)), len(str(b)))
    carry, written = 0, []
    for i, line in enumerate(lines[1:1 + width]):
        f = read("column", line)
        da, db = a // 10**i % 10, b // 10**i % 10
        assert f["c"] == carry, line
        if op == "add":
            assert (f["x"], f["y"]) == (da, db) and f["s"] == da + db + carry, line
            assert (f["w"], f["o"]) == (f["s"] % 10, f["s"] // 10), line
        elif op == "sub":
            borrow = int(da - db - carry < 0)
            assert (f["x"], f["y"], f["o"]) == (da + 10 * borrow, db, borrow), line
            assert f["s"] == f["x"] - db - carry == f["w"] and 0 <= f["w"] <= 9, line
        else:
            assert (f["x"], f["y"], f["p"]) == (da, b, da * b), line
            assert f["s"] == f["p"] + carry, line
            assert (f["w"], f["o"]) == (f["s"] % 10, f["s"] // 10), line
        carry = f["o"]
        written.append(str(f["w"]))
    rest = lines[1 + width:-2]
    if op == "sub":
        assert carry == 0  # a >= b: nothing left to borrow from
    else:
        assert read("carry", rest.pop(0))["o"] == carry
    digits = ("" if carry == 0 else str(carry)) + "".join(reversed(written))
    assert int(digits) == result
    (last,) = rest
    assert read("result", last)["n"] == result
    return used


def test_generate_split_is_deterministic() -> None:
    a = mixed.generate_split("train", seed=3, n=60, levels=(2, 3))
    assert a == mixed.generate_split("train", seed=3, n=60, levels=(2, 3))
    assert a != mixed.generate_split("train", seed=4, n=60, levels=(2, 3))
    # Every (level, operation) combination equally often, also among the first problems.
    assert [e["level"] for e in a[:6]] == [2, 3] * 3
    assert [mixed.parse_question(e["question"])[0] for e in a[:6]] == [
        "add", "add", "sub", "sub", "mul", "mul"]
    only = mixed.generate_split("test", seed=0, n=10, levels=(2,), ops=("mul",))
    assert {mixed.parse_question(e["question"])[0] for e in only} == {"mul"}
    assert all(set(e) == {"question", "response", "answer", "level"} for e in a)


def test_wording_depends_on_the_seed_and_problem_only() -> None:
    assert mixed.worked_solution("add", 47, 85, 5) == mixed.worked_solution("add", 47, 85, 5)
    texts = {mixed.worked_solution("mul", 4728, 7, seed)[0] for seed in range(8)}
    assert len(texts) > 1
    # A problem reads the same whatever was generated before it.
    ex = mixed.generate_split("train", 2, 40, (3,))[-1]
    assert (ex["response"], ex["answer"]) == mixed.worked_solution(
        *mixed.parse_question(ex["question"]), 2)


@pytest.mark.parametrize("seeds", [(0, 0), (0, 1)])
def test_train_and_test_are_disjoint(seeds: tuple[int, int]) -> None:
    train = mixed.generate_split("train", seeds[0], 3000, (2, 3))
    test = mixed.generate_split("test", seeds[1], 300, (2, 3))

    def keys(split: list[dict]) -> set[tuple[str, int, int]]:
        return {_key(*mixed.parse_question(e["question"])) for e in split}

    assert not keys(train) & keys(test)
    assert all(mixed.split_of(*mixed.parse_question(e["question"])) == "test" for e in test)


def test_split_hash_is_unordered_and_shared_with_addition() -> None:
    rng = np.random.default_rng(0)
    for a, b in rng.integers(10, 1000, size=(500, 2)).tolist():
        assert mixed.split_of("add", a, b) == mixed.split_of("add", b, a) == arith.split_of(a, b)
        d = b % 8 + 2
        assert mixed.split_of("mul", a, d) == mixed.split_of("mul", d, a)
    splits = collections.Counter(mixed.split_of("sub", a, b) for a in range(100, 400)
                                 for b in range(10, 100))
    assert 0.07 < splits["test"] / splits.total() < 0.13


def test_no_duplicates_within_a_split() -> None:
    for split, n in (("train", 2000), ("test", 200)):
        questions = [e["question"] for e in mixed.generate_split(split, 0, n, (2, 3))]
        assert len(set(questions)) == n


def test_every_level_and_op_has_test_problems() -> None:
    for op in mixed.OPS:
        for level in range(1, 13):
            (p,) = mixed.generate_split("test", 0, 1, (level,), (op,))
            assert p["level"] == level and mixed.parse_question(p["question"])[0] == op


@pytest.mark.parametrize("levels", [(1, 2), (3, 4), (6, 9)])
def test_worked_lines_are_right(levels: tuple[int, ...]) -> None:
    for split in ("train", "test"):
        for ex in mixed.generate_split(split, 1, 150, levels):
            op, a, b = mixed.parse_question(ex["question"])
            assert op != "sub" or a >= b
            width = len(str(a))
            assert width == ex["level"] and (op != "mul" or 2 <= b <= 9)
            _check_example(ex)


def test_every_phrasing_is_used_and_checked() -> None:
    used = collections.Counter()
    varied_within = 0
    for ex in mixed.generate_split("train", 0, 1500, (2, 3)):
        lines = _check_example(ex)
        used.update(lines)
        varied_within += len({i for _, kind, i in lines if kind == "column"}) > 1
    for op, forms in mixed.PHRASINGS.items():
        for kind, templates in forms.items():
            counts = [used[(op, kind, i)] for i in range(len(templates))]
            assert len(templates) >= 3 and min(counts) > 0, (op, kind, counts)
    # Phrasings are drawn per line, not per problem.
    assert varied_within > 500


def test_bad_problems_are_refused() -> None:
    with pytest.raises(ValueError, match="a >= b"):
        mixed.worked_solution("sub", 3, 5)
    with pytest.raises(ValueError, match="one digit"):
        mixed.worked_solution("mul", 12, 13)
    with pytest.raises(ValueError, match="op must be"):
        mixed.worked_solution("div", 12, 3)
    with pytest.raises(ValueError, match="op must be"):
        mixed.generate_split("train", 0, 1, (2,), ("add", "pow"))
    with pytest.raises(ValueError, match="split"):
        mixed.generate_split("valid", 0, 1, (2,))
    with pytest.raises(ValueError, match="level"):
        mixed.make_problem(np.random.default_rng(0), 0)
    with pytest.raises(ValueError, match="question"):
        mixed.parse_question("What is 3 / 4?")
    p = mixed.make_problem(np.random.default_rng(0), 3, ("sub",), seed=1)
    assert mixed.parse_question(p["question"])[0] == "sub" and p["level"] == 3
    _check_example(p)


# ------------------------------------------------------------------------------------- config


def test_mixed_is_the_default_and_the_configs_say_so() -> None:
    assert DataConfig().task == "mixed" and DataConfig().ops == ("add",)
    for name in ("tiny", "micro"):
        assert load_config(CONFIGS / f"{name}.yaml").data.task == "mixed"
    assert load_config(CONFIGS / "tiny.yaml", ["data.task=addition"]).data.task == "addition"


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.task=subtraction"], r"data\.task must be one of \['addition', 'mixed'\]"),
    (["data.task=addition", "data.ops=[add, sub]"], r"data\.ops applies to data\.task=mixed only"),
    (["data.ops=[div]"], r"data\.ops .*\['add', 'sub', 'mul'\], got \['div'\]"),
    (["data.ops=[add, add]"], r"data\.ops must be a non-empty list of distinct"),
    (["data.ops=[]"], r"data\.ops must be a non-empty list"),
    (["data.ops=add"], r"data\.ops must be a list"),
])
def test_config_errors_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_direct_construction_is_checked_too() -> None:
    with pytest.raises(ConfigError, match=r"data\.task"):
        DataConfig(task="subtraction")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"data\.ops"):
        DataConfig(task="addition", ops=("sub",))


def test_tiny_max_len_leaves_room_for_pad_augmentation() -> None:
    data = load_config(CONFIGS / "tiny.yaml").data
    tok = ByteTokenizer()
    lengths = [pairs.pair_length(*map(len, loader.example_to_ids(tok, ex)))
               for split, n in (("train", 3000), ("test", data.num_test))
               for ex in mixed.generate_split(split, data.seed, n, data.levels, data.ops)]
    assert max(lengths) * 1.15 <= data.max_len, (max(lengths), data.max_len)


# --------------------------------------------------------------------------------------- TFDS


def test_tfds_round_trip_and_directories(tmp_path: Path) -> None:
    data = DataConfig(data_dir=str(tmp_path), num_train=30, num_test=9, levels=(2, 3),
                      ops=("sub", "mul"))
    built = tfds_builder.build(data)
    assert built.parent.name == "mixed-sub-mul_s0_tr30_te9_l2-3"
    for split, n in (("train", data.num_train), ("test", data.num_test)):
        src = tfds_builder.load_source(data, split)
        got = [src[i] for i in range(len(src))]
        assert len(got) == n
        assert got == tfds_builder.generate_split(data, split)
        assert got == mixed.generate_split(split, data.seed, n, data.levels, data.ops)
    assert loader.test_examples(data, 4) == got[:4]
    # Other operations or the addition task: directories of their own; addition's are named as
    # before the mixed task existed, so data built then is still found.
    other = tfds_builder.build(dataclasses.replace(data, ops=("mul", "sub")))
    addition_cfg = dataclasses.replace(data, task="addition", ops=DEFAULT_MIXED_OPS)
    addition = tfds_builder.build(addition_cfg)
    assert len({built, other, addition}) == 3
    assert addition.parent.name == "s0_tr30_te9_l2-3" == tfds_builder.config_name(0, 30, 9, (2, 3))
    assert addition.name == "1.0.0"
    assert loader.test_examples(addition_cfg) == arith.generate_split("test", 0, 9, (2, 3))

    cfg = Config(data=data, sft=SftConfig(batch_size=4, seed=1))
    batch = loader.make_train_dataset(cfg, ByteTokenizer(), "sft")[0]
    assert batch["tokens"].shape == (4, data.max_len)


def test_runs_saved_before_the_task_field_keep_addition(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "micro.yaml", ["data.task=addition"])
    raw = config_lib.to_dict(cfg)
    del raw["data"]["task"], raw["data"]["ops"]  # as saved before they existed
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert config_lib.config_from_json(tmp_path / "config.json") == cfg
    assert config_lib.saved_from_dict(raw) == cfg
    # A config file written today without the key gets today's default.
    assert config_lib.from_dict(raw).data.task == "mixed"

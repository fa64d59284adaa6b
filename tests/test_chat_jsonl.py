"""Chat-JSONL training data: parsing, the TFDS build, length bucketing, and the SFT configs."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import chex
import numpy as np
import pytest

from pipo_jax.config import (
    ArConfig,
    Config,
    ConfigError,
    DataConfig,
    SftConfig,
    load_config,
)
from pipo_jax.data import arith, chat_builder, chat_jsonl, loader, tfds_builder
from pipo_jax.data.chat_jsonl import ChatDataError, MalformedLines, conversation_ids
from pipo_jax.io.hf.convert import model_config
from pipo_jax.io.tokenizer import ByteTokenizer, HFTokenizer
from pipo_jax.model import pairs
from pipo_jax.train import supervised
from pipo_jax.train.pipeline import train_stage

REPO = Path(__file__).resolve().parents[1]
LEVELS = (2, 3)
TOK = ByteTokenizer()


def _line(messages: list[dict], **extra: Any) -> str:
    return json.dumps({"messages": messages, **extra})


def _turns(user: str, assistant: str | dict, system: str | None = None) -> list[dict]:
    final = assistant if isinstance(assistant, dict) else {"role": "assistant",
                                                             "content": assistant}
    head = [{"role": "system", "content": system}] if system is not None else []
    return head + [{"role": "user", "content": user}, final]


def _write(path: Path, lines: list[str | bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n"
                              for x in lines))
    return path


def _chat_cfg(data_dir: Path, files: list[Path], **kw: Any) -> DataConfig:
    return DataConfig(source="chat_jsonl", train_files=tuple(str(f) for f in files),
                      data_dir=str(data_dir), **{"max_len": 512, **kw})


def _varied_lines(n: int, seed: int) -> list[str]:
    """``n`` single-turn trajectories of widely spread lengths (about 20 to 450 tokens)."""
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        question = f"q{i} " + "w" * int(rng.integers(1, 40))
        reasoning = "r" * int(rng.integers(1, 400))
        lines.append(_line(_turns(question, f"<think>\n{reasoning}\n</think>\n\na{i}")))
    return lines


def _real_length(row: np.ndarray, pad_id: int) -> int:
    """Tokens up to the last non-PAD one [T] → count (right padding excluded)."""
    real = np.flatnonzero(row != pad_id)
    return int(real[-1]) + 1 if real.size else 0


# ------------------------------------------------------------------------------------ parsing


def test_reasoning_conventions() -> None:
    def response(final: dict) -> str:
        return chat_jsonl.parse_conversation(_line(_turns("hi", final)), "x:1").response

    answer = "R1\nR2\n</think>\n\nThe answer."
    # (a) a <think> block in the content; also with the opening tag left to the template.
    assert response({"role": "assistant", "content": "<think>\n" + answer}) == answer
    assert response({"role": "assistant", "content": answer}) == answer
    # (b) reasoning_content, with the Qwen3 template's newline trimming.
    assert response({"role": "assistant", "reasoning_content": "\nR1\nR2\n\n",
                     "content": "\n\nThe answer."}) == answer
    # (c) no reasoning: an empty think block, as the Qwen3 template renders it.
    assert response({"role": "assistant", "content": "The answer."}) == (
        "\n</think>\n\nThe answer.")


def test_structural_think_end() -> None:
    def think_end(final: dict) -> tuple[str, str]:
        conv = chat_jsonl.parse_conversation(_line(_turns("hi", final)), "x:1")
        assert conv.response[conv.think_end:].startswith("</think>")
        return conv.response[:conv.think_end], conv.response[conv.think_end + len("</think>"):]

    # (a): the first </think> ends the reasoning; one in the answer is text.
    assert think_end({"role": "assistant", "content": "<think>\nR\n</think>\n\nA </think>"}) == (
        "R\n", "\n\nA </think>")
    # (b): the separator, even when the reasoning holds a </think> of its own.
    assert think_end({"role": "assistant", "reasoning_content": "R </think> R",
                      "content": "A"}) == ("R </think> R\n", "\n\nA")
    # (a′): reasoning opened by the template; its first </think> ends it.
    assert think_end({"role": "assistant", "content": "R </think>x</think>"}) == (
        "R ", "x</think>")
    # (c): the empty think block's; a tag that opens no think block is text.
    assert think_end({"role": "assistant", "content": "A"}) == ("\n", "\n\nA")
    assert think_end({"role": "assistant", "content": "Use <think>."}) == ("\n", "\n\nUse <think>.")
    assert think_end({"role": "assistant", "reasoning_content": "R",
                      "content": "A <think></think>"}) == ("R\n", "\n\nA <think></think>")


def test_prompt_turns_and_extra_keys() -> None:
    messages = [{"role": "system", "content": "sys", "name": "ignored"},
                {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "<think>\nold\n</think>\n\na1",
                 "reasoning_content": None},
                {"role": "user", "content": "u2"},
                {"role": "assistant", "content": "a2"}]
    conv = chat_jsonl.parse_conversation(_line(messages, id=7, source="x"), "f:2")
    # Past assistant turns lose their reasoning, as the Qwen3 template renders them.
    assert conv.prompt == ({"role": "system", "content": "sys"}, {"role": "user", "content": "u1"},
                           {"role": "assistant", "content": "a1"},
                           {"role": "user", "content": "u2"})
    assert conv.where == "f:2"


MALFORMED = [
    ("{oops", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"id": 3}', "no 'messages' key"),
    ('{"messages": []}', "non-empty list"),
    (_line(["hi"]), r"messages\[0\] must be an object"),
    (_line([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]),
     r"messages\[0\] has role 'tool'"),
    (_line(_turns("q", {"role": "assistant", "content": 5})), "content must be a string, got int"),
    (_line([{"role": "user"}, {"role": "assistant", "content": "y"}]), "got no content"),
    (_line([{"role": "user", "content": "q"}]), "last message must be the assistant turn"),
    (_line(_turns("q", " \n")), "final assistant turn is empty"),
    (_line(_turns("q", {"role": "assistant", "content": "", "reasoning_content": ""})),
     "final assistant turn is empty"),
    (_line(_turns("q", "<think>\nnever closed")), "never closes it"),
    (_line(_turns("q", {"role": "assistant", "content": "<think>\nr</think>a",
                        "reasoning_content": "r"})), "both reasoning_content and a <think>"),
    (_line(_turns("q", {"role": "assistant", "content": "a", "reasoning_content": 3})),
     "reasoning_content must be a string"),
]


@pytest.mark.parametrize(("bad", "reason"), MALFORMED)
def test_malformed_line_names_file_and_line(tmp_path: Path, bad: str, reason: str) -> None:
    path = _write(tmp_path / "d.jsonl", [_line(_turns("q", "a")), "", bad])
    with pytest.raises(ChatDataError, match=re.escape(f"{path}:3: ") + ".*" + reason):
        list(chat_jsonl.iter_conversations([path], MalformedLines("error")))


def test_malformed_line_fails_the_build(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [_line(_turns("q", "a")), '{"messages": 1}'])
    cfg = _chat_cfg(tmp_path / "tfds", [path])
    with pytest.raises(ConfigError, match=re.escape(f"{path}:2: ") + ".*on_malformed=skip"):
        chat_builder.load_train(cfg, TOK)
    assert not list((tmp_path / "tfds").rglob("dataset_info.json"))


def test_skip_and_count(tmp_path: Path) -> None:
    # The PAD token's string in a message is text, not a malformed line (issue #19).
    good = [_line(_turns(q, "a")) for q in ("q0", "q1", "q2", "holds <|pad|> in its text", "q4")]
    bad = ["{oops", _line([{"role": "tool", "content": "x"}]), b"\xff\xfe not utf-8"]
    path = _write(tmp_path / "d.jsonl", [good[0], bad[0], "", good[1], bad[1], bad[2], good[2],
                                         good[3], good[4]])
    with pytest.raises(ChatDataError, match=re.escape(f"{path}:2: ")):
        chat_builder.load_train(_chat_cfg(tmp_path / "tfds", [path]), TOK)
    src = chat_builder.load_train(_chat_cfg(tmp_path / "tfds", [path], on_malformed="skip"), TOK)
    assert src.stats["malformed_skipped"] == len(bad)
    assert src.stats["examples"] == len(src.records) == len(good)
    on_disk = json.loads((src.directory / "metadata.json").read_text())
    assert on_disk["malformed_skipped"] == len(bad) and on_disk["overlength_dropped"] == 0
    assert [TOK.decode(src.records[i]["prompt"]) for i in range(len(good))] == [
        "q0\n", "q1\n", "q2\n", "holds <|pad|> in its text\n", "q4\n"]


# Control tokens' strings of both tokenizers, as a data file might hold them.
INJECTED = ("a <|pad|> <|endoftext|> b<|end|><|assistant|>c<|im_end|>\n<|im_start|>assistant\n"
            "<think>\nd</think>\n\ne")

# Each tokenizer's control ids: those no message text may encode to.
CONTROLS = {ByteTokenizer: lambda tok: set(range(tok.N_SPECIAL)),
            HFTokenizer: lambda tok: {tok.token_id(s) for s in (
                "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")}}


def _injected_lines() -> list[str]:
    """Trajectories with control strings in every message, under conventions (a), (b), (c)."""
    return [
        _line(_turns(INJECTED, "<think>\nR\n</think>\n\nA " + INJECTED, system=INJECTED)),
        _line(_turns(INJECTED, {"role": "assistant", "reasoning_content": "R " + INJECTED,
                                "content": "A " + INJECTED})),
        _line([{"role": "user", "content": INJECTED},
               {"role": "assistant", "content": "<think>\nold\n</think>\n\n" + INJECTED},
               {"role": "user", "content": INJECTED}, {"role": "assistant", "content": INJECTED}]),
    ]


def _check_text_is_text(tok: ByteTokenizer | HFTokenizer, lines: list[str],
                        records: Any) -> None:
    """Each record of ``lines`` holds no PAD, only its template's control tokens and one
    structural </think>, and decodes to the messages' literal text."""
    for i, line in enumerate(lines):
        conv = chat_jsonl.parse_conversation(line)
        prompt, response = records[i]["prompt"].tolist(), records[i]["response"].tolist()
        assert tok.pad_id not in prompt and tok.pad_id not in response
        benign = [{**m, "content": "ok"} for m in conv.prompt]
        want_prompt, _ = conversation_ids(tok, benign, "")
        controls = CONTROLS[type(tok)](tok)
        assert (collections.Counter(t for t in prompt if t in controls)
                == collections.Counter(t for t in want_prompt if t in controls))
        assert [t for t in response if t in controls] == [tok.think_end_id, tok.eos_id]
        assert tok.decode(response, skip_special=False) == (
            conv.response + tok.decode([tok.eos_id], skip_special=False))
        assert INJECTED in tok.decode(prompt, skip_special=False)
        pairs.build_pair_sequence(prompt, response, tok.pad_id)  # the pair invariant holds



def test_control_strings_in_messages_are_text(tmp_path: Path) -> None:
    lines = _injected_lines()
    path = _write(tmp_path / "d.jsonl", lines)
    src = chat_builder.load_train(_chat_cfg(tmp_path / "tfds", [path]), TOK)
    assert src.stats["malformed_skipped"] == 0 and len(src.records) == len(lines)
    _check_text_is_text(TOK, lines, src.records)
    # (b): the separator's </think> is the structural one, the reasoning's own is text.
    conv = chat_jsonl.parse_conversation(lines[1])
    reasoning = "R " + INJECTED + "\n"
    assert conv.response[:conv.think_end] == reasoning
    assert src.records[1]["response"].tolist()[:len(TOK.encode(reasoning)) + 1] == (
        TOK.encode(reasoning) + [TOK.think_end_id])
    # The SFT batches build (no PAD inside a prompt or response) and keep PADs at odd positions.
    cfg = Config(data=_chat_cfg(tmp_path / "tfds", [path], max_len=1024),
                 sft=SftConfig(batch_size=3, pad_ratio_max=0.5))
    batch = loader.make_train_dataset(cfg, TOK, "sft")[0]
    for row in batch["tokens"]:
        pairs.assert_pad_at_odd(row, TOK.pad_id, _real_length(row, TOK.pad_id))


def test_overlength_drop_count(tmp_path: Path) -> None:
    lines = _varied_lines(24, seed=3)
    path = _write(tmp_path / "d.jsonl", lines)
    max_len = 200
    lengths = []
    for line in lines:
        conv = chat_jsonl.parse_conversation(line)
        p, r = conversation_ids(TOK, conv.prompt, conv.response)
        lengths.append(pairs.pair_length(len(p), len(r)))
    too_long = sum(n > max_len for n in lengths)
    assert 0 < too_long < len(lines)

    dropped = chat_builder.load_train(
        _chat_cfg(tmp_path / "tfds", [path], max_len=max_len, overlength="drop"), TOK)
    assert dropped.stats["overlength_dropped"] == too_long
    assert len(dropped.records) == len(lines) - too_long
    assert dropped.lengths.tolist() == [n for n in lengths if n <= max_len]
    assert [int(dropped.records[i]["length"]) for i in range(3)] == dropped.lengths[:3].tolist()

    kept = chat_builder.load_train(_chat_cfg(tmp_path / "tfds", [path], max_len=max_len), TOK)
    assert kept.stats["overlength_dropped"] == 0 and kept.lengths.tolist() == lengths
    assert kept.directory != dropped.directory


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(ChatDataError, match="does not exist"):
        chat_jsonl.resolve_files([str(tmp_path / "nope.jsonl")])
    with pytest.raises(ChatDataError, match="matches no file"):
        chat_jsonl.resolve_files([str(tmp_path / "*.jsonl")])
    with pytest.raises(ChatDataError, match="is a directory"):
        chat_jsonl.resolve_files([str(tmp_path)])
    with pytest.raises(ConfigError, match="train_files is empty"):
        DataConfig(source="chat_jsonl")
    with pytest.raises(ConfigError, match="set data.source=chat_jsonl"):
        DataConfig(train_files=("a.jsonl",))
    with pytest.raises(ConfigError, match="above data.max_len"):
        DataConfig(max_len=128, buckets=(64, 256))
    a = _write(tmp_path / "a.jsonl", [])
    b = _write(tmp_path / "b.jsonl", [])
    # Order as given, each glob sorted, no duplicates.
    assert chat_jsonl.resolve_files([str(b), str(tmp_path / "*.jsonl")]) == [b, a]
    with pytest.raises(ChatDataError, match="no trajectory to train on"):
        chat_builder.load_train(_chat_cfg(tmp_path / "tfds", [a]), TOK)


# -------------------------------------------------------------------------------------- build


def test_build_is_reused_and_keyed_by_content(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    lines = _varied_lines(6, seed=1)
    path = _write(tmp_path / "a" / "d.jsonl", lines)
    first = chat_builder.load_train(_chat_cfg(tmp_path / "tfds", [path]), TOK)
    for i, line in enumerate(lines):
        conv = chat_jsonl.parse_conversation(line)
        want = conversation_ids(TOK, conv.prompt, conv.response)
        record = first.records[i]
        chex.assert_type([record["prompt"], record["response"]], np.int32)
        assert (record["prompt"].tolist(), record["response"].tolist()) == want

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("dataset rebuilt although it was already built")

    with monkeypatch.context() as m:
        m.setattr(chat_builder.ChatTrajectories, "download_and_prepare", no_rebuild)
        assert chat_builder.load_train(_chat_cfg(tmp_path / "tfds", [path]), TOK).directory == \
            first.directory
        # The same bytes elsewhere are the same dataset.
        moved = _write(tmp_path / "b" / "other.jsonl", lines)
        assert chat_builder.load_train(_chat_cfg(tmp_path / "tfds", [moved]), TOK).directory == \
            first.directory
    _write(path, lines[:-1])
    assert chat_builder.load_train(_chat_cfg(tmp_path / "tfds", [path]), TOK).directory != \
        first.directory
    for other in ({"max_len": 256}, {"on_malformed": "skip"}):
        assert chat_builder.load_train(_chat_cfg(tmp_path / "tfds", [path], **other),
                                       TOK).directory.parent.name != first.directory.parent.name


def test_hf_tokenizer_build(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    from test_hf_tokenizer import _write_tokenizer

    tok = HFTokenizer.from_dir(_write_tokenizer(tmp_path / "tok"))
    lines = [_line(_turns("what is 12 + 30?", "<think>\nthe answer is 42\n</think>\n\n42")),
             _line(_turns("hello", {"role": "assistant", "reasoning_content": "hello world",
                                    "content": "hi"}))]
    path = _write(tmp_path / "d.jsonl", lines)
    src = chat_builder.load_train(_chat_cfg(tmp_path / "tfds", [path]), tok)
    byte_src = chat_builder.load_train(_chat_cfg(tmp_path / "tfds", [path]), TOK)
    assert src.directory.parent != byte_src.directory.parent
    for i, line in enumerate(lines):
        conv = chat_jsonl.parse_conversation(line)
        want = conversation_ids(tok, conv.prompt, conv.response)
        assert (src.records[i]["prompt"].tolist(), src.records[i]["response"].tolist()) == want
    assert tok.decode(src.records[1]["response"], skip_special=False) == (
        "hello world\n</think>\n\nhi<|im_end|>")
    # Control strings in the messages (PAD's "<|endoftext|>" among them) are text.
    injected = _injected_lines()
    src = chat_builder.load_train(
        _chat_cfg(tmp_path / "tfds", [_write(tmp_path / "injected.jsonl", injected)]), tok)
    assert src.stats["malformed_skipped"] == 0
    _check_text_is_text(tok, injected, src.records)


# ------------------------------------------------------------------------------------ batches


def test_prompt_masking(tmp_path: Path) -> None:
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "u1"},
                {"role": "assistant", "content": "<think>\nold\n</think>\n\na1"},
                {"role": "user", "content": "u2"},
                {"role": "assistant", "reasoning_content": "think", "content": "a2"}]
    path = _write(tmp_path / "d.jsonl", [_line(messages)])
    cfg = Config(data=_chat_cfg(tmp_path / "tfds", [path], max_len=64),
                 ar=ArConfig(batch_size=2), sft=SftConfig(batch_size=2, pad_ratio_max=1.0))
    prompt, response = conversation_ids(
        TOK, [{"role": "system", "content": "sys"}, {"role": "user", "content": "u1"},
              {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}],
        "think\n</think>\n\na2")
    for stage in ("ar", "sft"):
        batch = loader.make_train_dataset(cfg, TOK, stage)[0]
        chex.assert_shape([batch["tokens"], batch["loss_mask"]], (2, 64))
        chex.assert_type([batch["tokens"], batch["loss_mask"]], [np.int32, bool])
        for toks, mask in zip(batch["tokens"], batch["loss_mask"], strict=True):
            real = toks[toks != TOK.pad_id]
            assert real[:len(prompt)].tolist() == prompt
            assert toks[mask].tolist() == response  # the final turn and EOS, nothing else
            assert not mask[toks == TOK.pad_id].any()
            assert TOK.decode(toks[:len(prompt)]).count("old") == 0


@pytest.fixture(scope="module")
def arith_as_chat(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Config]:
    """The arithmetic train split and the same problems written as chat JSONL (configs for
    both, sharing a data_dir)."""
    root = tmp_path_factory.mktemp("arith_chat")
    base = DataConfig(data_dir=str(root / "tfds"), num_train=48, num_test=12, levels=LEVELS,
                      max_len=400)
    examples = tfds_builder.generate_split(base, "train")
    path = _write(root / "arith.jsonl", [
        _line(arith.to_messages(ex) + [{"role": "assistant",
                                        "content": "<think>\n" + ex["response"]}])
        for ex in examples])
    chat = dataclasses.replace(base, source="chat_jsonl", train_files=(str(path),))
    stages = {"ar": ArConfig(batch_size=8, seed=1),
              "sft": SftConfig(batch_size=8, seed=1, pad_ratio_max=0.5)}
    return Config(data=base, **stages), Config(data=chat, **stages)


def test_same_batches_as_the_embedded_task(arith_as_chat: tuple[Config, Config]) -> None:
    arith_cfg, chat_cfg = arith_as_chat
    for stage in ("ar", "sft"):
        want = loader.make_train_dataset(arith_cfg, TOK, stage)
        got = loader.make_train_dataset(chat_cfg, TOK, stage)
        for step in (0, 1, 5, 6, 11):  # 6 batches per epoch: 6 and 11 are in the second
            chex.assert_trees_all_equal(got[step], want[step])


def _check_bucketed(batch: dict[str, np.ndarray], stage: str, buckets: tuple[int, ...],
                    max_len: int) -> int:
    """Asserts the bucket and pair invariants of one batch; returns its T."""
    T = batch["tokens"].shape[1]
    assert T in (*buckets, max_len)
    # A sft row is even; its last pair may end in PAD, so round the visible length up.
    lengths = [_real_length(row, TOK.pad_id) for row in batch["tokens"]]
    longest = max(n + n % 2 if stage == "sft" else n for n in lengths)
    assert T == min(b for b in (*buckets, max_len) if b >= min(longest, max_len))
    if stage == "sft":
        for row, n in zip(batch["tokens"], lengths, strict=True):
            pairs.assert_pad_at_odd(row, TOK.pad_id, n)
    return T


def _pad_fraction(batch: dict[str, np.ndarray]) -> float:
    real = sum(_real_length(row, TOK.pad_id) for row in batch["tokens"])
    return 1.0 - real / batch["tokens"].size


def test_length_bucketing(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", _varied_lines(40, seed=2))
    buckets, max_len, window = (64, 128, 192, 256, 320, 384, 448), 512, 3
    plain = Config(data=_chat_cfg(tmp_path / "tfds", [path], max_len=max_len),
                   ar=ArConfig(batch_size=4, seed=3),
                   sft=SftConfig(batch_size=4, seed=3, pad_ratio_max=0.5))
    bucketed = dataclasses.replace(
        plain, data=dataclasses.replace(plain.data, buckets=buckets, bucket_window=window))
    steps = range(4 * window)
    for stage in ("ar", "sft"):
        ds = loader.make_train_dataset(bucketed, TOK, stage)
        fresh = loader.make_train_dataset(bucketed, TOK, stage)  # e.g. a resumed run
        unbucketed = loader.make_train_dataset(plain, TOK, stage)
        shapes = {_check_bucketed(ds[s], stage, buckets, max_len) for s in steps}
        assert len(shapes) > 1
        for s in reversed(steps):  # out of order: the window cache must not leak
            chex.assert_trees_all_equal(fresh[s], ds[s])
        assert np.mean([_pad_fraction(ds[s]) for s in steps]) < \
            0.75 * np.mean([_pad_fraction(unbucketed[s]) for s in steps])
        if stage == "ar":
            # Bucketing regroups a window's examples; it neither drops nor repeats any.
            def rows(d: Any, window_steps: range) -> list[tuple[int, ...]]:
                return sorted(tuple(r[r != TOK.pad_id].tolist())
                              for s in window_steps for r in d[s]["tokens"])

            for w in range(3):
                window_steps = range(w * window, (w + 1) * window)
                assert rows(ds, window_steps) == rows(unbucketed, window_steps)


def test_bucketing_the_embedded_task(arith_as_chat: tuple[Config, Config]) -> None:
    arith_cfg, _ = arith_as_chat
    cfg = dataclasses.replace(arith_cfg, data=dataclasses.replace(
        arith_cfg.data, buckets=(192, 224, 256, 320), bucket_window=2))
    for stage in ("ar", "sft"):
        ds = loader.make_train_dataset(cfg, TOK, stage)
        shapes = {_check_bucketed(ds[s], stage, cfg.data.buckets, cfg.data.max_len)
                  for s in range(6)}
        assert len(shapes) > 1


def test_trainer_consumes_chat_data_with_buckets(tmp_path: Path, compilation_cache_dir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # One window of 8 examples, 4 short and 4 long: its two batches fall in different buckets.
    short = [_line(_turns(f"q{i}", f"a{i}")) for i in range(4)]
    long = [_line(_turns(f"q{i}", "<think>\n" + "r" * 150 + "\n</think>\n\nok"))
            for i in range(4)]
    path = _write(tmp_path / "d.jsonl", short + long)
    cfg = load_config(REPO / "configs" / "micro.yaml", [
        f"run_dir={tmp_path / 'run'}", f"data.data_dir={tmp_path / 'tfds'}",
        "data.source=chat_jsonl", f"data.train_files=[{path}]", "data.max_len=256",
        "data.buckets=[64, 128]", "data.bucket_window=2", "ar.steps=2",
        # Attention-only: compiling the DeltaNet layer would triple this test's time, and the
        # data path does not depend on the layer type.
        "model.layer_types=[full_attention, full_attention]"])
    seen: list[tuple[int, ...]] = []
    real = supervised.make_train_dataset

    class Recording:
        def __init__(self, data: Any) -> None:
            self._data = data

        def __getitem__(self, step: int) -> dict[str, np.ndarray]:
            batch = self._data[step]
            seen.append(batch["tokens"].shape)
            return batch

    monkeypatch.setattr(supervised, "make_train_dataset",
                        lambda *args: Recording(real(*args)))
    # The ar stage keeps this test short; sft batches take the same path (test_length_bucketing).
    result = train_stage(cfg, "ar", progress=False)
    assert result.steps == 2 and math.isfinite(result.final_metrics["loss"])
    assert {t for _, t in seen} == {64, 256}, seen


# ------------------------------------------------------------------------------------ configs


def _qwen3_5_hf_config(d_model: int, mlp_dim: int, tied: bool) -> dict[str, Any]:
    """A Qwen3.5 config.json (the VLM layout of the released checkpoints) with the numbers of
    /work/shared/QWEN3_5.md §1."""
    return {
        "model_type": "qwen3_5", "architectures": ["Qwen3_5ForConditionalGeneration"],
        "tie_word_embeddings": tied,
        "text_config": {
            "model_type": "qwen3_5_text", "vocab_size": 248320, "hidden_size": d_model,
            "intermediate_size": mlp_dim, "num_hidden_layers": 32, "full_attention_interval": 4,
            "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 256,
            "linear_num_key_heads": 16, "linear_num_value_heads": 32,
            "linear_key_head_dim": 128, "linear_value_head_dim": 128,
            "linear_conv_kernel_dim": 4, "hidden_act": "silu", "rms_norm_eps": 1e-6,
            "attention_bias": False, "attn_output_gate": True, "mtp_num_hidden_layers": 1,
            "max_position_embeddings": 262144, "eos_token_id": 248044,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e7,
                                "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10],
                                "mrope_interleaved": True}}}


@pytest.mark.parametrize(("name", "d_model", "mlp_dim", "tied"),
                         [("qwen3_5_4b_sft", 2560, 9216, True),
                          ("qwen3_5_9b_sft", 4096, 12288, False)])
def test_sft_configs(name: str, d_model: int, mlp_dim: int, tied: bool) -> None:
    cfg = load_config(REPO / "configs" / f"{name}.yaml", ["data.train_files=[my/sft.jsonl]"])
    # hf-to-pipo's model: the mapped config.json, with the checkpoint's MTP module as the head.
    converted = dataclasses.replace(model_config(_qwen3_5_hf_config(d_model, mlp_dim, tied)),
                                    mtp_init="native")
    # Compute settings the YAML chooses; they change no parameter.
    assert (cfg.model.dtype, cfg.model.remat_policy) == ("bfloat16", "layer")
    assert dataclasses.replace(cfg.model, dtype=converted.dtype,
                               remat_policy=converted.remat_policy) == converted
    assert cfg.stages == ("sft",) and cfg.tokenizer == "tokenizer"
    assert cfg.data.source == "chat_jsonl" and cfg.data.train_files == ("my/sft.jsonl",)
    assert (cfg.data.max_len, cfg.data.overlength) == (65536, "drop")
    assert cfg.data.buckets[-1] == cfg.data.max_len
    sft = cfg.sft
    assert (sft.tuner, sft.lora.rank, sft.lora.alpha, sft.lora.dropout) == ("lora", 64, 128, 0.05)
    assert (sft.learning_rate, sft.warmup_frac, sft.b2, sft.weight_decay) == (1e-4, 0.05, 0.95,
                                                                              0.1)
    assert (sft.batch_size, sft.w_mtp, sft.w_conf, sft.pad_ratio_max, sft.loss_chunk) == (
        128, 1.0, 1.0, 0.25, 2048)
    assert sft.steps == round(2 * 90_000 / 128, -2)
    # 64K rows: linear-memory attention, the batch of 128 by accumulation (docs/attention.md).
    assert (cfg.model.attention_impl, sft.grad_accum, sft.batch_size % sft.grad_accum) == (
        "auto", 16, 0)
    # OPD: 32 rollouts on 8 chips, the update one row per chip at a time.
    assert (cfg.opd.batch_size, cfg.opd.grad_accum) == (32, 4)
    assert load_config(REPO / "configs" / f"{name}.yaml").data.train_files == ("data/sft.jsonl",)


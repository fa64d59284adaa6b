"""TFDS build + array_record round trip, build safety, and the step-indexed batch pipeline."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import chex
import numpy as np
import pytest

from pipo_jax.config import ArConfig, Config, DataConfig, SftConfig
from pipo_jax.data import arith, loader, mixed, tfds_builder
from pipo_jax.io.tokenizer import ByteTokenizer
from pipo_jax.model import pairs

REPO = Path(__file__).resolve().parents[1]
LEVELS = (2, 3)


def _data_cfg(data_dir: Path, **kw: object) -> DataConfig:
    return DataConfig(data_dir=str(data_dir), num_train=48, num_test=12, levels=LEVELS,
                      max_len=400, **kw)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """A config whose small dataset is built once for the whole module."""
    data = _data_cfg(tmp_path_factory.mktemp("tfds"))
    tfds_builder.build(data)
    return Config(data=data, ar=ArConfig(batch_size=8, seed=1),
                  sft=SftConfig(batch_size=8, seed=1, pad_ratio_max=0.5))


def _array_record_files(data_dir: Path) -> list[Path]:
    return sorted(data_dir.rglob("*.array_record-*"))


def test_build_and_read_round_trip(tmp_path: Path) -> None:
    data = _data_cfg(tmp_path)
    built = tfds_builder.build(data)
    files = _array_record_files(tmp_path)
    assert {f.name.split(".")[0] for f in files} == {"pipo_arith-train", "pipo_arith-test"}
    assert all(f.parent == built for f in files)
    assert not list(built.parent.glob("incomplete*"))
    for split, n in (("train", data.num_train), ("test", data.num_test)):
        src = tfds_builder.load_source(data, split)
        assert len(src) == n
        got = [src[i] for i in range(n)]
        assert got == tfds_builder.generate_split(data, split, n)
        assert all(isinstance(e["question"], str) and isinstance(e["level"], int) for e in got)


def test_settings_get_their_own_directory(tmp_path: Path) -> None:
    a = tfds_builder.build(_data_cfg(tmp_path))
    b = tfds_builder.build(dataclasses.replace(_data_cfg(tmp_path), seed=7))
    assert a != b
    assert tfds_builder.load_source(_data_cfg(tmp_path), "test")[0] != \
        tfds_builder.load_source(dataclasses.replace(_data_cfg(tmp_path), seed=7), "test")[0]


def test_second_load_does_not_rebuild(cfg: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {f: f.stat().st_mtime_ns for f in _array_record_files(Path(cfg.data.data_dir))}

    def no_rebuild(*args: object, **kwargs: object) -> None:
        raise AssertionError("dataset rebuilt although it was already built")

    monkeypatch.setattr(tfds_builder.ArithReasoning, "download_and_prepare", no_rebuild)
    assert len(tfds_builder.load_source(cfg.data, "train")) == cfg.data.num_train
    after = {f: f.stat().st_mtime_ns for f in _array_record_files(Path(cfg.data.data_dir))}
    assert before == after


def test_crashed_build_is_never_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _data_cfg(tmp_path)
    assert data.task == "mixed"
    real = mixed.generate_split

    def crash_on_test(split: str, *args: object) -> list[dict]:
        if split == "test":  # the train split is already written by now
            raise RuntimeError("simulated crash")
        return real(split, *args)

    monkeypatch.setattr(mixed, "generate_split", crash_on_test)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tfds_builder.build(data)
    final = Path(tfds_builder._builder(data).data_dir)
    assert not final.exists()
    # A build killed outright (no cleanup) leaves its temporary directory behind.
    stale = final.parent / f"incomplete.DEAD01_{final.name}"
    stale.mkdir(parents=True)
    (stale / "pipo_arith-train.array_record-00000-of-00001").write_bytes(b"garbage")
    monkeypatch.setattr(mixed, "generate_split", real)
    src = tfds_builder.load_source(data, "train")
    assert [src[i] for i in range(3)] == real("train", data.seed, 3, data.levels, data.ops)
    assert not stale.exists()


def test_concurrent_builds(tmp_path: Path) -> None:
    script = (
        "import logging, sys\n"
        "logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
        "from pipo_jax.config import DataConfig\n"
        "from pipo_jax.data.tfds_builder import load_source\n"
        f"cfg = DataConfig(data_dir={str(tmp_path)!r}, num_train=3000, num_test=50)\n"
        "src = load_source(cfg, 'train')\n"
        "assert len(src) == 3000 and src[2999]['question'].startswith('What is')\n"
        "assert 'tensorflow' not in sys.modules  # TFDS must work without TF\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert sum(e.count("Building dataset") for e in errs) == 1, errs


def test_train_batches_are_deterministic_by_step(cfg: Config) -> None:
    tok = ByteTokenizer()
    for stage in ("ar", "sft"):
        a = loader.make_train_dataset(cfg, tok, stage)
        b = loader.make_train_dataset(cfg, tok, stage)  # e.g. a resumed run
        for step in (0, 5, 11):
            chex.assert_trees_all_equal(a[step], b[step])
        assert not np.array_equal(a[0]["tokens"], a[1]["tokens"])
        other = loader.make_train_dataset(
            dataclasses.replace(cfg, **{stage: dataclasses.replace(getattr(cfg, stage), seed=2)}),
            tok, stage)
        assert not np.array_equal(a[0]["tokens"], other[0]["tokens"])


def test_epochs_cover_every_example_and_reshuffle(cfg: Config) -> None:
    tok = ByteTokenizer()
    ds = loader.make_train_dataset(cfg, tok, "ar")
    steps_per_epoch = cfg.data.num_train // cfg.ar.batch_size
    prompts = [tok.decode(row) for s in range(2 * steps_per_epoch) for row in ds[s]["tokens"]]
    epoch0, epoch1 = prompts[:cfg.data.num_train], prompts[cfg.data.num_train:]
    assert len(set(epoch0)) == cfg.data.num_train
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


def _ids_by_question(cfg: Config, tok: ByteTokenizer) -> dict[str, tuple[list[int], list[int]]]:
    src = tfds_builder.load_source(cfg.data, "train")
    return {src[i]["question"]: loader.example_to_ids(tok, src[i]) for i in range(len(src))}


def _question(tok: ByteTokenizer, tokens: np.ndarray) -> str:
    m = re.search(r"What is \d+ [-+*] \d+\?", tok.decode(tokens))
    assert m is not None
    return m.group(0)


def _inner_pads(tokens: np.ndarray, pad_id: int) -> int:
    """PADs before the last real token [T] → count."""
    real = np.flatnonzero(tokens != pad_id)
    return int((tokens[: real[-1]] == pad_id).sum())


def test_ar_batch_layout(cfg: Config) -> None:
    tok = ByteTokenizer()
    batch = loader.make_train_dataset(cfg, tok, "ar")[3]
    B, T = cfg.ar.batch_size, cfg.data.max_len
    chex.assert_shape([batch["tokens"], batch["loss_mask"]], (B, T))
    chex.assert_type([batch["tokens"], batch["loss_mask"]], [np.int32, bool])
    assert batch["pad_ratio"] == 0.0
    ids = _ids_by_question(cfg, tok)
    for toks, mask in zip(batch["tokens"], batch["loss_mask"], strict=True):
        prompt, response = ids[_question(tok, toks)]
        n = len(prompt) + len(response)
        assert toks[:n].tolist() == prompt + response
        assert (toks[n:] == tok.pad_id).all()
        assert not mask[:len(prompt)].any() and mask[len(prompt):n].all() and not mask[n:].any()


def test_sft_batch_pair_invariants(cfg: Config) -> None:
    tok = ByteTokenizer()
    ar_ds = loader.make_train_dataset(cfg, tok, "ar")
    sft_ds = loader.make_train_dataset(cfg, tok, "sft")
    ids = _ids_by_question(cfg, tok)
    B, T = cfg.sft.batch_size, cfg.data.max_len
    extra_pads = 0
    for step in range(4):
        ar, sft = ar_ds[step], sft_ds[step]
        chex.assert_shape([sft["tokens"], sft["loss_mask"]], (B, T))
        chex.assert_type([sft["tokens"], sft["loss_mask"]], [np.int32, bool])
        chex.assert_shape(sft["pad_ratio"], ())
        assert 0.0 <= float(sft["pad_ratio"]) <= cfg.sft.pad_ratio_max
        for row in range(B):
            toks, mask = sft["tokens"][row], sft["loss_mask"][row]
            real = np.flatnonzero(toks != tok.pad_id)
            length = int(real[-1]) + 1  # the rest is right padding
            pairs.assert_pad_at_odd(toks, tok.pad_id, length)
            # Same seed, same shuffle: the AR row holds the same example, unpadded and in order.
            ar_toks = ar["tokens"][row]
            assert toks[real].tolist() == ar_toks[ar_toks != tok.pad_id].tolist()
            assert not mask[toks == tok.pad_id].any()
            prompt, response = ids[_question(tok, toks)]
            assert not mask[real[:len(prompt)]].any() and mask[real[len(prompt):]].all()
            assert mask.sum() == len(response)
            base, _ = pairs.build_pair_sequence(prompt, response, tok.pad_id)
            extra_pads += _inner_pads(toks, tok.pad_id) - _inner_pads(base, tok.pad_id)
    assert extra_pads > 0, "PAD augmentation never split a pair"


def test_test_examples(cfg: Config) -> None:
    want = tfds_builder.generate_split(cfg.data, "test")
    assert loader.test_examples(cfg, 5) == want[:5]
    assert loader.test_examples(cfg.data, None) == want
    with pytest.raises(ValueError, match="num_test"):
        loader.test_examples(cfg, cfg.data.num_test + 1)


def test_example_to_ids() -> None:
    tok = ByteTokenizer()
    ex = arith.make_problem(np.random.default_rng(0), 2)
    prompt, response = loader.example_to_ids(tok, ex)
    assert prompt[-2:] == tok.think_prefix()
    assert tok.decode(prompt) == arith.SYSTEM_PROMPT + ex["question"] + "\n"
    assert response[-1] == tok.eos_id and tok.decode(response) == ex["response"].replace(
        "</think>", "")


def _response_pairs_rejected(tokens: np.ndarray, mask: np.ndarray, pad_id: int) -> float:
    """The share of a row's response pairs whose second slot is an augmentation PAD."""
    start = int(np.flatnonzero(mask)[0]) // 2 * 2
    body = tokens[start:int(np.flatnonzero(tokens != pad_id)[-1]) + 1]
    body = np.append(body, pad_id) if len(body) % 2 else body
    second = body[1::2]
    return float((second[:-1] == pad_id).mean())  # the last pair may hold the parity PAD


def test_sft_dense_rows(cfg: Config) -> None:
    """``pad_dense_frac``: that share of rows at their own r ~ U[pad_ratio_max, 1]; at
    ``pad_ratio_max = 1`` a dense row is every pair rejected, the τ = 1 state."""
    tok = ByteTokenizer()
    examples = [loader.example_to_ids(tok, ex) for ex in loader.test_examples(cfg, 12)]
    kw = dict(stage="sft", seed=0, pad_augment="shift", max_len=800, pad_id=tok.pad_id)
    # Off: the stream of an augmentation without dense rows is unchanged (bit-identical runs).
    for step in range(3):
        off = loader._make_batch(step, examples, pad_ratio_max=0.25, **kw)
        zero = loader._make_batch(step, examples, pad_ratio_max=0.25, pad_dense_frac=0.0, **kw)
        chex.assert_trees_all_equal(off, zero)
    # All rows dense at r = 1: every response pair is (x, PAD), real tokens in order.
    full = loader._make_batch(0, examples, pad_ratio_max=1.0, pad_dense_frac=1.0, **kw)
    for toks, mask, (_prompt, response) in zip(full["tokens"], full["loss_mask"], examples,
                                              strict=True):
        assert _response_pairs_rejected(toks, mask, tok.pad_id) == 1.0
        assert toks[mask].tolist() == response
        pairs.assert_pad_at_odd(toks, tok.pad_id, int(np.flatnonzero(toks != tok.pad_id)[-1]) + 1)
    # Half the rows dense, the others at the shared ratio 0 (no augmentation at all).
    dense = []
    for step in range(40):
        b = loader._make_batch(step, examples, pad_ratio_max=0.0, pad_dense_frac=0.5, **kw)
        dense += [_response_pairs_rejected(t, m, tok.pad_id) > 0
                  for t, m in zip(b["tokens"], b["loss_mask"], strict=True)]
    assert 0.4 < np.mean(dense) < 0.6

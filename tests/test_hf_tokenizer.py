"""HFTokenizer and load_tokenizer on a tiny byte-level BPE tokenizer.json built in a temp dir."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest

from pipo_jax.io.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

tokenizers = pytest.importorskip("tokenizers")  # pipo_jax imports it only inside HFTokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
CORPUS = ["hello world", "the quick brown fox jumps over the lazy dog",
          "héllo wörld, 数学 is fun", "what is 12 + 30? the answer is 42."]
UNICODE_TEXT = "héllo wörld 数学 🙂 — naïve ∑ x²\n\ttabs and  spaces"


def _write_tokenizer(directory: Path, pad_token: str | None = "<|endoftext|>") -> Path:
    """A byte-level BPE with Qwen's chat specials, plus tokenizer_config.json; returns dir."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"pad_token": pad_token, "eos_token": "<|im_end|>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tokenizer(tmp_path_factory.mktemp("qwen_tok"))


@pytest.fixture(scope="module")
def tok(tok_dir: Path) -> HFTokenizer:
    return HFTokenizer.from_dir(tok_dir)


def test_protocol_and_ids(tok: HFTokenizer):
    assert isinstance(tok, Tokenizer)
    assert tok.bos_id is None
    assert tok.pad_id == tok.token_id("<|endoftext|>")
    assert tok.eos_id == tok.token_id("<|im_end|>")
    assert tok.pad_id != tok.eos_id
    assert tok.vocab_size == tok.tokenizer_vocab_size


def test_round_trip_unicode(tok: HFTokenizer):
    ids = tok.encode(UNICODE_TEXT)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == UNICODE_TEXT
    assert tok.encode("") == []


def test_specials_encode_to_single_ids(tok: HFTokenizer):
    for s in SPECIALS:
        assert tok.encode(s) == [tok.token_id(s)]
    ids = tok.encode("a<think>b</think>")
    assert tok.think_id in ids and tok.think_end_id in ids
    # no automatic BOS/EOS around plain text
    assert tok.eos_id not in tok.encode("hello")


def test_chat_prompt_layout(tok: HFTokenizer):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is 12 + 30?"},
                {"role": "assistant", "content": "42"},
                {"role": "user", "content": "héllo 数学"}]
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n"
            "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n"
            "<|im_start|>assistant\n42<|im_end|>\n"
            "<|im_start|>user\nhéllo 数学<|im_end|>\n"
            "<|im_start|>assistant\n")
    ids = tok.chat_prompt(messages)
    assert ids == tok.encode(text)
    assert ids[0] == tok.im_start_id and ids.count(tok.eos_id) == len(messages)
    assert tok.decode(ids, skip_special=False) == text


def test_think_prefix(tok: HFTokenizer):
    prefix = tok.think_prefix()
    assert prefix[0] == tok.think_id
    assert prefix == tok.encode("<think>\n")
    assert tok.decode(prefix, skip_special=False) == "<think>\n"


def test_decode_drops_pad_and_specials(tok: HFTokenizer):
    ids = (tok.encode("<|im_start|>assistant\n<think>\nx</think>42") + [tok.eos_id]
           + [tok.pad_id] * 3)
    assert tok.decode(ids) == "assistant\n\nx42"
    assert tok.decode(ids, skip_special=False) == (
        "<|im_start|>assistant\n<think>\nx</think>42<|im_end|>")  # PAD never shown


def test_decode_rejects_ids_outside_the_vocabulary(tok_dir: Path):
    big = HFTokenizer.from_dir(tok_dir, model_vocab_size=512)
    assert big.vocab_size == 512 and big.tokenizer_vocab_size < 512
    with pytest.raises(ValueError, match="outside"):
        big.decode([big.tokenizer_vocab_size])  # an embedding padding row
    with pytest.raises(ValueError, match="outside"):
        big.decode([-1])


def test_vocab_size_override(tok_dir: Path, tok: HFTokenizer):
    big = HFTokenizer.from_dir(tok_dir / "tokenizer.json", model_vocab_size=1024)
    assert big.vocab_size == 1024
    assert big.encode(UNICODE_TEXT) == tok.encode(UNICODE_TEXT)
    with pytest.raises(ValueError, match="smaller"):
        HFTokenizer.from_dir(tok_dir, model_vocab_size=tok.tokenizer_vocab_size - 1)


def test_pad_defaults_to_endoftext(tmp_path: Path):
    d = _write_tokenizer(tmp_path / "tok")
    (d / "tokenizer_config.json").unlink()
    t = HFTokenizer.from_dir(d)
    assert t.pad_id == t.token_id("<|endoftext|>")
    # an AddedToken-style dict names the pad token too
    (d / "tokenizer_config.json").write_text(json.dumps({"pad_token": {"content": "</think>"}}))
    assert HFTokenizer.from_dir(d).pad_id == t.token_id("</think>")


def test_pickles(tok: HFTokenizer):
    # grain may ship the tokenizer to worker processes
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode(UNICODE_TEXT) == tok.encode(UNICODE_TEXT)
    assert again.pad_id == tok.pad_id and again.eos_id == tok.eos_id


def test_unknown_role(tok: HFTokenizer):
    with pytest.raises(ValueError, match="role"):
        tok.chat_prompt([{"role": "tool", "content": "x"}])
    with pytest.raises(ValueError, match="content"):
        tok.chat_prompt([{"role": "user"}])


def test_missing_paths(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        HFTokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        HFTokenizer.from_dir(tmp_path)


def test_corrupt_json(tmp_path: Path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match="not valid JSON") as e:
        HFTokenizer.from_dir(tmp_path)
    assert str(tmp_path / "tokenizer.json") in str(e.value)
    (tmp_path / "tokenizer.json").write_text('{"a": 1}')  # JSON, but not a tokenizer
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json"):
        HFTokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_config(tmp_path: Path):
    d = _write_tokenizer(tmp_path / "tok")
    (d / "tokenizer_config.json").write_text("{pad_token: ")
    with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
        HFTokenizer.from_dir(d)


def test_pad_equal_to_eos_is_rejected(tmp_path: Path):
    d = _write_tokenizer(tmp_path / "tok", pad_token="<|im_end|>")
    with pytest.raises(ValueError, match="tokenizer_config.json") as e:
        HFTokenizer.from_dir(d)
    assert "stop generation" in str(e.value)


def test_missing_template_token(tmp_path: Path):
    d = _write_tokenizer(tmp_path / "tok", pad_token="<|nope|>")
    with pytest.raises(ValueError, match="no '<\\|nope\\|>' token"):
        HFTokenizer.from_dir(d)


def test_load_tokenizer_byte():
    t = load_tokenizer("byte")
    assert isinstance(t, ByteTokenizer)
    assert load_tokenizer("byte", model_vocab_size=t.vocab_size).vocab_size == t.vocab_size
    with pytest.raises(ValueError, match="byte tokenizer"):
        load_tokenizer("byte", model_vocab_size=t.vocab_size + 1)


def test_load_tokenizer_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    run_dir = tmp_path / "run"
    _write_tokenizer(run_dir / "tok")
    _write_tokenizer(tmp_path / "cwd" / "cwd_tok")
    monkeypatch.chdir(tmp_path / "cwd")
    t = load_tokenizer("tok", run_dir=run_dir, model_vocab_size=400)
    assert isinstance(t, HFTokenizer) and t.vocab_size == 400
    # not in the run dir: falls back to the cwd; a file path works too
    assert isinstance(load_tokenizer("cwd_tok", run_dir=run_dir), HFTokenizer)
    assert isinstance(load_tokenizer("cwd_tok/tokenizer.json"), HFTokenizer)
    assert isinstance(load_tokenizer(str(run_dir / "tok")), HFTokenizer)  # absolute
    with pytest.raises(FileNotFoundError, match="tried") as e:
        load_tokenizer("missing", run_dir=run_dir)
    assert str(run_dir / "missing") in str(e.value)
    assert str(tmp_path / "cwd" / "missing") in str(e.value)
    with pytest.raises(ValueError, match="empty"):
        load_tokenizer("")

"""The generated arithmetic task: determinism, split hygiene, lengths and the verifier."""

from __future__ import annotations

import re

import numpy as np
import pytest

from pipo_jax.data import arith, mixed
from pipo_jax.data.loader import example_to_ids
from pipo_jax.eval.scoring import last_boxed, verify
from pipo_jax.io.tokenizer import ByteTokenizer, response_ids

LINE = re.compile(r"(\d)\+(\d)\+([01])=(\d+), write (\d), carry ([01])")


def _operands(question: str) -> tuple[int, int]:
    m = re.fullmatch(r"What is (\d+) \+ (\d+)\?", question)
    assert m, question
    return int(m.group(1)), int(m.group(2))


def test_generate_split_is_deterministic() -> None:
    a = arith.generate_split("train", seed=3, n=60, levels=(2, 3, 4))
    b = arith.generate_split("train", seed=3, n=60, levels=(2, 3, 4))
    c = arith.generate_split("train", seed=4, n=60, levels=(2, 3, 4))
    assert a == b
    assert a != c
    assert [e["level"] for e in a[:6]] == [2, 3, 4, 2, 3, 4]


def test_make_problem_fields() -> None:
    p = arith.make_problem(np.random.default_rng(0), 3)
    assert set(p) == {"question", "response", "answer", "level"}
    a, b = _operands(p["question"])
    assert 100 <= a <= 999 and 100 <= b <= 999
    assert p["answer"] == str(a + b) and p["level"] == 3
    assert p["response"].endswith(f"\\boxed{{{a + b}}}")
    with pytest.raises(ValueError):
        arith.make_problem(np.random.default_rng(0), 0)
    with pytest.raises(ValueError):
        arith.generate_split("valid", 0, 1, (2,))


@pytest.mark.parametrize("seeds", [(0, 0), (0, 1)])
def test_train_and_test_are_disjoint(seeds: tuple[int, int]) -> None:
    levels = (2, 3)
    train = arith.generate_split("train", seeds[0], 3000, levels)
    test = arith.generate_split("test", seeds[1], 300, levels)

    def keys(split: list[dict]) -> set[tuple[int, int]]:
        # Unordered: a + b in train would leak b + a in test.
        return {tuple(sorted(_operands(e["question"]))) for e in split}

    assert not keys(train) & keys(test)
    assert all(arith.split_of(*_operands(e["question"])) == "test" for e in test)


def test_no_duplicates_within_a_split() -> None:
    for split, n in (("train", 2000), ("test", 200)):
        questions = [e["question"] for e in arith.generate_split(split, 0, n, (2, 3))]
        assert len(set(questions)) == n


def test_every_level_has_test_problems() -> None:
    for level in range(1, 13):
        (p,) = arith.generate_split("test", 0, 1, (level,))
        assert p["level"] == level


@pytest.mark.parametrize("level", [2, 3, 4, 5, 6])
def test_response_length_range(level: int) -> None:
    tok = ByteTokenizer()
    # What is trained on: the text, with its </think> one token.
    lengths = [len(response_ids(tok, e["response"]))
               for e in arith.generate_split("train", 0, 200, (level,))]
    assert min(lengths) >= 60 and max(lengths) <= 300, (level, min(lengths), max(lengths))


@pytest.mark.parametrize("level", [1, 2, 4, 6, 9])
def test_worked_solution_arithmetic(level: int) -> None:
    for ex in arith.generate_split("train", 1, 100, (level,)):
        a, b = _operands(ex["question"])
        lines = ex["response"].split("\n")
        assert lines[0] == f"Add {a} and {b} column by column."
        column_lines = lines[1:1 + level]
        carry, written = 0, []
        for i, line in enumerate(column_lines):
            m = LINE.fullmatch(line)
            assert m, line
            x, y, c, s, w, out = (int(g) for g in m.groups())
            assert (x, y) == (a // 10**i % 10, b // 10**i % 10)
            assert c == carry and s == x + y + c and w == s % 10 and out == s // 10
            carry = out
            written.append(str(w))
        assert lines[1 + level] == f"final carry {carry}"
        total = int(("1" if carry else "") + "".join(reversed(written)))
        assert total == a + b and ex["answer"] == str(a + b)
        assert lines[2 + level:] == [f"So the sum is {a + b}.", "</think>", f"\\boxed{{{a + b}}}"]
        assert verify(ex["response"], ex["answer"])


def test_extract_boxed() -> None:
    """The one verifier (``pipo_jax.eval.scoring``) on the embedded task's answers."""
    assert last_boxed("so \\boxed{132}") == "132"
    assert last_boxed("\\boxed{1} then \\boxed{2}") == "2"
    assert last_boxed("\\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{{a}{b{c}}}") == "{a}{b{c}}"
    assert last_boxed("no answer here") is None
    assert last_boxed("\\boxed{12") is None
    assert last_boxed("\\boxed{1} and \\boxed{2{3}") is None
    assert last_boxed("\\boxed{}") == ""


def test_verify() -> None:
    assert verify("...</think>\n\\boxed{132}", "132")
    assert verify("\\boxed{ 1,320 }", "1320")
    assert verify("\\boxed{0132}", "132")
    assert verify("\\boxed{+132}", "132")
    assert not verify("\\boxed{133}", "132")
    assert not verify("\\boxed{132} no wait \\boxed{133}", "132")
    assert not verify("the sum is 132", "132")
    assert not verify("\\boxed{}", "132")
    assert not verify("\\boxed{13 2x}", "132")


def test_to_messages() -> None:
    ex = arith.make_problem(np.random.default_rng(1), 2)
    msgs = arith.to_messages(ex)
    assert msgs == [{"role": "system", "content": arith.SYSTEM_PROMPT},
                    {"role": "user", "content": ex["question"]}]


def _old_encode(tok: ByteTokenizer, text: str) -> list[int]:
    """ByteTokenizer.encode before issue #19: special-token strings became their ids."""
    split = re.compile("(" + "|".join(re.escape(s) for s in tok.SPECIALS) + ")")
    ids: list[int] = []
    for piece in filter(None, split.split(text)):
        if piece in tok.SPECIALS:
            ids.append(tok.token_id(piece))
        else:
            ids.extend(tok.N_SPECIAL + b for b in piece.encode("utf-8"))
    return ids


def _old_example_ids(tok: ByteTokenizer, ex: dict) -> tuple[list[int], list[int]]:
    """The old ids of an arithmetic example: template, content and response all encoded with
    specials recognised."""
    prompt = [tok.bos_id]
    for m in arith.to_messages(ex):
        prompt += [tok.token_id(f"<|{m['role']}|>"), *_old_encode(tok, m["content"]), tok.end_id]
    prompt += [tok.token_id("<|assistant|>"), *_old_encode(tok, "<think>\n")]
    return prompt, _old_encode(tok, ex["response"]) + [tok.eos_id]


def test_embedded_task_ids_unchanged_by_text_encoding() -> None:
    # Encoding text as text changes no id of the embedded default: its only control string is
    # the response's </think>, which response_ids keeps as the control id.
    tok = ByteTokenizer()
    examples = [*arith.generate_split("train", 0, 40, (1, 2, 3, 4, 6)),
                *arith.generate_split("test", 1, 10, (2, 5)),
                *mixed.generate_split("train", 0, 40, (1, 2, 3), mixed.OPS),
                *mixed.generate_split("test", 1, 10, (2, 4), mixed.OPS)]
    for ex in examples:
        assert example_to_ids(tok, ex) == _old_example_ids(tok, ex), ex["question"]
        assert example_to_ids(tok, ex)[1].count(tok.think_end_id) == 1

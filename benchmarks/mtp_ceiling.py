"""The Bayes ceiling of the MTP head's top-1 accuracy on the mixed task (issue #13's band).

    python -m benchmarks.mtp_ceiling [--num-problems 400] [--ops add]

The wording of every line of a worked solution is drawn uniformly from its phrasings
(``mixed.PHRASINGS``), and everything else is a function of the problem. The best any predictor
can do at a character, knowing the problem and the line so far, is to name the most common next
character among the phrasings still consistent with that prefix: it is right with probability
``max count / consistent`` (measured here on drawn lines, as a model's top-1 is). Averaged over
the MTP target positions of the pair sequence (the odd positions of the response: the prompt is
parity-padded to an even length), that is the ceiling a perfect MTP head reaches
teacher-forced; a measured top-1 close to it means the head is as unsure as the task, and no
more. Computed for the current task and for richer wordings, it says how much more wording
entropy a top-1 band (e.g. 0.80–0.95) would need.
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

import numpy as np

from benchmarks.common import table, write
from pipo_jax.config import MIXED_OPS
from pipo_jax.data import mixed


def line_ceiling(options: list[str], line: str) -> list[float]:
    """For each character of ``line + "\\n"``: the probability that the best guess from the
    phrasings ``options`` consistent with the prefix before it is that character (the most
    common next character, ties broken at random). Its mean over random draws of the line is
    the Bayes accuracy ``max count / consistent``."""
    full = [o + "\n" for o in options]
    target = line + "\n"
    if target not in full:
        raise ValueError(f"{line!r} is not one of the phrasings")
    out = []
    for k, ch in enumerate(target):
        nxt = Counter(o[k] for o in full if o.startswith(target[:k]) and len(o) > k)
        top = max(nxt.values())
        best = [c for c, n in nxt.items() if n == top]
        out.append(1.0 / len(best) if ch in best else 0.0)
    return out


def response_ceiling(op: str, a: int, b: int, seed: int = 0) -> np.ndarray:
    """Per response character of ``mixed.worked_solution(op, a, b, seed)``: the Bayes top-1
    probability (1 at characters the problem alone determines)."""
    response, answer = mixed.worked_solution(op, a, b, seed)
    forms = mixed.PHRASINGS[op]
    cols, carry = mixed._columns(op, a, b)
    kinds: list[tuple[str, dict[str, int]]] = [("open", {})]
    kinds += [("column", c) for c in cols]
    if "carry" in forms:
        kinds.append(("carry", {"o": carry}))
    kinds.append(("result", {"n": int(answer)}))
    lines = response.split("\n")
    probs: list[float] = []
    for (kind, fields), line in zip(kinds, lines, strict=False):
        probs += line_ceiling([t.format(a=a, b=b, **fields) for t in forms[kind]], line)
    probs += [1.0] * (len(response) - len(probs))  # "</think>" and the boxed answer
    return np.asarray(probs[:len(response)])


def ceiling(num_problems: int, ops: tuple[str, ...], levels: tuple[int, ...] = (2, 3),
            seed: int = 0) -> dict[str, float]:
    """The MTP-position (odd) and backbone-position (even) ceilings over random problems."""
    rng = np.random.default_rng(seed)
    odd, even = [], []
    for i in range(num_problems):
        p = mixed.make_problem(rng, levels[i % len(levels)], ops, seed)
        probs = response_ceiling(*mixed.parse_question(p["question"]), seed)
        odd.append(probs[1::2])
        even.append(probs[0::2])
    return {"mtp_ceiling": float(np.concatenate(odd).mean()),
            "backbone_ceiling": float(np.concatenate(even).mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-problems", type=int, default=400)
    p.add_argument("--ops", default="add", help=f"comma-separated, of {MIXED_OPS}")
    p.add_argument("--out", help="JSON path (default benchmarks/results/mtp_ceiling.json)")
    args = p.parse_args()
    ops = tuple(args.ops.split(","))
    for op in ops:
        if op not in MIXED_OPS:
            raise SystemExit(f"--ops: unknown operation {op!r}; choose from {MIXED_OPS}")
    rows: list[dict[str, Any]] = [{"ops": op, **ceiling(args.num_problems, (op,))} for op in ops]
    print(table(rows, [("ops", "s"), ("mtp_ceiling", ".4f"),
                       ("backbone_ceiling", ".4f")]))
    path = write("mtp_ceiling", {"num_problems": args.num_problems, "rows": rows}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

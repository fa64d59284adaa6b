"""One aggregation of sampled answers, for the held-out split and benchmark files alike: accuracy
(avg@k, unbiased pass@k) and the decode statistics of every sample."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def aggregate(num_correct: Sequence[int], samples: int,
              stats: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Metrics of questions answered ``samples`` times each.

    ``num_correct[i]``: how many samples of question ``i`` were right; ``stats``: every
    sample's decode statistics (``Generation.stats``: tokens, backbone_passes, drafts, commits,
    finished). Returns ``avg@k`` (mean accuracy over samples, i.e. pass@1), ``pass@k``
    (``k = samples``), ``mean_tokens`` (real tokens per sample), ``commit_rate`` (committed
    drafts / drafts), ``tokens_per_pass`` (real tokens per backbone pass) and
    ``finished_rate`` (samples that ended with EOS).
    """
    if not num_correct or not stats:
        raise ValueError("nothing to aggregate")
    k = samples
    tokens = sum(s["tokens"] for s in stats)
    drafts = sum(s["drafts"] for s in stats)
    return {
        f"avg@{k}": statistics.fmean(c / k for c in num_correct),
        f"pass@{k}": statistics.fmean(pass_at_k(k, c, k) for c in num_correct),
        "mean_tokens": tokens / len(stats),
        "commit_rate": sum(s["commits"] for s in stats) / drafts if drafts else 0.0,
        "tokens_per_pass": tokens / max(sum(s["backbone_passes"] for s in stats), 1),
        "finished_rate": statistics.fmean(bool(s["finished"]) for s in stats),
    }

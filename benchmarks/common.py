"""Helpers shared by the benchmarks: output files and plain-text tables."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import jax

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict[str, Any]:
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()], "machine": platform.machine(),
            "python": platform.python_version()}


def _cell(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """Formats ``rows`` with ``columns`` = [(key, format spec)] as a fixed-width table."""
    widths = [max(18, len(k) + 2) for k, _ in columns]  # a long name never runs into the next
    head = "".join(f"{k:>{w}}" for (k, _), w in zip(columns, widths, strict=True))
    body = ["".join(f"{_cell(r.get(k), f):>{w}}" for (k, f), w in zip(columns, widths, strict=True))
            for r in rows]
    return "\n".join([head, *body])


def write(name: str, payload: dict[str, Any], out: str | None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    return path


def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the file-only Agg backend, or None (with a note) when matplotlib
    (a dev dependency) is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -r requirements-dev.txt)")
        return None
    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Lays out ``fig`` and writes it to ``path`` (parents made) as a 120-dpi PNG."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def set_blas_threads(n: int) -> None:
    """Sets OpenBLAS's thread count (scipy's OpenBLAS, loaded by transformers): its own thread
    pool competes with torch's and XLA's for a small machine's cores. Must run before the
    library is first loaded."""
    if "scipy.linalg" in sys.modules:
        raise RuntimeError("scipy.linalg is already loaded: --blas-threads would not apply")
    os.environ["OPENBLAS_NUM_THREADS"] = str(n)

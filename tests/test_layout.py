"""The package layout's promises: no import cycles, and inference loading that imports no
training, data-building or metrics code (``import pipo_jax`` itself imports nothing)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pipo_jax"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The package modules ``path`` imports (anywhere in the file, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in modules}
    return found


def test_the_package_has_no_import_cycle():
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {m: _imports(p, set(files)) - {m} for m, p in files.items()}
    # A package's __init__ that hands names on imports its children; the child importing its
    # package (``from pipo_jax.config import X`` inside pipo_jax.config.*) is not a cycle.
    for m in graph:
        graph[m] = {d for d in graph[m] if not m.startswith(d + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert len(graph) > 30  # the walk saw the whole package


_PROBE = """
import json, sys
{code}
heavy = ["optax", "tensorflow_datasets", "grain", "tensorboardX", "torch", "tensorflow"]
print(json.dumps({{"heavy": [h for h in heavy if h in sys.modules],
                   "pipo": sorted(m for m in sys.modules if m.startswith("pipo_jax"))}}))
"""


def _probe(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE.format(code=code)], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def test_import_pipo_jax_is_lazy_and_loading_imports_no_training_code():
    bare = _probe("import pipo_jax, pipo_jax.config")
    assert bare["heavy"] == [] and "pipo_jax.decode.runner" not in bare["pipo"], bare
    # Everything pipo_jax.load, decode.py's runner and the converters need at module level.
    loading = _probe("import pipo_jax; pipo_jax.load; import pipo_jax.io.hf.convert")
    assert loading["heavy"] == [], loading
    assert not [m for m in loading["pipo"] if m.startswith(("pipo_jax.train", "pipo_jax.eval.h"))
                or m in ("pipo_jax.data.loader", "pipo_jax.data.tfds_builder")], loading
    assert "pipo_jax.decode.runner" in loading["pipo"]

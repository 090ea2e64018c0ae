"""The package layers of docs/architecture.md, enforced on the import graph of ``gdsd_jax/``.

Every import (at module top or inside a function) of one ``gdsd_jax`` unit (a sub-package or a top-level
module) by another must be allowed by :data:`ALLOWED`; the table itself is acyclic, so the packages are; no
module imports another module's leading-underscore name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gdsd_jax"

#: unit -> the units it may import (docs/architecture.md draws the same table). A unit is a sub-package of
#: ``gdsd_jax`` or one of its top-level modules; ``gdsd_jax`` itself is the package's ``__init__``.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "config_io": {"errors"},
    "allocator": {"errors"},
    "compile_cache": set(),
    "distributed": set(),
    "data": set(),
    "models": {"distributed"},
    "tasks": {"errors", "data", "models"},
    "sampling": {"config_io", "models", "distributed"},
    "objectives": {"config_io", "models", "distributed"},
    "checkpoint": {"errors", "models", "distributed"},
    "convert": {"checkpoint", "models"},
    "loading": {"checkpoint", "convert", "models"},
    "training": {"config_io", "distributed", "models", "data", "tasks", "sampling", "objectives", "checkpoint",
                 "loading"},
    "sft": {"config_io", "distributed", "models", "checkpoint", "training"},
    "rl": {"errors", "config_io", "allocator", "distributed", "models", "data", "tasks", "sampling", "objectives",
           "checkpoint", "convert", "loading", "training", "sft"},
    "experiments": {"errors", "config_io", "allocator", "distributed", "models", "data", "tasks", "sampling",
                    "objectives", "checkpoint", "convert", "loading", "training", "sft", "rl"},
    "commands": {"gdsd_jax", "errors", "config_io", "allocator", "distributed", "models", "data", "tasks", "sampling",
                 "objectives", "checkpoint", "convert", "loading", "training", "sft", "rl", "experiments"},
    "cli": {"errors", "allocator", "compile_cache", "commands"},
    "gdsd_jax": {"loading"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "gdsd_jax"


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, imported module, imported names)`` of every absolute ``gdsd_jax`` import in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "gdsd_jax"]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import (the package uses absolute ones)"
            if node.module and node.module.split(".")[0] == "gdsd_jax":
                out.append((node.lineno, node.module, [a.name for a in node.names]))
    return out


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_module(name: str) -> bool:
    return name in MODULES


def test_every_unit_has_a_row():
    units = {_unit(m) for m in MODULES}
    assert units == set(ALLOWED), (f"units without a row in ALLOWED: {sorted(units - set(ALLOWED))}; "
                                   f"rows without a unit: {sorted(set(ALLOWED) - units)}")


def test_the_layer_table_has_no_cycle():
    state: dict[str, int] = {}

    def visit(unit: str, trail: list[str]) -> None:
        if state.get(unit) == 1:
            raise AssertionError(f"cycle in ALLOWED: {' -> '.join(trail + [unit])}")
        if state.get(unit) == 2:
            return
        state[unit] = 1
        for dep in sorted(ALLOWED[unit]):
            visit(dep, trail + [unit])
        state[unit] = 2

    for unit in sorted(ALLOWED):
        visit(unit, [])


def test_imports_follow_the_layers():
    bad = []
    for module, path in MODULES.items():
        unit = _unit(module)
        for line, imported, _ in _imports(path):
            target = _unit(imported)
            if target != unit and target not in ALLOWED[unit]:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {unit} imports {imported} ({target})")
    assert not bad, "imports against docs/architecture.md:\n" + "\n".join(bad)


def test_no_module_uses_another_modules_private_names():
    bad = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        aliases = {}                                          # local name -> gdsd_jax module it is bound to
        for line, imported, names in _imports(path):
            if imported == module:
                continue
            for name in names:
                if name.startswith("_") and not name.startswith("__"):
                    bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: imports {imported}.{name}")
                if _is_module(f"{imported}.{name}"):
                    aliases[name] = f"{imported}.{name}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname and _is_module(a.name):
                        aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gdsd_jax"):
                for a in node.names:
                    if a.asname and _is_module(f"{node.module}.{a.name}"):
                        aliases[a.asname] = f"{node.module}.{a.name}"
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and aliases[node.value.id] != module and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: uses "
                           f"{aliases[node.value.id]}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


#: Leading-underscore attributes that are public API where they live: ``os._exit`` (exit without the
#: interpreter's teardown, documented by the standard library).
PUBLIC_UNDERSCORE = {"os._exit"}


def _own_private_names(tree: ast.AST) -> set[str]:
    """Leading-underscore names a module defines itself: functions, classes, assigned attributes and names,
    keyword arguments it passes (``parser.set_defaults(_run=...)``)."""
    own = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            own.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            own.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            own.add(node.id)
        elif isinstance(node, ast.keyword) and node.arg:
            own.add(node.arg)
    return {n for n in own if n.startswith("_")}


def private_attribute_reads(path: Path) -> list[str]:
    """``X._name`` reads in ``path`` where ``X`` is not ``self`` / ``cls`` and ``_name`` is not one the module
    defines itself: a reach into another module's object (``trainer._update``, ``module._helper``)."""
    tree = ast.parse(path.read_text(), str(path))
    own = _own_private_names(tree)
    bad = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        if node.attr in own or ast.unparse(node) in PUBLIC_UNDERSCORE:
            continue
        bad.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return bad


def test_no_module_reads_another_objects_private_attributes():
    """Outside the tests, nothing reads a leading-underscore attribute of an object it did not define (the
    trainer's step functions, say, are public: :mod:`gdsd_jax.rl.step`)."""
    files = [*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "benchmarks").rglob("*.py")]
    bad = [line for path in sorted(files) for line in private_attribute_reads(path)]
    assert not bad, "private attributes read across modules:\n" + "\n".join(bad)


def test_the_private_attribute_check_catches_a_reach_into_the_trainer(tmp_path):
    """The old planner's call of the trainer's private step function is caught; the module's own private
    attributes and ``self._x`` are not."""
    src = tmp_path / "planner.py"
    src.write_text("class A:\n    def f(self):\n        self._x = 1\n        return self._x\n\n"
                   "def plan(tr, a):\n    return tr._update, a._x\n")
    assert [line.split(": ", 1)[1] for line in private_attribute_reads(src)] == ["tr._update"]


@pytest.mark.parametrize("bad_edge", [("models", "gdsd_jax.checkpoint.params_io"),
                                      ("data", "gdsd_jax.tasks.base"), ("sampling", "gdsd_jax.rl.trainer")])
def test_the_check_catches_an_upward_import(bad_edge):
    """The rule the layer test applies rejects the edges that used to form cycles."""
    unit, imported = bad_edge
    assert _unit(imported) not in ALLOWED[unit]

"""The package's import graph points one way (docs/architecture.md), checked on the source with `ast`.

Units are the top-level modules and subpackages of `modsquad`; each sits in one layer, and a module may import
only from its own unit or from a lower layer. Units that share a layer (train and extract) may not import each
other. Imports of modsquad modules inside functions (which is how import cycles hide) are allowed only where
listed below, each with its reason; third-party imports inside functions (plotting, optional backends) are left
to the modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import modsquad

PACKAGE = Path(modsquad.__file__).parent

#: bottom to top; units in one tuple share a layer and must not import each other
LAYERS = [
    ("core",),
    ("moe",),
    ("tasks",),
    ("models",),
    ("data",),
    ("config", "checkpoint"),
    ("run",),
    ("evaluate",),
    ("train", "extract"),
    ("bench",),
    ("demo", "predict", "__init__"),
    ("cli",),
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}

#: (importing module, imported module) -> why the import is inside a function
LOCAL_IMPORTS = {
    ("modsquad", "modsquad.models.registry"): "`import modsquad` stays light (no torch) for the CLI and tools",
    ("modsquad", "modsquad.extract.extracted"): "`import modsquad` stays light (no torch) for the CLI and tools",
    ("modsquad", "modsquad.checkpoint"): "`import modsquad` stays light (no torch) for the CLI and tools",
    ("modsquad.cli", "*"): "`modsquad --help` and every command start in 0.2 s instead of ~7 s: each command "
                           "imports the library it runs",
    ("modsquad.data", "*"): "lazy exports: synthetic render workers do not pay for torch and albumentations",
}


def _module_name(path: Path) -> str:
    parts = ["modsquad", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path):
    """(imported module, line, is_local) of every import in the file, relative imports resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    local_nodes = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            # `from . import x` / `from ..tasks import losses`: the submodule when it is one
            names = []
            for alias in node.names:
                sub = f"{name}.{alias.name}"
                names.append(sub if _is_module(sub) else name)
        else:
            continue
        for name in names:
            yield name, node.lineno, id(node) in local_nodes


def _is_module(name: str) -> bool:
    if not name.startswith("modsquad"):
        return False
    rel = Path(*name.split(".")[1:]) if "." in name else Path()
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _all_files():
    return sorted(PACKAGE.rglob("*.py"))


def test_every_unit_has_a_layer():
    units = {_unit(_module_name(p)) for p in _all_files()}
    assert units <= set(RANK), f"give these a layer in tests/test_layering.py: {sorted(units - set(RANK))}"


def test_imports_point_down():
    bad = []
    for path in _all_files():
        module = _module_name(path)
        me = _unit(module)
        for name, line, _ in _imports(path):
            if not name.startswith("modsquad"):
                continue
            other = _unit(name)
            if other == me:
                continue
            if RANK[other] > RANK[me]:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {me} imports {name} from a higher layer")
            elif RANK[other] == RANK[me]:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {me} imports {name} from its own layer")
    assert not bad, "\n".join(bad)


def test_no_cycles_between_units():
    edges: dict[str, set[str]] = {}
    for path in _all_files():
        me = _unit(_module_name(path))
        for name, _, _ in _imports(path):
            if name.startswith("modsquad") and _unit(name) != me:
                edges.setdefault(me, set()).add(_unit(name))

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(u for u in edges if u in reach(u))
    assert not cycles, f"import cycles through: {cycles}"


def test_function_local_imports_have_a_reason():
    bad = []
    for path in _all_files():
        module = _module_name(path)
        for name, line, local in _imports(path):
            if local and name.startswith("modsquad") and (module, name) not in LOCAL_IMPORTS and (module, "*") not in LOCAL_IMPORTS:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line}: import of {name} inside a function")
    assert not bad, "move these to the top of the module, or list them with a reason:\n" + "\n".join(bad)

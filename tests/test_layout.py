"""The packages depend one way (docs/architecture.md, "Layers"), checked on the source (imports in functions too).

``smap`` never imports ``sharding``; ``sharding`` uses only smap's public
names; the modules' imports form no circle, and no module imports one of a
higher layer.
"""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent

# From the bottom up; a module may import its own layer and the ones below.
LAYERS = [
    ("smap._compat", "smap._locks", "smap._aot", "smap._interpret"),
    ("smap._state", "smap._annotations"),
    ("smap._refs", "smap.filter", "smap.nn", "smap.random", "smap.privacy", "smap._tracing"),
    ("smap._dispatch",),
    ("smap.transform", "smap.transform._lane_norms"),
    ("smap.devices",),
    ("smap.checkpoint",),
    ("smap",),
    ("sharding",),
]


def _modules() -> dict[str, pathlib.Path]:
    found = {}
    for package in ("smap", "sharding"):
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: pathlib.Path) -> list[tuple[str, tuple[str, ...], int]]:
    """(module, names taken from it, line) for every import statement of the file, at any depth."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.extend((alias.name, (), node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            found.append((base, tuple(alias.name for alias in node.names), node.lineno))
    return found


def _edges(name: str, path: pathlib.Path) -> set[str]:
    """The project modules that ``name`` imports (``from pkg import mod`` is an edge to ``pkg.mod``)."""
    edges = set()
    for module, names, _ in _imports(name, path):
        if module not in MODULES:
            continue
        submodules = [f"{module}.{n}" for n in names if f"{module}.{n}" in MODULES]
        edges.update(submodules)
        if len(submodules) < len(names) or not names:
            edges.add(module)
    edges.discard(name)
    return edges


def _layer(name: str) -> int:
    matches = [
        (len(prefix), i)
        for i, layer in enumerate(LAYERS)
        for prefix in layer
        if name == prefix or name.startswith(prefix + ".")
    ]
    assert matches, f"{name} is in no layer of LAYERS"
    return max(matches)[1]


def test_smap_never_imports_sharding():
    offenders = [
        f"{path.relative_to(ROOT)}:{line}: {module}"
        for name, path in MODULES.items()
        if name.split(".")[0] == "smap"
        for module, _, line in _imports(name, path)
        if module.split(".")[0] == "sharding"
    ]
    doctests = [
        f"{path.relative_to(ROOT)}: {line.strip()}"
        for name, path in MODULES.items()
        if name.split(".")[0] == "smap"
        for line in path.read_text().splitlines()
        if re.search(r">>>.*\bimport\b.*(?<![.\w])sharding\b", line)
    ]
    assert offenders == [] and doctests == []


def test_no_private_name_crosses_between_the_packages():
    offenders = []
    for name, path in MODULES.items():
        top = name.split(".")[0]
        other = {"smap": "sharding", "sharding": "smap"}[top]
        for module, names, line in _imports(name, path):
            parts = module.split(".")
            if parts[0] == other and any(p.startswith("_") for p in parts[1:] + list(names)):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {module} {names}")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                root = node.value
                while isinstance(root, ast.Attribute):
                    root = root.value
                if isinstance(root, ast.Name) and root.id == other:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


def test_no_import_runs_up_a_layer():
    upward = [
        f"{name} ({LAYERS[_layer(name)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
        for name, path in MODULES.items()
        for target in _edges(name, path)
        if _layer(target) > _layer(name)
    ]
    assert upward == []


def test_the_imports_form_no_circle():
    graph = {name: _edges(name, path) for name, path in MODULES.items()}
    done: set[str] = set()

    def circle_from(name: str, stack: list[str]) -> list[str] | None:
        if name in stack:
            return stack[stack.index(name) :] + [name]
        if name in done:
            return None
        for target in sorted(graph[name]):
            found = circle_from(target, [*stack, name])
            if found:
                return found
        done.add(name)
        return None

    circles = [c for c in (circle_from(name, []) for name in sorted(graph)) if c]
    assert circles == []


def test_the_checks_see_the_imports():
    # The rules above hold because the graph is right, not because it is empty.
    assert "smap.transform._adapters" in _edges("smap.transform._mapping", MODULES["smap.transform._mapping"])
    assert "smap.transform._lane_norms" in _edges("smap.transform._fuse", MODULES["smap.transform._fuse"])
    assert "smap.devices" in _edges("sharding", MODULES["sharding"])
    assert "smap" in _edges("sharding._placement", MODULES["sharding._placement"])
    assert _layer("smap.transform._spanning") == 4 and _layer("sharding._mesh") == 8

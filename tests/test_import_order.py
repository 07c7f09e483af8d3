"""The packages' order, read from the source: every module under kgen/ is parsed with `ast` and each of its imports
of kgen (at the top or inside a function, both count) is checked against the floors

    errors, protocol, scratch  <  arch  <  build  <  machine  <  guest  <  harness  <  inspect  <  debug  <  cli

A module may import its own floor and the floors below it, never one above; and no import cycle may run through
two modules (within a package or across packages). The data flows one way (docs/design.md, "Where things are"), so an
import against that flow is a design error even when Python happens to resolve it.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kgen

PACKAGE = Path(kgen.__file__).resolve().parent
FLOORS = (("errors", "protocol", "scratch"), ("arch",), ("build",), ("machine",), ("guest",), ("harness",), ("inspect",),
          ("debug",), ("cli",))
FLOOR_OF = {name: level for level, names in enumerate(FLOORS) for name in names}

# Known and owned elsewhere; each entry goes when its owner's change lands, and a new one needs a reason here.
ALLOWED_UPWARD: set[tuple[str, str]] = set()


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The kgen modules `name` imports anywhere in its source: `from kgen.x import y` is the module kgen.x.y when
    that is a module, else kgen.x."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {target for target in found if target.split(".")[0] == "kgen" and target != "kgen"}


def floor(module: str) -> str | None:
    """The floor a module belongs to: its package under kgen (kgen.guest.diagnose -> guest), or for a module
    directly in kgen its own name (kgen.errors -> errors); None for kgen/__init__.py."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    found = modules(root)
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for importer, targets in graph.items():
        for target in targets:
            low, high = floor(importer), floor(target)
            if low is None or high is None:
                continue
            if low not in FLOOR_OF or high not in FLOOR_OF:
                bad.append(f"{importer} imports {target}: give `{low if low not in FLOOR_OF else high}` a floor "
                           "in FLOORS")
            elif FLOOR_OF[high] > FLOOR_OF[low] and not any(
                    importer.startswith(a) and target.startswith(b) for a, b in ALLOWED_UPWARD):
                bad.append(f"{importer} ({low}) imports {target} ({high}), a higher floor")
    return sorted(bad)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected set of more than one node (Tarjan), each as a sorted list; edges ALLOWED_UPWARD
    names are left out."""
    edges = {a: {b for b in targets if b in graph and not any(a.startswith(x) and b.startswith(y)
                                                                 for x, y in ALLOWED_UPWARD)}
             for a, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    packages: dict[str, set[str]] = {}
    for importer, targets in graph.items():
        if floor(importer) is None:
            continue
        packages.setdefault(floor(importer), set()).update(
            floor(t) for t in targets if floor(t) not in (None, floor(importer))
            and not any(importer.startswith(a) and t.startswith(b) for a, b in ALLOWED_UPWARD))
    return packages


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_package_has_a_floor(graph):
    assert {floor(m) for m in graph} - {None} <= set(FLOOR_OF)


def test_no_module_imports_a_higher_floor(graph):
    assert upward_imports(graph) == []


def test_no_import_cycle_between_packages(graph):
    assert cycles(package_graph(graph)) == []


def test_no_import_cycle_between_modules(graph):
    assert cycles(graph) == []


def test_the_checks_see_a_bad_import(tmp_path):
    """The checks go red on the kinds of import they forbid: a lower floor importing a higher one (inside a
    function, where the old imports hid), and two modules importing each other."""
    root = tmp_path / "kgen"
    for package in ("build", "guest"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "build" / "layout.py").write_text("def f():\n    from kgen.guest import diagnose\n")
    (root / "guest" / "diagnose.py").write_text("from kgen.guest.faultloop import probe\n")
    (root / "guest" / "faultloop.py").write_text("import kgen.guest.diagnose\n")
    found = modules(root)
    graph = {name: imports_of(name, path, set(found)) for name, path in found.items()}
    assert upward_imports(graph) == ["kgen.build.layout (build) imports kgen.guest.diagnose (guest), a higher floor"]
    assert cycles(graph) == [["kgen.guest.diagnose", "kgen.guest.faultloop"]]
    graph["kgen.guest.diagnose"].add("kgen.build.layout")
    assert cycles(package_graph(graph)) == [["build", "guest"]]

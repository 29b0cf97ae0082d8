"""The package's import graph has no cycle: module-level and function-level imports alike."""
import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "emphy_dask"


def import_graph(package: Path) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}``, read from the source (imports inside
    functions count: they cycle at run time just the same). Imports of a module's own parent
    packages (``from . import __version__``) are left out: Python resolves them without a cycle."""
    mods = {}
    for f in package.rglob("*.py"):
        parts = list(f.relative_to(package.parent).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph = {}
    for name, f in mods.items():
        targets = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = name.split(".")
                if node.level:
                    base = base[: len(base) - node.level + (f.name == "__init__.py")]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                cands = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            else:
                continue
            for c in cands:
                while c and c not in mods:
                    c = c.rpartition(".")[0]
                if c and c != name and not name.startswith(c + "."):
                    targets.add(c)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as exc:
        return exc.args[1]
    return None


def test_no_import_cycle_in_the_package():
    graph = import_graph(PACKAGE)
    assert len(graph) > 50 and graph["emphy_dask.local"] >= {"emphy_dask.pipeline", "emphy_dask.device_stages"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_layers_stay_apart():
    """The scan state is a leaf under both halves of a scan; the driver-side models never read job settings."""
    graph = import_graph(PACKAGE)
    assert "emphy_dask.pipeline" not in graph["emphy_dask.device_stages"]
    assert "emphy_dask.device_stages" not in graph["emphy_dask.pipeline"]
    assert graph["emphy_dask.scan_state"] <= {"emphy_dask.errors", "emphy_dask.volume"}
    assert not any(t.startswith("emphy_dask.job") for m, ts in graph.items() if m.startswith("emphy_dask.models")
                   for t in ts)


@pytest.mark.parametrize("inside_function", [False, True])
def test_a_cycle_is_found_even_through_an_import_inside_a_function(tmp_path, inside_function):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import g\n")
    (pkg / "a.py").write_text("from .sub.b import g\n")
    body = "def f():\n    from ..a import x\n" if inside_function else "from .. import a\n"
    (pkg / "sub" / "b.py").write_text(body + "def g():\n    pass\n")
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None and set(cycle) == {"pkg.a", "pkg.sub.b"}

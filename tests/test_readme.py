"""The README is a true front door: short, its links resolve, its stage table names real modules and functions."""
import importlib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def test_readme_is_short_and_its_links_resolve():
    assert len(README.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if not link.startswith(("http://", "https://"))]
    assert "docs/tables.md" in local and all((REPO / link).exists() for link in local), local


def _stage_rows():
    """(module paths, entry-point names) of each row of the README's stage table."""
    table = README[README.index("| stage | module | entry point |"):]
    for line in table.splitlines()[2:]:
        if not line.startswith("|"):
            break
        _, module, entry = (c.strip() for c in line.strip("|").split("|"))
        paths = [p for p in re.findall(r"`([^`]+)`", module) if "/" in p or p.endswith(".py")]
        yield paths, re.findall(r"`([A-Za-z_][\w.]*)`", re.sub(r"\([^)]*\)", "", entry))    # asides left out


def test_the_stage_table_finds_every_stage_in_one_hop():
    rows = list(_stage_rows())
    assert len(rows) > 30
    for paths, names in rows:
        first = REPO / paths[0]
        # `kernel_estimate.py` beside the row's first file; `embed/i3resnet.py` under the package
        files = [REPO / p if p.startswith(("emphy_dask", "schemas", "jobs", "deploy")) else
                 first.parent / p if "/" not in p else REPO / "emphy_dask" / p for p in paths]
        assert all(f.exists() or list(f.parent.glob(f.name.replace(".vN.", ".v*."))) for f in files), paths
        modules = []
        for f in files:
            if f.suffix == ".py" or f.is_dir() and (f / "__init__.py").exists():
                rel = f.relative_to(REPO).with_suffix("") if f.suffix == ".py" else f.relative_to(REPO)
                modules.append(importlib.import_module(".".join(rel.parts)))
        for name in names:
            head = name.split(".")[0]
            found = any(hasattr(m, head) for m in modules) or any(
                hasattr(importlib.import_module(f"{m.__name__}.{sub}"), head)
                for m in modules if hasattr(m, "__path__")
                for sub in (p.stem for p in Path(m.__path__[0]).glob("*.py")))
            assert found, f"{name} not in {paths}"

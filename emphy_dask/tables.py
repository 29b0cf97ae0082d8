"""Output tables: Arrow schemas loaded from ``schemas/`` and used to write, read and document.

Each table's schema lives once, in ``schemas/<table>.v<version>.json``: field name, Arrow type,
nullability, unit, a one-line doc, and ``volatile`` for columns that differ run to run
(timings, worker address). Writers cast rows to that schema; readers read with it; the
table docs (``docs/tables.md``) are generated from it (``emphy schemas --markdown``).

A dataset is a folder of ``part-<id>.parquet`` files, each holding many scans. Files are
written to a temporary name and renamed into place, so a reader never sees a partial file;
pyarrow, pandas and DuckDB skip names starting with ``_`` or ``.``.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

SCHEMA_DIR = Path(os.environ.get("EMPHY_SCHEMA_DIR", Path(__file__).resolve().parents[1] / "schemas"))
TABLES = ("scans", "phenotypes", "slices", "embeddings", "errors")   # the partitioned datasets of a run
DOCUMENTED = TABLES + ("manifest", "predictions", "longitudinal")
_TYPES = {
    "string": pa.string(), "bool": pa.bool_(), "int8": pa.int8(), "int16": pa.int16(),
    "int32": pa.int32(), "int64": pa.int64(), "float32": pa.float32(), "float64": pa.float64(),
    "list<string>": pa.list_(pa.string()), "list<int32>": pa.list_(pa.int32()),
}


def arrow_type(name: str) -> pa.DataType:
    """Arrow type of a schema type name; ``fixed_size_list<float32>[N]`` for embeddings."""
    if name.startswith("fixed_size_list<") and name.endswith("]"):
        inner, size = name[len("fixed_size_list<"):-1].split(">[")
        return pa.list_(_TYPES[inner], int(size))
    return _TYPES[name]


@lru_cache(maxsize=None)
def schema_spec(table: str) -> dict:
    """The JSON spec of ``table`` (newest version in ``schemas/``)."""
    files = sorted(SCHEMA_DIR.glob(f"{table}.v*.json"), key=lambda p: int(p.stem.rsplit(".v", 1)[1]))
    if not files:
        raise KeyError(f"no schema for table {table!r} in {SCHEMA_DIR}")
    return json.loads(files[-1].read_text())


@lru_cache(maxsize=None)
def arrow_schema(table: str) -> pa.Schema:
    """The Arrow schema of ``table``, with units/docs as field metadata and the version in schema metadata."""
    spec = schema_spec(table)
    fields = []
    for f in spec["fields"]:
        meta = {"doc": f["doc"]}
        if "unit" in f:
            meta["unit"] = f["unit"]
        fields.append(pa.field(f["name"], arrow_type(f["type"]), nullable=f.get("nullable", True), metadata=meta))
    return pa.schema(fields, metadata={"emphy.table": table, "emphy.schema_version": str(spec["version"])})


def column_names(table: str) -> list[str]:
    return [f["name"] for f in schema_spec(table)["fields"]]


def volatile_columns(table: str) -> list[str]:
    """Columns that legitimately differ between identical runs (timings, worker)."""
    return [f["name"] for f in schema_spec(table)["fields"] if f.get("volatile")]


def to_arrow(table: str, rows: list[dict]) -> pa.Table:
    """Rows (dicts) -> Arrow table in the schema's column order; unknown keys are an error."""
    schema = arrow_schema(table)
    names = set(schema.names)
    for row in rows:
        extra = set(row) - names
        if extra:
            raise KeyError(f"table {table}: columns not in schema {sorted(extra)}")
    cols = {n: [row.get(n) for row in rows] for n in schema.names}
    return pa.Table.from_pydict(cols, schema=schema)


def write_part(table: str, rows: list[dict], out_dir: Path, part_id: str) -> Path:
    """Atomically write ``rows`` as ``OUT/<table>/part-<part_id>.parquet``; returns the path."""
    return _write_arrow(table, to_arrow(table, rows), out_dir, part_id)


def write_frame(table: str, frame, out_dir: Path, part_id: str) -> Path:
    """``write_part`` for a pandas DataFrame (columns cast to the schema; far faster than dicts
    for millions of rows)."""
    schema = arrow_schema(table)
    return _write_arrow(table, pa.Table.from_pandas(frame.reindex(columns=schema.names), schema=schema,
                                                    preserve_index=False), out_dir, part_id)


def _write_arrow(table: str, arrow: pa.Table, out_dir: Path, part_id: str) -> Path:
    """One part, atomically. OUT may be an object-store URL (``io.storage``): the part is then
    uploaded whole (one PUT)."""
    from .io import storage

    if storage.is_url(out_dir):
        sink = pa.BufferOutputStream()
        pq.write_table(arrow, sink, compression="zstd")
        final = storage.join(out_dir, table, f"part-{part_id}.parquet")
        storage.write_bytes(final, sink.getvalue().to_pybytes())
        return Path(final)
    folder = Path(out_dir) / table
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"part-{part_id}.parquet"
    tmp = folder / f".tmp-part-{part_id}.parquet"
    pq.write_table(arrow, tmp, compression="zstd")
    os.replace(tmp, final)
    return final


def part_ids(out_dir: Path, table: str) -> set[str]:
    """Ids of the Parquet parts of a table (local folder or object-store URL)."""
    from .io import storage

    if storage.is_url(out_dir):
        names = storage.glob(storage.join(out_dir, table, "part-*.parquet"))
        return {n.rsplit("/", 1)[-1][len("part-"):-len(".parquet")] for n in names}
    folder = Path(out_dir) / table
    return {p.stem[len("part-"):] for p in folder.glob("part-*.parquet")} if folder.is_dir() else set()


def read_table(out_dir: Path, table: str, columns: list[str] | None = None) -> pa.Table:
    """Read a table of a run with its schema (an empty table when nothing was written yet)."""
    from .io import storage

    schema = arrow_schema(table)
    if not part_ids(out_dir, table):
        empty = schema.empty_table()
        return empty.select(columns) if columns else empty
    filesystem, folder = storage.arrow_filesystem(storage.join(out_dir, table))
    return ds.dataset(folder, schema=schema, format="parquet", filesystem=filesystem).to_table(columns=columns)


def read_frame(out_dir: Path, table: str, *, stable: bool = False):
    """pandas view of a table, sorted by its key columns; ``stable`` drops volatile columns."""
    spec = schema_spec(table)
    df = read_table(out_dir, table).to_pandas()
    if stable:
        df = df.drop(columns=volatile_columns(table))
    return df.sort_values(spec["sort_by"], kind="stable").reset_index(drop=True)


def schema_markdown() -> str:
    """Markdown docs of every table, generated from the schema files (kept in docs/tables.md)."""
    out = []
    for table in DOCUMENTED:
        spec = schema_spec(table)
        where = {"manifest": "manifest.parquet", "predictions": "predictions/ (emphy predict)",
                 "longitudinal": "longitudinal/ (emphy track)"}.get(table, f"{table}/")
        out.append(f"#### `{where}` (schema v{spec['version']})\n\n{spec['doc']}\n")
        out.append("| column | type | unit | description |\n|---|---|---|---|")
        for f in spec["fields"]:
            typ = f["type"] + ("" if f.get("nullable", True) else ", not null")
            out.append(f"| `{f['name']}` | {typ} | {f.get('unit', '')} | {f['doc']} |")
        out.append("")
    return "\n".join(out)

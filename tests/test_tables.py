"""Schemas are defined once and used to write, read and document the tables."""
import json
import re
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from emphy_dask import tables
from emphy_dask.phenotypes import PHENOTYPE_COLUMNS

REPO = Path(__file__).resolve().parents[1]


def test_every_schema_file_is_valid_and_versioned():
    for table in tables.DOCUMENTED:
        spec = tables.schema_spec(table)
        assert spec["table"] == table and spec["version"] >= 1
        schema = tables.arrow_schema(table)
        assert schema.metadata[b"emphy.schema_version"] == str(spec["version"]).encode()
        assert len(set(schema.names)) == len(schema.names)
        assert all(k in schema.names for k in spec["sort_by"])


def test_phenotype_schema_matches_the_phenotype_code():
    names = tables.column_names("phenotypes")
    assert names[:4] == ["scan_key", "config_hash", "region", "hu_source"]
    assert tuple(names[4:]) == tuple(PHENOTYPE_COLUMNS)


def test_write_read_round_trip_keeps_schema_and_metadata(tmp_path):
    rows = [{"scan_key": "A", "config_hash": "h", "stage": "ingest", "error_type": "ScanError",
             "message": "A/x.dcm: truncated", "path": "A/x.dcm"}]
    path = tables.write_part("errors", rows, tmp_path, "p1")
    assert path.name == "part-p1.parquet" and not list(path.parent.glob(".tmp*"))
    meta = pq.read_schema(path).metadata
    assert meta[b"emphy.table"] == b"errors" and meta[b"emphy.schema_version"] == b"1"
    back = tables.read_frame(tmp_path, "errors")
    assert back.to_dict("records") == rows
    con = duckdb.connect()
    assert con.execute(f"select message from read_parquet('{tmp_path}/errors/*.parquet')").fetchall() == \
        [("A/x.dcm: truncated",)]


def test_unknown_column_is_refused(tmp_path):
    with pytest.raises(KeyError, match="not in schema"):
        tables.write_part("errors", [{"scan_key": "A", "bogus": 1}], tmp_path, "p")


def test_empty_table_reads_with_schema(tmp_path):
    t = tables.read_table(tmp_path, "scans")
    assert t.num_rows == 0 and t.schema.names == tables.column_names("scans")


def test_table_docs_are_generated_from_the_schemas():
    page = (REPO / "docs" / "tables.md").read_text()
    m = re.search(r"<!-- schemas:begin -->\n(.*?)<!-- schemas:end -->", page, re.S)
    assert m, "docs/tables.md lacks the generated schema section"
    assert m.group(1).strip() == tables.schema_markdown().strip(), "run: emphy schemas > and paste into docs/tables.md"

"""The cohort a model sees, read from the Parquet tables of an ``extract`` run (never the images).

``load_cohort`` joins ``scans/`` (status, weak label, scanner), ``embeddings/`` (one 2048-d
vector per scan x zone) and ``phenotypes/`` (WholeLung, raw HU) into arrays keyed by scan.
``RunTables`` reads each of those tables once however many questions are asked of it: every
function here takes it or a run folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from ..tables import read_frame, read_table

PHENOTYPE_FEATURES = ("laa950_pct", "hu_mean", "perc15_hu")


class CohortError(ValueError):
    """The run cannot give a model cohort (no embeddings, several backbones, too few scans)."""


@dataclass
class Cohort:
    """Scans with an embedding of every requested zone, in scan-key order.

    ``X`` (n, 2048 x zones) float64: the zones' embeddings side by side; ``y`` (n,) int weak
    label; ``pheno`` (n, 3) laa950_pct %, hu_mean HU, perc15_hu HU (WholeLung, raw HU; NaN when
    missing); ``scans`` the scans rows in the same order.
    """

    keys: np.ndarray
    X: np.ndarray
    y: np.ndarray
    pheno: np.ndarray
    scans: pd.DataFrame
    backbone: str
    weights_sha256: str
    zones: tuple
    feature_names: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.keys)


class RunTables:
    """The tables of an extract run that the models read, each from Parquet at most once.

    Parameters
    ----------
    out_dir : path
        The run folder (``scans/``, ``embeddings/``, ``phenotypes/``).
    """

    EMBEDDING_COLUMNS = ["scan_key", "backbone", "weights_sha256", "zone", "hu_source", "input_recipe", "embedding"]

    def __init__(self, out_dir):
        self.out_dir = Path(out_dir)

    @cached_property
    def scans(self) -> pd.DataFrame:
        """Every scans row, sorted by key."""
        return read_frame(self.out_dir, "scans")

    @cached_property
    def embeddings(self) -> pa.Table:
        """The embeddings rows (vectors kept in Arrow: a pandas column of lists would copy them)."""
        return read_table(self.out_dir, "embeddings", columns=self.EMBEDDING_COLUMNS)

    @cached_property
    def embedding_keys(self) -> pd.DataFrame:
        """The embeddings rows without their vectors, in the same order."""
        return self.embeddings.drop_columns(["embedding"]).to_pandas()

    @cached_property
    def phenotypes(self) -> pd.DataFrame:
        """Every phenotypes row, sorted by key."""
        return read_frame(self.out_dir, "phenotypes")


def run_tables(run) -> RunTables:
    """``run`` itself when it is a ``RunTables``, else the tables of the run folder ``run``."""
    return run if isinstance(run, RunTables) else RunTables(run)


def feature_names(zones, dim: int) -> list[str]:
    """``<zone>:<channel>`` (channel = the layer4 channel, 0-based) for every column of X."""
    return [f"{z}:{c:04d}" for z in zones for c in range(dim)]


def run_backbones(run) -> pd.DataFrame:
    """Distinct (backbone, weights_sha256) of a run's embeddings with their scan counts."""
    t = run_tables(run).embedding_keys
    return t.groupby(["backbone", "weights_sha256"], as_index=False)["scan_key"].nunique()


def embedding_setting(run, backbone: str, weights_sha256: str, column: str, before: str) -> str:
    """The value of an ``embeddings`` column that fixes the feature space (hu_source, input_recipe)
    for this backbone; ``before`` for runs from before the column; "mixed" when a run holds several."""
    t = run_tables(run).embedding_keys      # read with the schema: parts written before the column hold nulls
    found = set(t.loc[(t["backbone"] == backbone) & (t["weights_sha256"] == weights_sha256), column].fillna(before))
    return found.pop() if len(found) == 1 else ("mixed" if found else before)


def embedding_hu_source(run, backbone: str, weights_sha256: str) -> str:
    """raw or harmonized: the HU the run's embeddings of this backbone were cut from ([embed].hu_source;
    runs from before the column are raw); "mixed" when a run holds both."""
    return embedding_setting(run, backbone, weights_sha256, "hu_source", "raw")


def embedding_input_recipe(run, backbone: str, weights_sha256: str) -> str:
    """upstream, lung or multiwindow ([embed].input_recipe; runs from before the column: upstream)."""
    return embedding_setting(run, backbone, weights_sha256, "input_recipe", "upstream")


def pick_backbone(run, backbone: str = "") -> tuple[str, str]:
    """(backbone, weights_sha256) to use: the run's only one, or the one asked for."""
    out_dir = run_tables(run).out_dir
    found = run_backbones(run)
    if found.empty:
        raise CohortError(f"{out_dir}: no embeddings/ table (run extract with an [embed].backbone)")
    if backbone:
        found = found[found["backbone"] == backbone]
        if found.empty:
            raise CohortError(f"{out_dir}: no embeddings of backbone {backbone!r}")
    if len(found) > 1:
        opts = "; ".join(f"{r.backbone} ({r.weights_sha256[:12]}, {r.scan_key} scans)" for r in found.itertuples())
        raise CohortError(f"{out_dir}: embeddings of several backbones/weights ({opts}): choose one with --backbone")
    row = found.iloc[0]
    return str(row["backbone"]), str(row["weights_sha256"])


def wholelung_phenotypes(run) -> pd.DataFrame:
    """scan_key + laa950_pct, hu_mean, perc15_hu of the WholeLung region on raw HU."""
    ph = run_tables(run).phenotypes
    if "hu_source" in ph.columns:
        ph = ph[ph["hu_source"].fillna("raw") == "raw"]
    ph = ph[ph["region"] == "WholeLung"]
    return ph[["scan_key", *PHENOTYPE_FEATURES]].drop_duplicates("scan_key")


def embedding_matrix(run, backbone: str, weights_sha256: str, zones) -> tuple[np.ndarray, np.ndarray]:
    """(keys, X): scans holding every zone in ``zones``, X (n, 2048 x len(zones)) float64."""
    tables = run_tables(run)
    t, df = tables.embeddings, tables.embedding_keys
    keep = (df["backbone"] == backbone) & (df["weights_sha256"] == weights_sha256) & df["zone"].isin(zones)
    idx = np.flatnonzero(keep.to_numpy())
    if idx.size == 0:
        return np.array([], dtype=object), np.zeros((0, 0))
    emb = t.column("embedding").take(idx).combine_chunks()
    dim = emb.type.list_size
    vectors = emb.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float64)
    sub = df.iloc[idx].reset_index(drop=True)
    sub["row"] = np.arange(len(sub))
    wide = sub.pivot_table(index="scan_key", columns="zone", values="row", aggfunc="first")
    wide = wide.reindex(columns=list(zones)).dropna().sort_index()
    keys = wide.index.to_numpy(dtype=object)
    rows = wide.to_numpy(dtype=np.int64)                     # (n, zones)
    return keys, vectors[rows].reshape(len(keys), -1)


def load_cohort(run, zones=("middle",), backbone: str = "") -> Cohort:
    """The ok scans of a run (a folder or its ``RunTables``) with their embeddings of ``zones``, label and phenotypes."""
    tables = run_tables(run)
    out_dir = tables.out_dir
    if not (out_dir / "scans").is_dir():
        raise CohortError(f"{out_dir}: not an extract run (no scans/ table)")
    bb, sha = pick_backbone(tables, backbone)
    keys, X = embedding_matrix(tables, bb, sha, zones)
    scans = tables.scans
    scans = scans[(scans["status"] == "ok") & scans["label"].notna()].set_index("scan_key")
    keep = np.isin(keys, scans.index.to_numpy())
    keys, X = keys[keep], X[keep]
    if not len(keys):
        raise CohortError(f"{out_dir}: no ok scan has {bb} embeddings of every zone in {', '.join(zones)}")
    rows = scans.loc[keys].reset_index()
    ph = wholelung_phenotypes(tables).set_index("scan_key").reindex(keys)
    pheno = ph[list(PHENOTYPE_FEATURES)].to_numpy(dtype=np.float64)
    y = rows["label"].to_numpy().astype(np.int64)
    names = feature_names(zones, X.shape[1] // len(zones))
    return Cohort(keys, X, y, pheno, rows, bb, sha, tuple(zones), names)


def check_classes(y: np.ndarray, min_per_class: int, where: str) -> None:
    """Refuse a cohort with fewer than ``min_per_class`` scans in either class."""
    n_pos, n_neg = int((y == 1).sum()), int((y == 0).sum())
    if min(n_pos, n_neg) < min_per_class:
        raise CohortError(f"{where}: {n_pos} emphysema-positive and {n_neg} negative scans with status ok and "
                          f"embeddings; a model needs at least {min_per_class} per class: no model fitted")


def balanced_subset(y: np.ndarray, seed: int) -> np.ndarray:
    """Indices of the paper's balanced subset: every scan of the smaller class and as many of the
    larger class drawn without replacement with ``seed`` (sorted)."""
    rng = np.random.default_rng([seed, 7])
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    small, large = (pos, neg) if len(pos) <= len(neg) else (neg, pos)
    drawn = rng.choice(large, size=len(small), replace=False)
    return np.sort(np.concatenate([small, drawn]))

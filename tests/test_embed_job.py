"""The embedding and lungmask stages through the pipeline and the job: weights, errors, tables."""
from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from emphy_dask.embed.weights import WeightsMissing, resolve_backbone_weights, resolve_lungmask_weights, sha256_file
from emphy_dask.job.config import load_job
from emphy_dask.job.manifest import build_manifest
from emphy_dask.job.runner import run_extract
from emphy_dask.embed.weights import resolve_weights
from emphy_dask.local import process_scan
from emphy_dask.scan_state import ScanTask
from emphy_dask.tables import read_frame, schema_spec, to_arrow, volatile_columns

from .conftest import DX_SHARP, DX_SOFT
from .jobutil import extract_cmd


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from emphy_dask.synth import synth_cohort

    root = tmp_path_factory.mktemp("embed-cohort")
    synth_cohort(root, 2, seed=21, size="small")
    return root / "dicom"


#: lungmask's U-Net takes ~1 s per slice on one CPU core: its tests use chests of 8 thick slices
FEW_SLICES = ((8, 96, 96), (30.0, 3.6, 3.6))


@pytest.fixture(scope="module")
def thick_cohort(tmp_path_factory):
    """Two patients of 8 slices as DICOM (patient/study/series/files)."""
    from emphy_dask.synth.dicom_write import write_dicom_series
    from emphy_dask.synth.phantom import make_phantom

    root = tmp_path_factory.mktemp("thick")
    for i, (sev, pattern) in enumerate(((0.0, "none"), (20.0, "panlobular")), start=1):
        ph = make_phantom(*FEW_SLICES, sev, pattern, np.random.default_rng(30 + i))
        write_dicom_series(ph.hu, ph.spacing_zyx_mm, root / f"THICK-{i}" / "study" / "series",
                           origin_xyz_mm=ph.origin_xyz_mm, seed=30 + i, patient_id=f"THICK-{i}")
    return root


def _job(tmp_path, text: str = "", name: str = "job.toml"):
    f = tmp_path / name
    f.write_text('[cluster]\nworkers = 2\nmemory_limit = "3GiB"\ndashboard_address = "127.0.0.1:0"\n'
                 '[output]\npart_size = 2\n' + text)
    return f


def _random_unet(folder, n_classes: int):
    """A randomly initialised lungmask U-Net saved to a file; its last bias centres the logits so
    that the random net gives every class some voxels (an all-background net tests nothing)."""
    from lungmask.resunet import UNet

    from emphy_dask.segment.lungmask import lungmask_preprocess
    from emphy_dask.synth.phantom import make_phantom
    from emphy_dask.volume import CTVolume

    torch.manual_seed(0)
    net = UNet(n_classes=n_classes, padding=True, depth=5, up_mode="upsample", batch_norm=True,
               residual=False).eval()
    ph = make_phantom(*FEW_SLICES, 10.0, "centrilobular", np.random.default_rng(0))
    vol = CTVolume(hu=np.maximum(ph.hu, -1024).astype(np.int16), spacing_zyx_mm=ph.spacing_zyx_mm)
    x = lungmask_preprocess(vol).slices
    with torch.no_grad():
        logits = net(torch.as_tensor((np.minimum(x, 600).astype(np.float32) + 1024) / 1624)[:, None])
    state = net.state_dict()
    state["last.bias"] -= logits.mean(dim=(0, 2, 3))
    path = folder / f"unet_random_{n_classes}.pth"
    torch.save(state, path)
    return path, vol


@pytest.fixture(scope="module")
def random_unet(tmp_path_factory):
    return _random_unet(tmp_path_factory.mktemp("unet"), 3)


def test_lungmask_lobes_are_measured_and_the_mask_keeps_sides(tmp_path, thick_cohort):
    path, _ = _random_unet(tmp_path, 6)
    cfg = load_job(_job(tmp_path, f'[segment]\nname = "lungmask"\nmodel = "LTRCLobes"\nweights = "{path}"\n'
                                  '[embed]\nbackbone = "none"\n'))
    _, tasks = build_manifest(thick_cohort, None)
    result = process_scan(tasks[0], cfg, tmp_path / "out")
    row = result["scans"]
    assert row["status"] == "ok", row["reason"]
    assert row["segmenter"] == "lungmask:LTRCLobes"
    regions = {r["region"]: r for r in result["phenotypes"]}
    lobes = [k for k in regions if k.endswith("Lobe")]
    assert len(lobes) == 5 and sum(regions[k]["n_voxels"] for k in lobes) == regions["WholeLung"]["n_voxels"]
    right = sum(regions[k]["n_voxels"] for k in lobes if k.startswith("Right"))
    assert right == regions["RightLung"]["n_voxels"]
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / row["mask_path"])))
    assert set(np.unique(mask)) <= {0, 1, 2} and (mask == 1).sum() == right


def test_lungmask_split_equals_lminferer(random_unet):
    """Preprocess (CPU) -> U-Net (device) -> post-process (CPU) gives lungmask's own answer."""
    from lungmask import LMInferer

    from emphy_dask.segment.lungmask import lung_mask_lungmask, lungmask_infer, lungmask_preprocess

    path, vol = random_unet
    weights = resolve_lungmask_weights("R231", str(path))
    ours = lung_mask_lungmask(vol.hu, vol.spacing_zyx_mm, weights=weights, device="cpu", batch_size=7)
    ref = LMInferer(modelpath=str(path), force_cpu=True, tqdm_disable=True).apply(vol.to_sitk())
    assert ours.shape == vol.shape and ours.dtype == np.uint8
    assert set(np.unique(ours)) == {0, 1, 2}
    assert np.array_equal(ours, ref)
    pre = lungmask_preprocess(vol)
    assert pre.slices.shape == (vol.shape[0], 256, 256) and pre.slices.dtype == np.int16
    from emphy_dask.segment.lungmask import load_lungmask_model

    raw = lungmask_infer(pre, load_lungmask_model(weights, "R231", "cpu"), "cpu", batch_size=4)
    assert raw.shape == pre.slices.shape and raw.dtype == np.uint8 and raw.max() <= 2


def test_lungmask_through_extract(tmp_path, thick_cohort, random_unet, random_resnet152_weights):
    path, _ = random_unet
    job = _job(tmp_path, f'[segment]\nname = "lungmask"\nweights = "{path}"\n'     # a cheap backbone: the test
               f'[embed]\nbackbone = "resnet152"\nweights = "{random_resnet152_weights}"\n')   # is about masks
    out = tmp_path / "lm"
    proc = subprocess.run(extract_cmd(thick_cohort, out, "--job", str(job)), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    scans = read_frame(out, "scans")
    assert len(scans) == 2
    assert set(scans["device_segment"]) == {"cpu"} and (scans["t_segment_s"] > 0).all()
    assert set(scans["segmenter"]) == {"lungmask:R231"}
    for _, row in scans.iterrows():
        if row["status"] != "ok":            # a random net may find no lung: said so, per scan
            assert "lungmask" in row["reason"]
            continue
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(out / row["mask_path"])))
        assert arr.shape == (row["n_slices"], row["rows"], row["columns"])     # the CT's native grid
        assert set(np.unique(arr)) <= {0, 1, 2} and arr.any()
    assert (scans["status"] == "ok").any()
    emb = read_frame(out, "embeddings")        # the backbone ran on the lungmask masks
    assert set(emb["scan_key"]) == set(scans.loc[scans["status"] == "ok", "scan_key"])


def test_resnet152_with_a_random_weight_file(tmp_path, cohort, random_resnet152_weights):
    """The paper's backbone: torchvision's module, weights from a file, strict, recorded by hash."""
    f = random_resnet152_weights
    cfg = load_job(_job(tmp_path, f'[embed]\nbackbone = "resnet152"\nweights = "{f}"\n'))
    _, tasks = build_manifest(cohort, None)
    result = process_scan(tasks[0], cfg, tmp_path / "out")
    assert result["scans"]["status"] == "ok", result["scans"]["reason"]
    emb = pd.DataFrame(result["embeddings"])
    assert list(emb["zone"]) == ["upper", "middle", "lower"]
    assert set(emb["weights_sha256"]) == {sha256_file(f)} and set(emb["backbone"]) == {"resnet152"}
    vectors = np.stack(emb["embedding"].map(np.asarray))
    assert vectors.shape == (3, 2048) and np.isfinite(vectors).all() and vectors.std(axis=1).min() > 0
    for ranks in emb["slice_indices"]:
        assert len(ranks) == 3 and ranks[0] == ranks[1] + 1 == ranks[2] + 2
    assert all((tmp_path / "out" / p).is_file() for p in emb["input_png_path"])
    fm = np.load(tmp_path / "out" / emb["featuremap_path"][0], allow_pickle=False)
    assert fm["layer4"].shape == (3, 2048, 7, 7)
    np.testing.assert_allclose(fm["layer4"].astype(np.float32).mean(axis=(2, 3)), vectors, rtol=2e-2, atol=1e-2)


def test_missing_weights_fail_before_any_work(tmp_path, cohort, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))
    for var in ("EMPHY_RESNET152_WEIGHTS", "EMPHY_LUNGMASK_WEIGHTS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(WeightsMissing, match=r"resnet152-394f9c45\.pth: torchvision ImageNet ResNet-152"):
        resolve_backbone_weights("resnet152")
    with pytest.raises(WeightsMissing, match=r"unet_r231-d5d2fc3d\.pth: lungmask R231 weights not found"):
        resolve_lungmask_weights("R231")
    with pytest.raises(WeightsMissing, match=r"nope\.pt: ct-i3resnet152 backbone weight file not found"):
        resolve_backbone_weights("ct-i3resnet152", str(tmp_path / "nope.pt"))
    for text, name in (('[embed]\nbackbone = "resnet152"\n', "resnet152-394f9c45.pth"),
                       ('[segment]\nname = "lungmask"\n', "unet_r231-d5d2fc3d.pth")):
        out = tmp_path / f"out-{name}"
        proc = subprocess.run(extract_cmd(cohort, out, "--job", str(_job(tmp_path, text))), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and name in lines[0] and "download" in lines[0], proc.stderr
        assert not (out / "scans").exists() and not (out / "manifest.parquet").exists()
    proc = subprocess.run([sys.executable, "-m", "emphy_dask.cli", "quantify", "--ct", str(DX_SOFT),
                           "--segmenter", "lungmask"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unet_r231-d5d2fc3d.pth" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_a_weight_file_of_the_wrong_model_fails_each_scan_with_the_reason(tmp_path, cohort):
    f = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, f)
    cfg = load_job(_job(tmp_path, f'[embed]\nweights = "{f}"\n'))
    _, tasks = build_manifest(cohort, None)
    result = process_scan(tasks[0], cfg, tmp_path / "out")
    row = result["scans"]
    assert row["status"] == "failed" and row["error_stage"] == "embed"
    assert "Missing key(s)" in row["reason"] and result["phenotypes"] == [] and result["embeddings"] == []


def test_cpu_fallback_equals_the_per_scan_function(tmp_path, cohort):
    """No GPU workers: the device stages run on CPU workers and give the direct call's rows."""
    cfg = load_job(_job(tmp_path))
    out = tmp_path / "job"
    summary = run_extract(cohort, out, cfg, progress=False, log=lambda *a: None)
    assert summary.counts["ok"] == 2
    torch.set_num_threads(1)                 # as on a one-thread worker (bf16 results do not depend on it)
    direct_cfg = resolve_weights(cfg)
    _, tasks = build_manifest(cohort, None)
    rows = [process_scan(t, direct_cfg, tmp_path / "direct") for t in tasks]
    for table in ("scans", "phenotypes", "slices", "embeddings"):
        job = read_frame(out, table, stable=True)
        direct = to_arrow(table, [r for res in rows for r in ([res[table]] if table == "scans" else res[table])])
        direct = direct.to_pandas().drop(columns=volatile_columns(table))
        direct = direct.sort_values(schema_spec(table)["sort_by"], kind="stable").reset_index(drop=True)
        if table == "embeddings":
            assert np.array_equal(np.stack(job.pop("embedding")), np.stack(direct.pop("embedding").map(np.asarray)))
            job["slice_indices"], direct["slice_indices"] = None, None
        pd.testing.assert_frame_equal(job, direct, check_dtype=False, obj=table)
    scans = read_frame(out, "scans")
    assert set(scans["device_embed"]) == {"cpu"} and scans["worker_embed"].notna().all()
    assert (scans["backbone"] == "ct-i3resnet152").all()
    emb = read_frame(out, "embeddings")
    assert len(emb) == 8 and set(emb["zone"]) == {"whole", "upper", "middle", "lower"}


def test_real_ct_two_kernels_give_finite_different_embeddings(tmp_path):
    """Real chest CT (one acquisition, sharp and standard kernels): 4 zones x 2048 finite values each."""
    cfg = resolve_weights(dataclasses.replace(load_job(None), qc=dataclasses.replace(load_job(None).qc, max_hu=4000.0)))
    vectors = {}
    for name, folder in (("sharp", DX_SHARP), ("soft", DX_SOFT)):
        task = ScanTask(name, "dicom", tuple(str(p) for p in sorted(folder.glob("*.dcm"))))
        result = process_scan(task, cfg, tmp_path)
        assert result["scans"]["status"] == "ok", result["scans"]["reason"]
        emb = np.stack([np.asarray(e["embedding"]) for e in result["embeddings"]])
        assert emb.shape == (4, 2048) and np.isfinite(emb).all() and (emb.std(axis=1) > 0).all()
        vectors[name] = emb
    diff = np.linalg.norm(vectors["sharp"] - vectors["soft"], axis=1)
    assert (diff > 0).all()
    cos = (vectors["sharp"] * vectors["soft"]).sum(1) / np.linalg.norm(vectors["sharp"], axis=1) / \
        np.linalg.norm(vectors["soft"], axis=1)
    assert (cos > 0.8).all()                 # same lungs: close, yet not the same

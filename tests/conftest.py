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
def thick_block(chest) -> CTVolume:
    """128x128 in-plane of the chest averaged into 5 mm slabs (16 slices): lung, vessels, mediastinum; cheap enough
    to adapt and interpolate several times."""
    from dataset.thick import simulate_thick

    thick = simulate_thick(chest, 5.0, 5.0)
    affine = thick.affine.copy()
    affine[:3, 3] = (thick.affine @ np.array([64, 64, 0, 1.0]))[:3]
    return thick.with_array(np.ascontiguousarray(np.asarray(thick.array)[64:192, 64:192]), affine)


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


@pytest.fixture(scope="session")
def weights(tiny_ae_checkpoint, tmp_path_factory):
    """A tiny untrained U-Net checkpoint in the best.pt layout, bound to the tiny autoencoder."""
    import torch

    from ddpm.latent_data import LatentSpace
    from thinslice.checkpoint import file_fingerprint
    from ddpm.build import build_unet
    from thinslice.config import Config

    cfg = Config.model_validate({"unet": {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                                          "attention_levels": [1], "window": 2, "heads": 2, "global_depth": 1},
                                 "diffusion": {"sample_steps": 2},
                                 "interpolate": {"window": [16, 16, 8]}})
    torch.manual_seed(0)
    net = build_unet(cfg, 8)
    path = tmp_path_factory.mktemp("unet") / "unet.pt"
    torch.save({"ema": net.state_dict(), "config": cfg.model_dump(mode="json"), "latent_channels": 8,
                "latent_space": LatentSpace(2.0, True, 4.0).state_dict(),
                "ae_fingerprint": file_fingerprint(tiny_ae_checkpoint), "step": 0}, path)
    return tiny_ae_checkpoint, path

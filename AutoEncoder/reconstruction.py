"""Reconstruction quality of one whole cached volume (patch-encode, volume-decode): what the autoencoder's
validation and its evaluation command both score."""
from __future__ import annotations

from pathlib import Path

import torch

from AutoEncoder.model import PatchVolumeAutoencoder
from dataset.cache import load_case
from dataset.intensity import hu_to_unit, unit_to_hu
from thinslice.images import midplane_panel
from thinslice.metrics import LUNG_WINDOW, mae_hu, psnr, ssim_axial


@torch.no_grad()
def reconstruct_case(model: PatchVolumeAutoencoder, case_dir: Path, hu_window, device, bf16: bool = False):
    """Returns (metrics, panel): PSNR on [-1024, 2048] and lung window, axial SSIM, MAE in HU."""
    thin = load_case(case_dir).thin
    x = hu_to_unit(torch.from_numpy(thin.array.astype("float32")), hu_window)[None, None].to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        rec = model.reconstruct_volume(x).float().clamp(-1, 1)
    true_hu, rec_hu = unit_to_hu(x, hu_window).cpu(), unit_to_hu(rec, hu_window).cpu()
    metrics = {"psnr": psnr(rec_hu, true_hu), "psnr_lung": psnr(rec_hu, true_hu, LUNG_WINDOW),
               "ssim": ssim_axial(rec_hu, true_hu), "mae_hu": mae_hu(rec_hu, true_hu)}
    return metrics, midplane_panel(x[0, 0].cpu(), rec[0, 0].cpu())

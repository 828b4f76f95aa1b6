"""Image-quality figures in HU windows (MONAI metrics): the same definitions for the autoencoder's
validation and the interpolation report."""
from __future__ import annotations

import torch
from monai.metrics import PSNRMetric, SSIMMetric

FULL_WINDOW = (-1024.0, 2048.0)
LUNG_WINDOW = (-1000.0, 400.0)


def to_window(hu: torch.Tensor, window) -> torch.Tensor:
    lo, hi = window
    return (hu.clamp(lo, hi) - lo) / (hi - lo)


def psnr(pred_hu: torch.Tensor, true_hu: torch.Tensor, window=FULL_WINDOW) -> float:
    """PSNR of HU clipped to `window` and mapped to [0, 1]; inputs (B, C, X, Y, Z)."""
    return float(PSNRMetric(max_val=1.0)(to_window(pred_hu, window), to_window(true_hu, window)).mean())


def ssim_axial(pred_hu: torch.Tensor, true_hu: torch.Tensor, window=FULL_WINDOW) -> float:
    """2D SSIM averaged over axial slices (voxel axis 2), HU windowed to [0, 1]."""
    p = to_window(pred_hu, window)[0].permute(3, 0, 1, 2)  # (Z, C, X, Y)
    t = to_window(true_hu, window)[0].permute(3, 0, 1, 2)
    return float(SSIMMetric(spatial_dims=2, data_range=1.0)(p, t).mean())


def mae_hu(pred_hu: torch.Tensor, true_hu: torch.Tensor, window=FULL_WINDOW) -> float:
    lo, hi = window
    return float((pred_hu.clamp(lo, hi) - true_hu.clamp(lo, hi)).abs().mean())

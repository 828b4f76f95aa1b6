"""Validation of the latent U-Net in image space: sample, decode, score in HU against the truth.

Each val case contributes a fixed latent crop (its centre, `val_crop`), sampled from fixed noise so
the curve over training steps compares like with like. Cubic interpolation of the thick scan and
the autoencoder's own reconstruction of the truth are scored on the same voxels: the floor to beat
and the ceiling direct decoding allows. `psnr` is ours decoded as evaluation/interpolate.py does by
default (residual: cubic + D(z) - D(cond)), `psnr_direct` is D(z) alone, `psnr_ceiling` the true thin
latent decoded the residual way (what a perfect U-Net would score).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dataset.cache import load_case
from dataset.intensity import unit_to_hu
from ddpm.inferer import LatentInferer
from ddpm.latent_data import LatentCase
from thinslice.images import midplane_panel
from thinslice.metrics import psnr


@dataclass
class ValCrop:
    case_id: str
    thin: torch.Tensor  # (1, C, x, y, z) latent crop
    cond: torch.Tensor
    spacing: torch.Tensor  # (1, 2)
    truth_hu: torch.Tensor  # (1, 1, X, Y, Z) image crop
    cubic_hu: torch.Tensor


def centre_start(shape, size) -> tuple[int, ...]:
    return tuple(max(0, (s - c) // 2) for s, c in zip(shape, size))


def val_crops(cases: list[LatentCase], cache: Path, size, compression, window) -> list[ValCrop]:
    out = []
    for c in cases:
        if c.thin_image is not None:  # an extra pair crop carries its own truth and cubic: scored whole
            out.append(ValCrop(c.case_id, c.thin[None], c.cond[None], c.spacing[None],
                               unit_to_hu(c.thin_image.float(), window)[None], unit_to_hu(c.cond_image.float(), window)[None]))
            continue
        shape = c.thin.shape[1:]
        size_c = tuple(shape) if size is None else tuple(min(a, b) for a, b in zip(size, shape))
        start = centre_start(shape, size_c)
        lat = (slice(None),) + tuple(slice(s, s + k) for s, k in zip(start, size_c))
        case = load_case(Path(cache) / "cases" / c.case_id)
        img = tuple(slice(s * f, (s + k) * f) for s, k, f in zip(start, size_c, compression))
        truth = np.asarray(case.thin.array[img], dtype=np.float32)
        crop_affine = case.thin.affine.copy()  # the crop's own grid: only its voxels are resampled
        crop_affine[:3, 3] = (case.thin.affine @ np.array([sl.start for sl in img] + [1.0]))[:3]
        if c.cond_image is not None:  # the cascade's condition: cubic refined by the case's adapter, stored whole
            cubic = unit_to_hu(c.cond_image[(0,) + img].float(), window).numpy()
        else:
            cubic = case.thick.sample_at(crop_affine, truth.shape, order=3)
        out.append(ValCrop(c.case_id, c.thin[lat][None], c.cond[lat][None], c.spacing[None],
                           torch.from_numpy(np.ascontiguousarray(truth))[None, None],
                           torch.from_numpy(np.ascontiguousarray(cubic))[None, None]))
    return out


@torch.no_grad()
def validate(inferer: LatentInferer, crops: list[ValCrop], ctx):
    """Crops sharded over ranks, sums all-reduced: every rank returns the same figures. Sampled, conditioned
    and decoded by the inferer interpolation uses, so the curve scores what evaluation/interpolate.py writes."""
    sums = torch.zeros(6, dtype=torch.float64)
    panel = None
    for k, vc in enumerate(crops):
        if k % ctx.world != ctx.rank:
            continue
        gen = torch.Generator().manual_seed(1234 + k)
        cond = inferer.condition(vc.cubic_hu, latent=vc.cond)
        z = inferer.sample(cond, vc.spacing, gen)
        shape = vc.truth_hu.shape[2:]
        thin = vc.thin.to(z)
        ours_hu = vc.cubic_hu + inferer.residual(z, cond.latent, shape)
        ceiling_hu = vc.cubic_hu + inferer.residual(thin, cond.latent, shape)  # a perfect U-Net, decoded the same way
        direct_hu, recon_hu = inferer.decode(torch.cat([z, thin]), shape).split(1)
        sums += torch.tensor([psnr(ours_hu, vc.truth_hu), psnr(vc.cubic_hu, vc.truth_hu),
                              psnr(recon_hu, vc.truth_hu), psnr(direct_hu, vc.truth_hu), 1.0,
                              psnr(ceiling_hu, vc.truth_hu)], dtype=torch.float64)
        if panel is None:
            panel = midplane_panel(inferer.codec.to_unit(vc.truth_hu[0, 0]), inferer.codec.to_unit(ours_hu[0, 0]))
    sums = ctx.all_reduce_sum(sums).cpu()
    n = max(1.0, float(sums[4]))
    return {"psnr": float(sums[0]) / n, "psnr_cubic": float(sums[1]) / n, "psnr_ae_ceiling": float(sums[2]) / n,
            "psnr_direct": float(sums[3]) / n, "cases": int(sums[4]), "psnr_ceiling": float(sums[5]) / n}, panel

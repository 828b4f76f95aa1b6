"""Self-supervised (thick, thin) pairs from a scan's own in-plane axes (SMORE, Zhao et al. 2020; SR4ZCT).

A thick scan is thin in-plane (pixels of about 0.7 mm). Making an in-plane axis the slice axis and
averaging it into slabs gives a pair with that very scan's noise, kernel and anatomy: the target is
the in-plane signal box-averaged to the thin spacing, the condition is the target slab-averaged
(dataset.thick.simulate_thick, the same exact box filter as the through-plane simulation) and
resampled back onto the thin grid with the same cubic B-spline that interpolation applies to a real
thick scan (CTVolume.sample_at on dataset.thick.thin_grid). So a pair is, by construction, exactly
what interpolation sees, only rotated: re-thickening the target gives the condition's slabs.

When the in-plane pixel is coarser than the output spacing (a 1.5 mm crop interpolated to 1 mm) the
pair keeps the pixel as the thin spacing and scales the slab to the same ratio (5 mm / 1 mm -> 5
pixels): the networks that learn from pairs work in voxels, and the ratio is what they see.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dataset.thick import simulate_thick, thin_grid
from dataset.volume import CTVolume


@dataclass
class PairGeometry:
    """How pairs are cut along an in-plane axis: thin spacing and slab thickness along it, in mm."""

    thin_mm: float
    slab_mm: float

    @classmethod
    def matching(cls, pixel_mm: float, out_spacing_mm: float, slab_mm: float) -> "PairGeometry":
        thin = max(float(pixel_mm), float(out_spacing_mm))
        return cls(thin, float(slab_mm) * thin / float(out_spacing_mm))


def _as_slice_axis(array: np.ndarray, spacing, axis: int) -> CTVolume:
    """A volume whose slice axis (2) is `axis` of the input; the other two axes keep their spacing."""
    order = [a for a in range(3) if a != axis] + [axis]
    return CTVolume(np.moveaxis(array, axis, 2), np.diag([spacing[order[0]], spacing[order[1]], spacing[axis], 1.0]))


def inplane_pair(array: np.ndarray, spacing, axis: int, geometry: PairGeometry, phase: int = 0):
    """(condition, target) along in-plane `axis` (0 or 1), moved to the last position.

    Both are float32 HU of shape (other in-plane axis, slice axis, thin samples along `axis`).
    `phase` drops that many thin samples first, so every slab phase can be drawn.
    """
    if axis not in (0, 1):
        raise ValueError("in-plane pairs need axis 0 or 1 (axis 2 is the slice axis)")
    vol = _as_slice_axis(np.asarray(array, dtype=np.float32), spacing, axis)
    pixel = float(spacing[axis])
    if geometry.thin_mm > pixel + 1e-6:  # box-average the in-plane signal to the thin spacing
        vol = simulate_thick(vol, geometry.thin_mm, geometry.thin_mm)
    target = vol.with_array(np.ascontiguousarray(vol.array[..., phase:]))
    return slab_condition(target, geometry.slab_mm)


def slab_condition(target: CTVolume, slab_mm: float):
    """(condition, target): the target's slab means resampled onto the thin grid that tiles them (cubic)."""
    thick = simulate_thick(target, slab_mm, slab_mm)
    affine, n = thin_grid(thick, target.slice_spacing)
    cond = thick.sample_at(affine, target.shape[:2] + (n,), order=3)
    return cond.astype(np.float32), np.asarray(target.array[..., :n], dtype=np.float32)


def rethicken(thin: np.ndarray, thin_mm: float, slab_mm: float) -> np.ndarray:
    """Slab means of a (.., .., n) stack along its last axis: for checking a pair against its condition."""
    vol = CTVolume(np.asarray(thin, dtype=np.float32), np.diag([1.0, 1.0, thin_mm, 1.0]))
    return simulate_thick(vol, slab_mm, slab_mm).array

"""Input checks run before any heavy work, shared by dataset/prepare.py and interpolation.

Each failure is a CaseError with a one-line reason (written to failures.csv by prepare, printed with
exit 2 by interpolate), so a bad scan is refused in seconds instead of producing a silent garbage
output after many minutes: NaN/Inf voxels (an all-zero output otherwise), volumes that are not CT
(no air near -1000 HU, or values outside any CT range: MR, PET, a mask, a scaled export), too few
slices or too small a field of view.
"""
from __future__ import annotations

import numpy as np

from dataset.errors import CaseError
from dataset.volume import CTVolume

AIR_HU = -900.0  # every CT scan of a body holds air (around it, in the lungs or bowel) below this
CT_RANGE = (-3100.0, 40000.0)  # beyond any scanner's HU, metal included
MIN_AIR_FRACTION = 1e-3
MIN_SLICES = 2
MIN_IN_PLANE = 16


def nonfinite_count(vol: CTVolume) -> int:
    arr = vol.array
    return int(arr.size - np.count_nonzero(np.isfinite(arr))) if np.issubdtype(arr.dtype, np.floating) else 0


def check_ct(vol: CTVolume, what: str = "input", allow_non_ct: bool = False, fill_nonfinite: float | None = None,
             min_slices: int = MIN_SLICES) -> CTVolume:
    """The volume, unchanged or with NaN/Inf filled when asked; CaseError for anything unusable."""
    n_bad = nonfinite_count(vol)
    if n_bad:
        if fill_nonfinite is None:
            raise CaseError(f"{what} volume has {n_bad} NaN or infinite voxel(s) ({100 * n_bad / vol.array.size:.3g} %); "
                            f"--fill-nonfinite HU replaces them (e.g. -1024 for air)")
        vol = vol.with_array(np.where(np.isfinite(vol.array), vol.array, np.float32(fill_nonfinite)).astype(np.float32))
    if vol.shape[2] < min_slices:
        raise CaseError(f"{what} volume has {vol.shape[2]} slice(s); at least {min_slices} are needed to interpolate "
                        f"between them")
    if min(vol.shape[:2]) < MIN_IN_PLANE:
        raise CaseError(f"{what} volume is {vol.shape[0]}x{vol.shape[1]} in-plane, smaller than {MIN_IN_PLANE}x{MIN_IN_PLANE}")
    lo, hi = float(vol.array.min()), float(vol.array.max())
    if lo == hi:
        raise CaseError(f"{what} volume is constant ({lo:g} HU everywhere)")
    if allow_non_ct:
        return vol
    if lo < CT_RANGE[0] or hi > CT_RANGE[1]:
        raise CaseError(f"{what} volume spans {lo:g}..{hi:g}, outside any CT range ({CT_RANGE[0]:g}..{CT_RANGE[1]:g} HU): "
                        f"not CT in HU? (--not-ct-ok interpolates it anyway)")
    air = float(np.count_nonzero(vol.array < AIR_HU)) / vol.array.size
    if air < MIN_AIR_FRACTION:
        raise CaseError(f"{what} volume has no air (values {lo:g}..{hi:g}; {100 * air:.2g} % below {AIR_HU:g}): it does not "
                        f"look like CT in HU (MR, PET, a mask, or a rescaled export?); --not-ct-ok interpolates it anyway")
    return vol

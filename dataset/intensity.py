"""HU <-> network range. The window clips HU, then maps it linearly onto [-1, 1]."""
from __future__ import annotations

import numpy as np

DEFAULT_WINDOW = (-1024.0, 2048.0)


def hu_to_unit(hu, window=DEFAULT_WINDOW):
    """Clip HU to `window` and map to [-1, 1]; works on numpy arrays and torch tensors."""
    lo, hi = window
    clipped = hu.clip(lo, hi) if hasattr(hu, "clip") else np.clip(hu, lo, hi)
    return (clipped - lo) * (2.0 / (hi - lo)) - 1.0


def unit_to_hu(x, window=DEFAULT_WINDOW):
    """Inverse of `hu_to_unit` inside the window (values outside [-1, 1] are clipped first)."""
    lo, hi = window
    clipped = x.clip(-1.0, 1.0) if hasattr(x, "clip") else np.clip(x, -1.0, 1.0)
    return (clipped + 1.0) * ((hi - lo) / 2.0) + lo


def to_int16_hu(hu: np.ndarray) -> np.ndarray:
    """Round to whole HU and store as int16, the type CT viewers and DICOM expect."""
    return np.clip(np.rint(hu), -32768, 32767).astype(np.int16)

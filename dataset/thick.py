"""Thick-slab simulation and the thin grid that tiles a thick scan's slabs.

A thin slice of spacing s is a box of width s centred on its position; thick slice k is the
average of the thin signal over slab k = [a0 + k*S, a0 + k*S + T] (T = slab thickness, S = slab
spacing), a0 being the lower edge of the first thin slice. Each thin slice weighs by the length
of its overlap with the slab, divided by T. When s divides T and S this is the plain mean of T/s
consecutive thin slices; otherwise the slices cut by a slab edge count fractionally, which is
the exact average of the piecewise-constant thin signal (no resampling step is needed).
"""
from __future__ import annotations

import numpy as np

from dataset.errors import CaseError
from dataset.volume import CTVolume

_EPS = 1e-6


def slab_weights(n_thin: int, thin_spacing: float, slab_thickness: float, slab_spacing: float):
    """Return (W, centres): W[k, i] = weight of thin slice i in slab k (rows sum to 1), and the
    centre of each slab in thin-index units."""
    s, T, S = float(thin_spacing), float(slab_thickness), float(slab_spacing)
    extent = n_thin * s
    if extent + _EPS < T:
        raise CaseError(f"volume spans {extent:.1f} mm, less than one {T:g} mm slab")
    n_slabs = int(np.floor((extent - T) / S + _EPS)) + 1
    lo = np.arange(n_slabs)[:, None] * S  # slab edges, mm from the first thin slice's lower edge
    box_lo = np.arange(n_thin)[None, :] * s
    overlap = np.clip(np.minimum(lo + T, box_lo + s) - np.maximum(lo, box_lo), 0.0, None)
    weights = overlap / T
    centres = (lo[:, 0] + T / 2) / s - 0.5
    return weights, centres


def simulate_thick(thin: CTVolume, slab_thickness: float = 5.0, slab_spacing: float = 5.0) -> CTVolume:
    """Slab-average a thin volume into a thick one (float32 HU), with the affine of the slab centres."""
    W, centres = slab_weights(thin.shape[2], thin.slice_spacing, slab_thickness, slab_spacing)
    src = thin.array
    out = np.empty(thin.shape[:2] + (W.shape[0],), dtype=np.float32)
    for k, row in enumerate(W):
        idx = np.nonzero(row)[0]
        out[..., k] = np.tensordot(src[..., idx].astype(np.float64), row[idx], axes=([2], [0]))
    index_map = np.eye(4)
    index_map[2, 2] = slab_spacing / thin.slice_spacing
    index_map[2, 3] = centres[0]
    return thin.with_array(out, thin.affine @ index_map, slice_thickness=float(slab_thickness),
                           info={**thin.info, "thick": "simulated"})


def thin_grid(thick: CTVolume, thin_spacing: float, slab_thickness: float | None = None):
    """Affine and slice count of the thin grid that exactly tiles the thick scan's slabs.

    The grid starts half a thin slice inside the first slab's lower edge and ends at the last
    slab's upper edge, so slab-averaging a volume on this grid lands on the thick slice centres.
    If the covered extent is not a multiple of `thin_spacing`, the last partial slice is dropped.
    """
    T = float(slab_thickness or thick.thickness)
    S = thick.slice_spacing
    extent = (thick.shape[2] - 1) * S + T
    n = int(np.floor(extent / thin_spacing + _EPS))
    index_map = np.eye(4)
    index_map[2, 2] = thin_spacing / S
    index_map[2, 3] = (thin_spacing / 2 - T / 2) / S
    return thick.affine @ index_map, n


def grid_slab_weights(n_thin: int, thin_spacing: float, thick: CTVolume, slab_thickness: float | None = None):
    """Weights of the thin_grid() slices in each of the thick scan's slabs (rows: the slabs the grid
    covers entirely, at most thick.shape[2])."""
    T = float(slab_thickness or thick.thickness)
    W, _ = slab_weights(n_thin, thin_spacing, T, thick.slice_spacing)
    return W[: thick.shape[2]]


def slab_residual(thin: np.ndarray, thick: np.ndarray, W: np.ndarray) -> np.ndarray:
    """thick - (thin averaged over each slab), (X, Y, K) in HU: what the output fails to explain."""
    return thick[..., : W.shape[0]].astype(np.float64) - np.tensordot(thin.astype(np.float64), W, axes=([2], [1]))


def enforce_slab_consistency(thin: np.ndarray, thick: np.ndarray, W: np.ndarray) -> np.ndarray:
    """The closest volume (least squares, per voxel column) whose slab averages equal the thick scan.

    thin + W^T (W W^T)^-1 r, r the slab residual: for disjoint slabs every thin slice of slab k
    moves by slab k's residual; overlapping or fractional slabs share it by their weights.
    """
    r = slab_residual(thin, thick, W)
    correction = np.tensordot(r, np.linalg.solve(W @ W.T, W), axes=([2], [0]))
    return (thin + correction).astype(np.float32)

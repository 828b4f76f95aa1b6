"""A CT volume that carries its geometry everywhere: voxels in (x, y, z) order plus a RAS affine.

The convention is nibabel's and TorchIO's (voxel index -> RAS millimetres), and voxel axis 2 is
always the through-plane (slice) axis.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import nibabel as nib
import numpy as np


@dataclass
class CTVolume:
    array: np.ndarray  # (x, y, z), HU
    affine: np.ndarray  # 4x4 voxel -> RAS mm
    slice_thickness: float | None = None  # mm; DICOM SliceThickness when known, else the spacing
    # provenance (series description, ...); a DICOM input's first header ("dicom_header") stays in memory, for
    # dataset.dicom_write, which copies only whitelisted attributes from it
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.array.ndim != 3:
            raise ValueError(f"expected a 3D volume, got shape {self.array.shape}")
        if self.affine.shape != (4, 4):
            raise ValueError(f"expected a 4x4 affine, got {self.affine.shape}")

    @property
    def spacing(self) -> np.ndarray:
        return nib.affines.voxel_sizes(self.affine)

    @property
    def slice_spacing(self) -> float:
        return float(self.spacing[2])

    @property
    def thickness(self) -> float:
        return float(self.slice_thickness) if self.slice_thickness else self.slice_spacing

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def orientation(self) -> str:
        return "".join(nib.aff2axcodes(self.affine))

    @classmethod
    def from_sitk(cls, image, **kwargs) -> "CTVolume":
        """SimpleITK (LPS) image -> (x, y, z) array + RAS affine, via TorchIO's converter."""
        from torchio.data.io import sitk_to_nib

        array, affine = sitk_to_nib(image)
        return cls(compact_hu(array[0]), affine, **kwargs)

    def with_array(self, array: np.ndarray, affine: np.ndarray | None = None, **kw) -> "CTVolume":
        return replace(self, array=array, affine=self.affine if affine is None else affine, **kw)

    def sample_at(self, affine: np.ndarray, shape, order: int = 3) -> np.ndarray:
        """Spline interpolation (scipy; order 0 nearest, 1 linear, 3 cubic) at the voxel centres of another
        grid given by its affine and shape; edge values beyond the volume."""
        from scipy import ndimage

        m = np.linalg.inv(self.affine) @ affine  # target voxel index -> this volume's voxel index
        if _slice_axis_only(m, self.shape, shape):
            return _resample_slice_axis(np.asarray(self.array, dtype=np.float32), m[2, 2], m[2, 3], shape[2], order)
        return ndimage.affine_transform(np.asarray(self.array, dtype=np.float32), m[:3, :3], offset=m[:3, 3],
                                        output_shape=tuple(shape), order=order, mode="nearest")

    def to_nifti(self) -> nib.Nifti1Image:
        img = nib.Nifti1Image(self.array, self.affine)
        img.set_qform(self.affine, code=1)
        img.set_sform(self.affine, code=1)
        img.header.set_xyzt_units("mm")
        return img


def compact_hu(array: np.ndarray) -> np.ndarray:
    """Integer HU that fit int16 are stored as int16 (readers may hand back int32 after rescaling)."""
    if np.issubdtype(array.dtype, np.integer) and array.dtype != np.int16:
        if array.size and array.min() >= -32768 and array.max() <= 32767:
            return array.astype(np.int16)
    return array


def plane_of(normal: np.ndarray) -> str:
    """Name the acquisition plane from the slice normal (RAS)."""
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


def _slice_axis_only(m: np.ndarray, src_shape, dst_shape) -> bool:
    """True when the target grid keeps the in-plane voxels and only rescales / shifts the slice axis
    (every thin grid of a thick scan): then the 3D spline reduces exactly to a 1D one along z."""
    keep = np.eye(4)
    keep[2, 2], keep[2, 3] = m[2, 2], m[2, 3]
    return np.allclose(m, keep, atol=1e-9) and tuple(src_shape[:2]) == tuple(dst_shape[:2])


def _resample_slice_axis(array: np.ndarray, scale: float, offset: float, n_out: int, order: int) -> np.ndarray:
    """The same spline (scipy, mode 'nearest') along the slice axis only, as a small (n_in, n_out) matrix
    found by resampling the identity, applied in one matrix product: about 50x faster than the 3D
    filter on a 512x512x300 scan, and equal to it because an interpolating spline returns the samples
    at the in-plane nodes."""
    from scipy import ndimage

    n_in = array.shape[2]
    basis = np.eye(n_in, dtype=np.float64)[None]  # (1, n_in, n_in): sample k = unit impulse at k
    weights = ndimage.affine_transform(basis, np.diag([1.0, 1.0, scale]), offset=(0.0, 0.0, offset),
                                       output_shape=(1, n_in, n_out), order=order, mode="nearest")[0]
    out = np.empty(array.shape[:2] + (n_out,), dtype=np.float32)
    flat_in, flat_out = array.reshape(-1, n_in), out.reshape(-1, n_out)
    w = weights.astype(np.float32)
    for start in range(0, flat_in.shape[0], 4096):  # row blocks: no full-size temporaries
        flat_out[start:start + 4096] = flat_in[start:start + 4096] @ w
    return out

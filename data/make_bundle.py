"""Re-create the derived crops in data/ct/thin from the full volumes in the shared data folder.

usage: python data/make_bundle.py PATH/TO/shared/data
"""
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

shared, thin = Path(sys.argv[1]) / "thin", Path(__file__).parent / "ct" / "thin"


def save(arr: np.ndarray, affine: np.ndarray, name: str) -> None:
    out = nib.Nifti1Image(np.rint(arr).astype(np.int16), affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    out.header.set_xyzt_units("mm")
    nib.save(out, thin / name)
    print(thin / name, out.shape)


# held-out chest: slices 88-167, in-plane 2x2 averaged; voxel (i, j) is the mean of original voxels
# 2i..2i+1, centred at 2i + 0.5
img = nib.load(shared / "lidc-idri-0314_chest_1.0mm.nii.gz").slicer[:, :, 88:168]
arr = np.asanyarray(img.dataobj).astype(np.float32)
nx, ny, nz = arr.shape
arr = arr.reshape(nx // 2, 2, ny // 2, 2, nz).mean((1, 3))
save(arr, img.affine @ np.array([[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 1, 0], [0, 0, 0, 1.0]]),
     "lidc-idri-0314_chest_1.0mm_crop-z88-168_inplane2x.nii.gz")

# demo training chest: slices 64-143 of the 1.5 mm TotalSegmentator chest, unchanged in-plane
img = nib.load(shared / "totalseg-s1_chest_1.5mm-resampled.nii.gz").slicer[:, :, 64:144]
save(np.asanyarray(img.dataobj), img.affine, "totalseg-s1_chest_1.5mm-resampled_crop-z64-144.nii.gz")

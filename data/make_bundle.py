"""Re-create the derived chest crop in data/ct/thin from the full LIDC-IDRI-0314 volume.

usage: python data/make_bundle.py PATH/TO/shared/data
"""
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

src = Path(sys.argv[1]) / "thin" / "lidc-idri-0314_chest_1.0mm.nii.gz"
img = nib.load(src).slicer[:, :, 88:168]
arr = np.asanyarray(img.dataobj).astype(np.float32)
nx, ny, nz = arr.shape
arr = arr.reshape(nx // 2, 2, ny // 2, 2, nz).mean((1, 3))
# voxel (i, j) of the result is the mean of original voxels 2i..2i+1, centred at 2i + 0.5
affine = img.affine @ np.array([[2, 0, 0, 0.5], [0, 2, 0, 0.5], [0, 0, 1, 0], [0, 0, 0, 1.0]])
out = nib.Nifti1Image(np.rint(arr).astype(np.int16), affine)
out.set_qform(affine, code=1)
out.set_sform(affine, code=1)
out.header.set_xyzt_units("mm")
dst = Path(__file__).parent / "ct" / "thin" / "lidc-idri-0314_chest_1.0mm_crop-z88-168_inplane2x.nii.gz"
nib.save(out, dst)
print(dst, out.shape)

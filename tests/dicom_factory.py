"""Write a CTVolume as a DICOM series, reusing the header of a real bundled slice as template.

Tests use it to build DICOM folders and ZIPs (thin + thick series, localizers, broken series) from
real CT, since only one real series is bundled.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dataset.volume import CTVolume

TEMPLATE = sorted((Path(__file__).resolve().parents[1] / "data/ct/dicom/totalseg-s3_abdomen_2mm").iterdir())[0]


def write_series(vol: CTVolume, out_dir: Path, *, patient_id: str = "", study_uid: str | None = None,
                 modality: str = "CT", thickness: float | None = None, intercept: float = -1024.0,
                 image_type=("ORIGINAL", "PRIMARY", "AXIAL"), description: str = "") -> list[Path]:
    """Slices stored as uint16 (hu - intercept), so reading must apply RescaleIntercept to get HU."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ vol.affine
    sx, sy, _ = vol.spacing
    row_cos = lps[:3, 0] / sx  # direction of increasing column index = voxel axis 0
    col_cos = lps[:3, 1] / sy  # direction of increasing row index = voxel axis 1
    series_uid, frame_uid = generate_uid(), generate_uid()
    study_uid = study_uid or generate_uid()
    stored = np.rint(vol.array - intercept).astype(np.uint16)
    paths = []
    for k in range(vol.shape[2]):
        ds = pydicom.dcmread(TEMPLATE, stop_before_pixels=True)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        sop = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.SOPInstanceUID = sop
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        ds.Modality = modality
        ds.ImageType = list(image_type)
        ds.PatientID = patient_id
        ds.PatientName = patient_id
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.SeriesDescription = description
        ds.InstanceNumber = k + 1
        ds.ImageOrientationPatient = [float(v) for v in np.concatenate([row_cos, col_cos])]
        ds.ImagePositionPatient = [float(v) for v in (lps @ np.array([0, 0, k, 1.0]))[:3]]
        ds.PixelSpacing = [float(sy), float(sx)]
        ds.SliceThickness = float(thickness if thickness is not None else vol.slice_spacing)
        ds.Rows, ds.Columns = vol.shape[1], vol.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.RescaleIntercept, ds.RescaleSlope = intercept, 1.0
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        ds["PixelData"].VR = "OW"
        path = out_dir / f"IM{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths

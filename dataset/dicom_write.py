"""A thin volume as a new DICOM CT series, so the result can go back to the PACS the thick scan came from.

The series joins the input's study: of the input's header only the attributes named below are copied
(a whitelist: institution, operator, request or private attributes of the input never reach the output).
Anonymized (`pseudonym` given: the case's), PatientID and PatientName are the pseudonym, the other patient
and study attributes are left empty, and no input UID is kept: StudyInstanceUID and FrameOfReferenceUID are
derived from the pseudonym and the input's UIDs under the secret pseudonym key (each case is its own
pseudonymous patient and study, the same one on a rerun; without the key nothing links it back), series and
instance UIDs are random.

Geometry comes from the volume's RAS affine through TorchIO's converter (the inverse of
CTVolume.from_sitk) in DICOM's LPS; pixels are the int16 HU themselves (slope 1, intercept 0). The folder
appears only when complete (thinslice.atomic.atomic_dir), so a killed run leaves no series a viewer shows.
"""
from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from dataset.volume import plane_of
from thinslice.atomic import atomic_dir

PATIENT = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex")
STUDY = ("StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName",
         "StudyDescription", "FrameOfReferenceUID", "PositionReferenceIndicator")
NEUTRAL = ("SpecificCharacterSet", "PatientPosition", "BodyPartExamined", "WindowCenter", "WindowWidth",
           "WindowCenterWidthExplanation")  # copied in both modes: nothing in them identifies anyone
EMPTY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
         "AccessionNumber", "ReferringPhysicianName", "PositionReferenceIndicator", "Manufacturer", "KVP",
         "AcquisitionNumber")  # type 2: present, empty when unknown


def software() -> str:
    try:
        return f"thinslice {version('thinslice')}"
    except PackageNotFoundError:
        return "thinslice"


def _ds(x: float) -> str:
    return format_number_as_ds(float(x))


def write_series(folder: Path, array: np.ndarray, affine: np.ndarray, source: Dataset | None, description: str,
                 pseudonym: str | None = None, key: bytes = b"") -> list[Path]:
    """Write `array` (x, y, z int16 HU, voxel axis 2 = slices) as one series in `folder`; `source` is the thick
    input's header (None for a non-DICOM input: a new study with an empty patient module)."""
    if array.dtype != np.int16 or array.ndim != 3:
        raise ValueError(f"expected a 3D int16 HU volume, got {array.dtype} {array.shape}")
    from torchio.data.io import get_sitk_metadata_from_ras_affine

    origin, spacing, direction = get_sitk_metadata_from_ras_affine(np.asarray(affine, np.float64))
    origin, axes = np.array(origin), np.array(direction).reshape(3, 3)  # LPS; column i = voxel axis i
    source = source or Dataset()
    ds = Dataset()
    for name in EMPTY:
        setattr(ds, name, "")
    for name in NEUTRAL + (() if pseudonym else PATIENT + STUDY):
        if name in source:
            ds[name] = source[name]
    if pseudonym:
        if not key:
            raise ValueError("an anonymized series needs the pseudonym key (its UIDs are keyed)")
        ds.PatientName = ds.PatientID = pseudonym
        for uid in ("StudyInstanceUID", "FrameOfReferenceUID"):
            if source.get(uid):
                setattr(ds, uid, generate_uid(entropy_srcs=[key.hex(), pseudonym, uid, str(source.get(uid))]))
    ds.StudyInstanceUID = ds.get("StudyInstanceUID") or generate_uid()
    ds.FrameOfReferenceUID = ds.get("FrameOfReferenceUID") or generate_uid()
    normal = np.cross(axes[:, 0], axes[:, 1])
    ds.SOPClassUID, ds.Modality = CTImageStorage, "CT"
    ds.ImageType = ["DERIVED", "SECONDARY"] + (["AXIAL"] if plane_of(normal) == "axial" else [])
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = int(source.get("SeriesNumber") or 0) + 1000  # beside the input's, never on it
    ds.SeriesDescription = ds.DerivationDescription = description[:64]
    ds.SoftwareVersions = software()
    ds.ImageOrientationPatient = [_ds(v) for v in np.concatenate([axes[:, 0], axes[:, 1]])]
    ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # row spacing (voxel axis 1), column spacing
    ds.SliceThickness = ds.SpacingBetweenSlices = _ds(spacing[2])
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "HU"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    paths = []
    with atomic_dir(folder) as tmp:
        for k in range(array.shape[2]):
            position = origin + k * spacing[2] * axes[:, 2]
            ds.set_pixel_data(np.ascontiguousarray(array[:, :, k].T), "MONOCHROME2", 16)  # new SOPInstanceUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = k + 1
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.SliceLocation = _ds(position @ normal)
            ds.save_as(tmp / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
            paths.append(Path(folder) / f"IM{k + 1:05d}.dcm")
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # what mkdir gives, not mkdtemp's owner-only 0700: colleagues read the series too
    return paths

"""DICOM series discovery and validation.

pydicom reads the headers (without decoding pixels) so every series can be checked and explained
before anything is decoded; SimpleITK then decodes the chosen series (any transfer syntax, rescale
slope/intercept applied) and builds its geometry.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from dataset.errors import CaseError
from dataset.volume import CTVolume, plane_of
from thinslice.atomic import PARTIAL

_GAP_FACTOR = 1.5  # a step this many times the median spacing means slices are missing
_ORIENT_TOL = 1e-3


def is_dicom_file(path: Path) -> bool:
    return path.is_file() and pydicom.misc.is_dicom(path)


def is_partial(path: Path, root: Path) -> bool:
    """Inside a temporary a killed writer left (thinslice.atomic): half a series, never a case."""
    return any(part.startswith(PARTIAL) for part in path.relative_to(root).parts)


@dataclass
class DicomSeries:
    """One series of a case: its files sorted along the slice normal, or the reason it is unusable."""

    name: str
    files: list[Path]
    spacing: float | None = None
    thickness: float | None = None
    plane: str | None = None
    patient_id: str = ""
    description: str = ""
    skip_reason: str | None = None

    @property
    def n_slices(self) -> int:
        return len(self.files)

    def read(self) -> CTVolume:
        if self.skip_reason:
            raise CaseError(self.skip_reason)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(f) for f in self.files])
        try:
            image = reader.Execute()
        except RuntimeError as e:
            msg = str(e).strip().splitlines()[-1][:200]
            raise CaseError(f"series {self.name}: cannot decode pixel data ({msg})") from None
        header = pydicom.dcmread(self.files[0], stop_before_pixels=True)  # for a DICOM output in the same study
        return CTVolume.from_sitk(image, slice_thickness=self.thickness,
                        info={"series": self.name, "description": self.description, "format": "dicom",
                              "dicom_header": header})


def _header(path: Path):
    """Header only; pixel data is deferred so its presence and length can be checked cheaply."""
    try:
        ds = pydicom.dcmread(path, defer_size="1 KB")
    except (InvalidDicomError, EOFError, OSError, ValueError) as e:
        raise CaseError(f"corrupt DICOM file {path.name}: {type(e).__name__}") from None
    return ds


def _pixel_data_complete(ds, path: Path) -> bool:
    elem = ds.get_item("PixelData") if "PixelData" in ds else None
    if elem is None:
        return False
    length = getattr(elem, "length", None)
    tell = getattr(elem, "value_tell", None)
    if length is None or tell is None or length == 0xFFFFFFFF:
        return True  # encapsulated: pydicom only kept it if the closing delimiter was found
    return tell + length <= path.stat().st_size


def scan_series(root: Path, label: str) -> list[DicomSeries]:
    """Group every DICOM file below `root` into series and validate each one.

    Series are named by their folder relative to `root` (`label` for `root` itself). A broken
    file makes its folder's series unusable, and that reason wins over any other.
    """

    def folder_of(path: Path) -> str:
        return label if path.parent == root else str(path.parent.relative_to(root))

    groups: dict[tuple[str, str], list[tuple[Path, object]]] = defaultdict(list)
    broken: dict[str, list[str]] = defaultdict(list)
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not is_partial(p, root)):
        if not pydicom.misc.is_dicom(path):
            continue  # exports often carry README/XML files next to the slices
        folder = folder_of(path)
        try:
            ds = _header(path)
        except CaseError as e:
            broken[folder].append(str(e))
            continue
        if str(getattr(ds.file_meta, "MediaStorageSOPClassUID", "")) == "1.2.840.10008.1.3.10":
            continue  # DICOMDIR
        if not _pixel_data_complete(ds, path):
            broken[folder].append(f"truncated DICOM file {path.name}: pixel data incomplete")
            continue
        groups[(folder, str(ds.get("SeriesInstanceUID", "")))].append((path, ds))
    series = [_validate(_series_name(folder, uid, groups), items) for (folder, uid), items in groups.items()]
    for s in series:
        reasons = broken.get(folder_of(s.files[0]))
        if reasons:
            s.skip_reason = f"series {s.name}: {reasons[0]}"
    for folder, reasons in broken.items():
        if not any(k[0] == folder for k in groups):
            series.append(DicomSeries(folder, [], skip_reason=f"series {folder}: {reasons[0]}"))
    return series


def _series_name(folder: str, uid: str, groups) -> str:
    same_folder = [k for k in groups if k[0] == folder]
    if len(same_folder) == 1:
        return folder
    return f"{folder}#{hashlib.sha1(uid.encode()).hexdigest()[:6]}"


def _validate(name: str, items: list) -> DicomSeries:
    first = items[0][1]
    s = DicomSeries(name, [p for p, _ in items], patient_id=str(first.get("PatientID", "") or ""),
                    description=str(first.get("SeriesDescription", "") or ""))
    modality = str(first.get("Modality", "")).upper()
    if modality != "CT":
        s.skip_reason = f"series {name}: modality {modality or 'missing'}, not CT"
        return s
    image_type = [str(v).upper() for v in (first.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        s.skip_reason = f"series {name}: localizer (scout) image, not a volume"
        return s
    if len(items) < 3:
        s.skip_reason = f"series {name}: only {len(items)} slice(s), not a volume"
        return s
    try:
        iops = np.array([[float(v) for v in ds.ImageOrientationPatient] for _, ds in items])
        ipps = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in items])
    except (AttributeError, TypeError, ValueError):
        s.skip_reason = f"series {name}: slices lack ImageOrientationPatient/ImagePositionPatient"
        return s
    if np.abs(iops - iops[0]).max() > _ORIENT_TOL:
        s.skip_reason = f"series {name}: mixed orientations within one series"
        return s
    normal = np.cross(iops[0, :3], iops[0, 3:])
    pos = ipps @ normal
    order = np.argsort(pos)
    pos = pos[order]
    s.files = [s.files[i] for i in order]
    steps = np.diff(pos)
    if steps.min() < 1e-3:
        s.skip_reason = f"series {name}: duplicate slice positions"
        return s
    spacing = float(np.median(steps))
    if steps.max() > _GAP_FACTOR * spacing:
        k = int(np.argmax(steps))
        s.skip_reason = (f"series {name}: missing slices, gap of {steps[k]:.2f} mm between positions "
                         f"{pos[k]:.2f} and {pos[k + 1]:.2f} where spacing is {spacing:.2f} mm")
        return s
    s.spacing = spacing
    s.plane = plane_of(normal)
    thickness = first.get("SliceThickness")
    s.thickness = float(thickness) if thickness not in (None, "") else spacing
    return s

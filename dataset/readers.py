"""Every supported source (DICOM folder, DICOM ZIP, NIfTI, NRRD/MHA) as a list of series.

A source is one case. `case_series` lists the series it holds (each validated, each with a reason
when unusable); `read_volume` is the shortcut for a source that holds one usable series.
"""
from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk

from dataset.dicom import DicomSeries, is_dicom_file, is_partial, scan_series
from dataset.errors import CaseError
from dataset.volume import CTVolume, compact_hu, plane_of
from thinslice.atomic import PARTIAL

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SOURCE_SUFFIXES = VOLUME_SUFFIXES + (".zip",)  # what a case or an input file may end with


def strip_source_suffix(name: str) -> str:
    """`case.nii.gz` -> `case`: the name a case or an output is known by."""
    for suffix in SOURCE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def volume_suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in VOLUME_SUFFIXES if name.endswith(s)), None)


@dataclass
class FileSeries:
    """A single-volume file. NIfTI is read with nibabel (SimpleITK silently turns NaN into 0),
    NRRD/MHA with SimpleITK; geometry comes from the header without loading the voxels."""

    path: Path
    name: str = ""
    spacing: float | None = None
    thickness: float | None = None
    plane: str | None = None
    n_slices: int = 0
    patient_id: str = ""
    description: str = ""
    skip_reason: str | None = None

    @property
    def is_nifti(self) -> bool:
        return volume_suffix(self.path) in (".nii", ".nii.gz")

    def __post_init__(self):
        self.name = self.name or self.path.name
        try:
            if self.is_nifti:
                img = nib.load(str(self.path))
                shape, affine = img.shape, img.affine
            else:
                reader = sitk.ImageFileReader()
                reader.SetFileName(str(self.path))
                reader.ReadImageInformation()
                shape = reader.GetSize() + ((reader.GetNumberOfComponents(),) if reader.GetNumberOfComponents() > 1 else ())
                affine = np.eye(4)
                affine[:3, :3] = np.array(reader.GetDirection()).reshape(3, 3) * np.array(reader.GetSpacing())
        except Exception:  # nibabel and ITK raise many types for a damaged header
            self.skip_reason = f"{self.name}: unreadable or corrupt image file"
            return
        if len(shape) != 3:
            self.skip_reason = f"{self.name}: not a single-channel 3D volume (shape {tuple(shape)})"
            return
        self.spacing = float(nib.affines.voxel_sizes(affine)[2])
        self.thickness = self.spacing
        self.plane = plane_of(affine[:3, 2])
        self.n_slices = int(shape[2])

    def read(self) -> CTVolume:
        if self.skip_reason:
            raise CaseError(self.skip_reason)
        info = {"series": self.name, "format": volume_suffix(self.path).lstrip(".")}
        try:
            if self.is_nifti:
                img = nib.load(str(self.path))
                return CTVolume(compact_hu(np.asanyarray(img.dataobj)), img.affine, self.thickness, info)
            return CTVolume.from_sitk(sitk.ReadImage(str(self.path)), slice_thickness=self.thickness, info=info)
        except (RuntimeError, OSError, EOFError, ValueError) as e:
            raise CaseError(f"{self.name}: cannot read voxel data, truncated file? ({type(e).__name__})") from None


Series = DicomSeries | FileSeries


def safe_extract_zip(archive: Path, dest: Path) -> None:
    """Extract a ZIP, refusing any member that would land outside `dest` (zip-slip) or is a link."""
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as e:
        raise CaseError(f"corrupt ZIP {archive.name}: {e}") from None
    root = dest.resolve()
    with zf:
        for info in zf.infolist():
            target = (root / info.filename).resolve()
            is_link = stat.S_ISLNK(info.external_attr >> 16)
            if os.path.isabs(info.filename) or not target.is_relative_to(root) or is_link:
                raise CaseError(f"unsafe ZIP member '{info.filename}' in {archive.name}: "
                                "path escapes the extraction folder (refused)")
        try:
            zf.extractall(root)
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise CaseError(f"corrupt ZIP {archive.name}: {e}") from None


def _series_in_folder(folder: Path, label: str) -> list[Series]:
    series: list[Series] = list(scan_series(folder, label))
    for p in sorted(folder.rglob("*")):
        if p.is_file() and volume_suffix(p) and not is_partial(p, folder):
            series.append(FileSeries(p, name=str(p.relative_to(folder))))
    return series


@contextlib.contextmanager
def case_series(source: Path, workdir: Path | None = None) -> Iterator[list[Series]]:
    """The series of one case. ZIPs are extracted to a temporary folder that lives for the `with`."""
    source = Path(source)
    if not source.exists():
        raise CaseError(f"{source}: no such file or folder")
    if source.is_dir():
        series = _series_in_folder(source, source.name)
        if not series:
            raise CaseError(f"{source.name}: no DICOM or volume files found")
        yield series
    elif source.suffix.lower() == ".zip":
        with tempfile.TemporaryDirectory(dir=workdir, prefix=".unzip-") as tmp:
            safe_extract_zip(source, Path(tmp))
            series = _series_in_folder(Path(tmp), source.stem)
            if not series:
                raise CaseError(f"{source.name}: ZIP holds no DICOM or volume files")
            yield series
    elif volume_suffix(source):
        yield [FileSeries(source)]
    elif is_dicom_file(source):
        raise CaseError(f"{source.name}: a single DICOM file; pass the folder of its series")
    else:
        raise CaseError(f"{source.name}: unsupported format (expected a DICOM folder or ZIP, "
                        f"or one of {', '.join(VOLUME_SUFFIXES)})")


def read_volume(source: str | Path) -> CTVolume:
    """Read a source that holds exactly one usable series (the usual inference input)."""
    with case_series(Path(source)) as series:
        usable = [s for s in series if not s.skip_reason]
        if not usable:
            raise CaseError("; ".join(s.skip_reason for s in series))
        if len(usable) > 1:
            names = ", ".join(f"{s.name} ({s.spacing:.2f} mm)" for s in usable)
            raise CaseError(f"{Path(source).name}: holds several series ({names}); pass one")
        return usable[0].read()


def discover_sources(root: Path) -> list[Path]:
    """Every case below `root`: volume files, ZIPs, and DICOM folders.

    A folder holding DICOM files is a case. A folder whose DICOM lies one level down (one sub-folder
    per series, as radiology exports come) is one case when it holds a single series folder or its
    series share a StudyInstanceUID; otherwise each series folder is its own case.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    sources: list[Path] = []
    seen: set[str] = set()  # folders reached through links count once (data folders are often linked in)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        real = os.path.realpath(here)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(PARTIAL))  # a killed writer's leftovers
        files = [here / f for f in sorted(filenames) if not f.startswith(PARTIAL)]
        if any(is_dicom_file(f) for f in files[:20]) or (here != root and _is_multi_series_case(here, dirnames)):
            sources.append(here)
            dirnames[:] = []
            continue
        sources += [f for f in files if volume_suffix(f) or f.suffix.lower() == ".zip"]
    return sources


def _first_dicom(folder: Path) -> Path | None:
    return next((f for f in sorted(folder.iterdir()) if is_dicom_file(f)), None)


def _is_multi_series_case(folder: Path, subdirs: list[str]) -> bool:
    firsts = [f for f in (_first_dicom(folder / d) for d in subdirs) if f is not None]
    if len(firsts) < 2 or len(firsts) != len(subdirs):
        return False
    try:
        studies = {str(pydicom.dcmread(f, stop_before_pixels=True).get("StudyInstanceUID", "")) for f in firsts}
    except Exception:  # a broken header is reported when the case is read, not here
        return False
    return len(studies) == 1 and "" not in studies

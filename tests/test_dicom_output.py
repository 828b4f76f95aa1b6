"""DICOM out (issue 28): a thick DICOM series comes back as a thin series of the same study, equal to the NIfTI
beside it; anonymized it carries nothing of the patient; a killed write leaves no series a viewer would show."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dataset.dicom import DicomSeries, scan_series
from dataset.readers import case_series, discover_sources, read_volume
from dataset.split import case_pseudonym, key_from_file
from dataset.thick import simulate_thick
from dataset.volume import CTVolume
from evaluation.interpolate_cli import main
from thinslice.atomic import PARTIAL

from dicom_factory import write_series

ROOT = Path(__file__).resolve().parents[1]
NAME = "Doe_Jane_thorax"  # exports are often named after the patient
PATIENT = {"PatientName": "Doe^Jane", "PatientID": "MRN8675309", "PatientBirthDate": "19420314"}
FAST = ["--adapt", "0", "--steps", "1", "--quiet"]


def thick_dicom(thin: CTVolume, folder: Path) -> Path:
    """Real chest CT slab-averaged to 5 mm, written as a DICOM series with a named patient."""
    thick = simulate_thick(thin, 5.0, 5.0)
    paths = write_series(thick, folder, patient_id=PATIENT["PatientID"], thickness=5.0)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.PatientName, ds.PatientBirthDate, ds.SeriesNumber = PATIENT["PatientName"], PATIENT["PatientBirthDate"], 3
        ds.save_as(p)
    return folder


def args(weights, src, out, *extra):
    ae, unet = weights
    return ["--input", str(src), "--output", str(out), "--autoencoder", str(ae), "--unet", str(unet), *FAST, *extra]


@pytest.fixture(scope="module")
def thin_out(weights, chest_block, tmp_path_factory):
    """One run with the default output format on a thick DICOM input: (input folder, output folder)."""
    src = thick_dicom(chest_block, tmp_path_factory.mktemp("in") / NAME)
    out = tmp_path_factory.mktemp("out")
    assert main(args(weights, src, out)) == 0
    return src, out


def series_image(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    (uid,) = reader.GetGDCMSeriesIDs(str(folder))
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), uid))
    return reader.Execute()


def test_a_thick_dicom_series_comes_back_as_a_thin_series_of_its_study_equal_to_the_nifti(thin_out):
    src, out = thin_out
    assert sorted(p.name for p in out.iterdir()) == sorted(["cases.json", f"{NAME}.nii.gz", f"{NAME}_dicom"])  # both
    umask = os.umask(0)
    os.umask(umask)
    assert (out / f"{NAME}_dicom").stat().st_mode & 0o777 == 0o777 & ~umask  # readable like the NIfTI
    source = pydicom.dcmread(sorted(src.iterdir())[0], stop_before_pixels=True)
    slices = sorted((pydicom.dcmread(f) for f in (out / f"{NAME}_dicom").iterdir()), key=lambda d: d.InstanceNumber)
    nifti = nib.load(out / f"{NAME}.nii.gz")
    assert len(slices) == nifti.shape[2] == 40
    for ds in slices:
        for tag in ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "FrameOfReferenceUID"):
            assert ds[tag].value == source[tag].value, tag
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.SeriesNumber != source.SeriesNumber
        assert "DERIVED" in ds.ImageType and ds.Modality == "CT" and ds.SOPClassUID == pydicom.uid.CTImageStorage
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 1.0
        assert "thin 1 mm from 5 mm, thinslice" in ds.SeriesDescription
        assert "InstitutionAddress" not in ds and "RequestingPhysician" not in ds  # only whitelisted tags copied
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient],
                                   [float(v) for v in source.ImageOrientationPatient], atol=1e-6)
    assert len({ds.SeriesInstanceUID for ds in slices}) == 1 and len({ds.SOPInstanceUID for ds in slices}) == 40
    iop = np.array([float(v) for v in source.ImageOrientationPatient])
    steps = np.diff([[float(v) for v in ds.ImagePositionPatient] for ds in slices], axis=0)
    np.testing.assert_allclose(steps, np.tile(np.cross(iop[:3], iop[3:]), (39, 1)), atol=1e-4)  # 1 mm along the normal
    # SimpleITK: the DICOM series and the NIfTI are the same image in world space
    dicom, ref = series_image(out / f"{NAME}_dicom"), sitk.ReadImage(str(out / f"{NAME}.nii.gz"))
    for get in ("GetOrigin", "GetDirection", "GetSpacing"):
        np.testing.assert_allclose(getattr(dicom, get)(), getattr(ref, get)(), atol=1e-3, err_msg=get)
    onto = sitk.Resample(dicom, ref, sitk.Transform(), sitk.sitkNearestNeighbor, -9999, sitk.sitkInt16)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(onto), sitk.GetArrayFromImage(ref))


def test_prepare_and_interpolate_read_the_written_series_back(thin_out):
    _, out = thin_out
    from evaluation.interpolate_cli import read_thick

    nifti = nib.load(out / f"{NAME}.nii.gz")
    assert out / f"{NAME}_dicom" in discover_sources(out)  # prepare finds it as a case
    for vol in (read_volume(out / f"{NAME}_dicom"), read_thick(out / f"{NAME}_dicom")):
        assert vol.array.dtype == np.int16
        np.testing.assert_array_equal(vol.array, np.asanyarray(nifti.dataobj))
        np.testing.assert_allclose(vol.affine, nifti.affine, atol=1e-4)
        assert vol.thickness == 1.0


def test_anonymized_output_carries_nothing_of_the_patient(weights, chest_block, tmp_path):
    src = thick_dicom(chest_block, tmp_path / "in" / NAME)
    out = tmp_path / "out"
    assert main(args(weights, src, out, "--output-format", "both", "--anonymize")) == 0
    key = out / "pseudonym.key"
    assert key.stat().st_mode & 0o777 == 0o600
    pseudonym = case_pseudonym(NAME, key_from_file(key))
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["cases.json", "pseudonym.key", f"{pseudonym}.nii.gz", f"{pseudonym}_dicom"])
    assert json.loads((out / "cases.json").read_text())[0]["case"] == pseudonym
    written = [p for p in out.rglob("*") if p.is_file()]
    assert len(written) == 43
    secrets = [v.encode() for v in (*PATIENT.values(), NAME, "8675309")]
    for p in written:
        data = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
        assert not [s for s in secrets if s in data], p.name
    source = pydicom.dcmread(sorted(src.iterdir())[0], stop_before_pixels=True)
    ds = pydicom.dcmread(sorted((out / f"{pseudonym}_dicom").iterdir())[0])
    assert ds.PatientID == str(ds.PatientName) == pseudonym and not ds.PatientBirthDate
    assert ds.StudyInstanceUID != source.StudyInstanceUID and ds.FrameOfReferenceUID != source.FrameOfReferenceUID
    np.testing.assert_array_equal(read_volume(out / f"{pseudonym}_dicom").array,
                                  np.asanyarray(nib.load(out / f"{pseudonym}.nii.gz").dataobj))


def series_being_written(out: Path) -> Path | None:
    """The folder a series is being written to, once it holds a few slices (a short series to a reader)."""
    try:
        return next((p for p in out.iterdir()
                     if f"{NAME}_dicom" in p.name and p.is_dir() and len(list(p.iterdir())) >= 4), None)
    except FileNotFoundError:  # no output folder yet, or the series folder renamed while looked at
        return None


def test_a_killed_dicom_write_leaves_no_series_and_a_rerun_writes_it_whole(weights, chest, tmp_path):
    """The real command, killed (SIGKILL) while its DICOM series is being written: the whole 80 mm of the chest
    (96x96 in-plane, 80 slices to write) takes long enough to be caught by polling for the temporary folder."""
    affine = chest.affine.copy()
    affine[:3, 3] = (chest.affine @ np.array([80, 80, 0, 1.0]))[:3]
    src = thick_dicom(CTVolume(np.ascontiguousarray(chest.array[80:176, 80:176]), affine), tmp_path / "in" / NAME)
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "evaluation" / "interpolate.py"), *args(weights, src, out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    writing, deadline = None, time.monotonic() + 600
    while writing is None and proc.poll() is None and time.monotonic() < deadline:
        writing = series_being_written(out)
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"the run ended before its DICOM write was caught: {proc.stderr.read()}"
    assert writing is not None, "no DICOM write seen in 10 minutes"
    n_written = len(list(writing.iterdir()))
    assert not (out / f"{NAME}_dicom").exists(), f"a series folder with {n_written} slice(s) is in place"
    assert writing.name.startswith(PARTIAL)
    assert not [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(PARTIAL)]
    assert scan_series(out, "out") == [] and sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(out)) == ()
    with case_series(out) as series:  # the NIfTI (written first) is there; no DICOM series is
        assert not [s for s in series if isinstance(s, DicomSeries)]
    assert writing not in discover_sources(out)

    tiled = tmp_path / "tiled.yaml"  # the rerun in tiles: run_tiled writes DICOM too
    tiled.write_text("interpolate:\n  tile_slices: 8\n")
    assert main(args(weights, src, out, "--config", str(tiled))) == 0  # removes the leftover, writes the whole series
    assert json.loads((out / "cases.json").read_text())[0]["tiles"] == 2
    assert not writing.exists() and not list(out.glob(f"{PARTIAL}*"))
    assert len(list((out / f"{NAME}_dicom").iterdir())) == 80, f"killed after {n_written} slice(s)"
    np.testing.assert_array_equal(read_volume(out / f"{NAME}_dicom").array,
                                  np.asanyarray(nib.load(out / f"{NAME}.nii.gz").dataobj))

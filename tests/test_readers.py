import shutil
import zipfile

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from torchio.data.io import nib_to_sitk

from conftest import CHEST, DICOM_DIR
from dataset.errors import CaseError
from dataset.pairing import choose_pair
from dataset.readers import case_series, discover_sources, read_volume, safe_extract_zip
from dataset.thick import simulate_thick
from dataset.volume import CTVolume
from dicom_factory import write_series
from thinslice.config import SeriesSelection


def test_nifti_keeps_hu_and_affine(chest):
    img = nib.load(CHEST)
    assert chest.array.dtype == np.int16
    assert np.array_equal(chest.array, np.asanyarray(img.dataobj))
    assert np.allclose(chest.affine, img.affine, atol=1e-5)
    assert chest.orientation == "LPS"


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_nrrd_and_mha_round_trip(chest, tmp_path, suffix):
    path = tmp_path / f"vol{suffix}"
    sitk.WriteImage(nib_to_sitk(chest.array[None], chest.affine), str(path))
    back = read_volume(path)
    assert np.array_equal(back.array, chest.array)
    assert np.allclose(back.affine, chest.affine, atol=1e-5)


def test_real_dicom_series_geometry_and_hu():
    vol = read_volume(DICOM_DIR)
    assert vol.shape == (512, 512, 20)
    assert np.allclose(vol.spacing, [0.9765625, 0.9765625, 2.0])
    assert vol.thickness == 3.0  # SliceThickness, overlapping reconstruction
    # origin = the lowest slice's ImagePositionPatient, LPS -> RAS
    ipps = [pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient for f in DICOM_DIR.iterdir()]
    lowest = min(ipps, key=lambda p: float(p[2]))
    assert np.allclose(vol.affine[:3, 3], [-float(lowest[0]), -float(lowest[1]), float(lowest[2])])
    assert vol.array.min() == -1024  # stored 0 + intercept -1024: air outside the body
    assert -100 < np.median(vol.array[200:300, 200:300]) < 200  # soft tissue inside


def test_dicom_rescale_and_geometry_round_trip(chest_block, tmp_path):
    write_series(chest_block, tmp_path / "s", intercept=-1024.0)
    back = read_volume(tmp_path / "s")
    assert np.array_equal(back.array, chest_block.array)  # stored uint16 + intercept = HU
    assert np.allclose(back.affine, chest_block.affine, atol=1e-4)


def make_export_zip(block: CTVolume, tmp_path, name="case_001"):
    """A radiology export: folder 1 thick, folder 2 thin, 3 a localizer, 4 a coronal reformat."""
    root = tmp_path / "export" / name
    study = pydicom.uid.generate_uid()
    thick = simulate_thick(block, 5.0, 5.0)
    write_series(thick.with_array(np.rint(thick.array)), root / "1", study_uid=study, thickness=5.0)
    write_series(block, root / "2", study_uid=study, patient_id="PAT-SECRET-42")
    scout = block.with_array(np.ascontiguousarray(block.array[:, :, 20:21]))
    write_series(scout, root / "3", study_uid=study, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    swap = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1.0]])  # voxel axes y <-> z
    coronal = CTVolume(np.ascontiguousarray(block.array.transpose(0, 2, 1)), block.affine @ swap)
    write_series(coronal, root / "4", study_uid=study)
    archive = tmp_path / f"{name}.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted(root.rglob("*")):
            zf.write(f, f.relative_to(root.parent))
    return archive, thick


def test_zip_case_pairs_thin_and_thick_by_spacing_not_folder_names(chest_block, tmp_path):
    archive, thick = make_export_zip(chest_block, tmp_path)
    with case_series(archive) as series:
        pair = choose_pair(series, SeriesSelection())
        assert pair.thin.name == "case_001/2" and pair.thick.name == "case_001/1"
        reasons = " | ".join(pair.skipped)
        assert "case_001/3: localizer" in reasons
        assert "case_001/4: coronal series skipped" in reasons
        thin_vol, thick_vol = pair.thin.read(), pair.thick.read()
    assert np.array_equal(thin_vol.array, chest_block.array)
    assert np.allclose(thick_vol.affine, thick.affine, atol=1e-4)
    assert thick_vol.thickness == 5.0


def test_zip_slip_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("case/ok.txt", "fine")
        zf.writestr("../../escaped.txt", "gotcha")
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(CaseError, match="escapes the extraction folder"):
        safe_extract_zip(archive, dest)
    assert not (tmp_path / "escaped.txt").exists() and not any(dest.iterdir())


def test_discovery_finds_every_kind_of_source(chest_block, tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(DICOM_DIR, raw / "series_folder")
    archive, _ = make_export_zip(chest_block, tmp_path)
    (raw / "nested").mkdir()
    shutil.copy(archive, raw / "nested" / "case_001.zip")
    shutil.copytree(tmp_path / "export" / "case_001", raw / "unzipped" / "case_002")  # one case, 4 series
    shutil.copy(CHEST, raw / "chest.nii.gz")
    (raw / "notes.txt").write_text("not an image")
    found = sorted(str(p.relative_to(raw)) for p in discover_sources(raw))
    assert found == ["chest.nii.gz", "nested/case_001.zip", "series_folder", "unzipped/case_002"]
    # a data folder assembled from links (as for make reproduce) finds the same cases, a link loop once
    linked = tmp_path / "linked"
    (linked / "deeper").mkdir(parents=True)
    for name in ("series_folder", "nested", "unzipped", "chest.nii.gz"):
        (linked / "deeper" / name).symlink_to(raw / name)
    (linked / "deeper" / "loop").symlink_to(linked)
    found = sorted(str(p.relative_to(linked / "deeper")) for p in discover_sources(linked))
    assert found == ["chest.nii.gz", "nested/case_001.zip", "series_folder", "unzipped/case_002"]


def test_unsupported_input_has_a_clear_reason(tmp_path):
    bad = tmp_path / "scan.jpg"
    bad.write_bytes(b"\xff\xd8")
    with pytest.raises(CaseError, match="unsupported format"):
        read_volume(bad)
    with pytest.raises(CaseError, match="no such file"):
        read_volume(tmp_path / "missing.nii.gz")

"""dataset/prepare.py end to end on bundled real CT plus every kind of bad input."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from conftest import CHEST, DICOM_DIR, THICK
from dataset.cache import load_case, read_failures, read_manifest
from dataset.prepare import main
from dataset.readers import read_volume
from dataset.thick import simulate_thick
from dicom_factory import write_series
from test_readers import make_export_zip

ROOT = Path(__file__).resolve().parents[1]

EXPECTED_FAILURES = {
    "corrupt": "corrupt ZIP",
    "evil": "escapes the extraction folder",
    "truncated_dicom": "truncated DICOM file",
    "gap_dicom": "missing slices, gap of 2.00 mm",
    "mixed_orientation": "mixed orientations",
    "mr_series": "modality MR, not CT",
    "constant": "constant (-1024 HU everywhere)",
    "nan": "NaN",
}


@pytest.fixture(scope="module")
def raw(chest_block, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    raw = tmp / "raw"
    raw.mkdir()
    shutil.copy(CHEST, raw / "chest.nii.gz")
    shutil.copytree(DICOM_DIR, raw / "abdomen_dicom")
    archive, _ = make_export_zip(chest_block, tmp)
    shutil.copy(archive, raw / "case_001.zip")
    shutil.copy(THICK, raw / "thick_only.nii.gz")
    (raw / "corrupt.zip").write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    import zipfile

    with zipfile.ZipFile(raw / "evil.zip", "w") as zf:
        zf.writestr("../outside.dcm", b"x")
    files = write_series(chest_block, raw / "truncated_dicom")
    files[7].write_bytes(files[7].read_bytes()[:4000])
    files = write_series(chest_block, raw / "gap_dicom")
    files[12].unlink()
    files = write_series(chest_block, raw / "mixed_orientation")
    ds = pydicom.dcmread(files[5])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(files[5])
    write_series(chest_block, raw / "mr_series", modality="MR")
    nib.save(nib.Nifti1Image(np.full((32, 32, 40), -1024, np.int16), np.eye(4)), raw / "constant.nii.gz")
    bad = np.zeros((32, 32, 40), np.float32)
    bad[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(bad, np.eye(4)), raw / "nan.nii.gz")
    return raw


@pytest.fixture(scope="module")
def prepared(raw):
    cache = raw.parent / "cache"
    # the real command line, from another folder: the project is installed, no sys.path edits
    out = subprocess.run([sys.executable, str(ROOT / "dataset" / "prepare.py"), "--input", str(raw),
                          "--output", str(cache)], cwd=raw.parent, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return cache, out.stdout


def test_every_bad_input_is_named_with_its_reason_and_good_cases_finish(prepared):
    cache, stdout = prepared
    failures = read_failures(cache)
    assert set(failures) == set(EXPECTED_FAILURES)
    for case_id, needle in EXPECTED_FAILURES.items():
        assert needle in failures[case_id], (case_id, failures[case_id])
        assert "\n" not in failures[case_id] and "Traceback" not in failures[case_id]
    manifest = read_manifest(cache)
    assert sorted(c["case_id"] for c in manifest["cases"]) == ["abdomen_dicom", "case_001", "chest", "thick_only"]
    assert "prepared 4 case(s) (0 already done), 8 failed" in stdout and "1 thick-only" in stdout


def test_a_thick_only_case_is_kept_as_thick_only_and_never_scored(prepared):
    cache, _ = prepared
    entry = {c["case_id"]: c for c in read_manifest(cache)["cases"]}["thick_only"]
    assert entry["thick_kind"] == "thick-only" and entry["thin_shape"] is None
    case = load_case(cache / "cases" / "thick_only")
    assert case.thin is None and not (cache / "cases" / "thick_only" / "thin.nii").exists()
    src = read_volume(THICK)
    assert np.array_equal(case.thick.array, src.array) and np.allclose(case.thick.affine, src.affine, atol=1e-6)
    from dataset.cache import cases_in_split
    every = [d.name for s in ("train", "val", "test") for d in cases_in_split(cache, s)]
    assert "thick_only" not in every  # nothing to score or to train the autoencoder on
    assert "thick_only" in [d.name for s in ("train", "val", "test") for d in cases_in_split(cache, s, thick_only=True)]


def test_geometry_survives_read_cache_read(prepared):
    cache, _ = prepared
    case = load_case(cache / "cases" / "chest")
    src = read_volume(CHEST)
    assert np.array_equal(case.thin.array, src.array) and case.thin.array.dtype == np.int16
    assert np.allclose(case.thin.affine, src.affine, atol=1e-6)
    expect = simulate_thick(src, 5.0, 5.0)
    assert np.allclose(case.thick.affine, expect.affine, atol=1e-6)
    assert np.array_equal(case.thick.array, expect.array)
    assert case.meta["thick_kind"] == "simulated" and case.thick.thickness == 5.0
    # cached files are plain NIfTI with the affine in both qform and sform (what 3D Slicer reads)
    img = nib.load(cache / "cases" / "chest" / "thin.nii")
    assert np.allclose(img.get_qform(), src.affine, atol=1e-4) and int(img.header["sform_code"]) == 1


def test_real_pair_from_zip_is_cached_as_paired(prepared, chest_block):
    cache, _ = prepared
    case = load_case(cache / "cases" / "case_001")
    assert case.meta["thick_kind"] == "paired"
    assert case.meta["thin_series"] == "case_001/2" and case.meta["thick_series"] == "case_001/1"
    assert np.array_equal(case.thin.array, chest_block.array)
    assert any("localizer" in r for r in case.meta["skipped_series"])


def test_nothing_patient_identifying_is_written(prepared):
    cache, _ = prepared
    for f in cache.rglob("*"):
        if f.is_file():
            assert b"PAT-SECRET-42" not in f.read_bytes(), f
    meta = json.loads((cache / "cases" / "case_001" / "meta.json").read_text())
    assert meta["patient"].startswith("pt-") and meta["patient_label"] is None


def test_pseudonyms_cannot_be_confirmed_from_a_candidate_id(prepared, raw, tmp_path):
    """An unkeyed hash of the PatientID would let anyone holding a candidate id check it; the keyed one
    depends on the cache's secret, which stays in the cache (mode 0600) and nowhere else."""
    import hashlib

    cache, _ = prepared
    meta = json.loads((cache / "cases" / "case_001" / "meta.json").read_text())
    assert meta["patient"] != "pt-" + hashlib.sha256(b"PAT-SECRET-42").hexdigest()[:12]
    key_file = cache / "pseudonym.key"
    assert key_file.exists() and key_file.stat().st_mode & 0o077 == 0
    other = tmp_path / "other_cache"
    assert main(["--input", str(raw), "--output", str(other)]) == 0
    again = json.loads((other / "cases" / "case_001" / "meta.json").read_text())
    assert again["patient"] != meta["patient"]  # another secret, another pseudonym


def test_rerun_resumes_and_split_is_stable_when_a_case_is_added(prepared, raw, chest_block, capsys):
    cache, _ = prepared
    before = {c["case_id"]: c for c in read_manifest(cache)["cases"]}
    stamp = (cache / "cases" / "chest" / "thin.nii").stat().st_mtime_ns
    assert main(["--input", str(raw), "--output", str(cache)]) == 0
    assert "prepared 4 case(s) (4 already done)" in capsys.readouterr().out
    assert (cache / "cases" / "chest" / "thin.nii").stat().st_mtime_ns == stamp
    # a second study of the same patient, and an unrelated case, arrive
    write_series(chest_block, raw / "case_001_followup", patient_id="PAT-SECRET-42")
    shutil.copy(CHEST, raw / "other_patient.nii.gz")
    assert main(["--input", str(raw), "--output", str(cache)]) == 0
    after = {c["case_id"]: c for c in read_manifest(cache)["cases"]}
    assert set(after) == set(before) | {"case_001_followup", "other_patient"}
    assert all(after[k]["split"] == before[k]["split"] for k in before)
    assert after["case_001_followup"]["patient"] == after["case_001"]["patient"]
    assert after["case_001_followup"]["split"] == after["case_001"]["split"]
    shutil.rmtree(raw / "case_001_followup")
    (raw / "other_patient.nii.gz").unlink()


def test_changed_source_is_prepared_again(prepared, raw, capsys):
    cache, _ = prepared
    src = raw / "chest.nii.gz"
    img = nib.load(src)
    data = np.asanyarray(img.dataobj).copy()
    data[0, 0, 0] += 1
    nib.save(nib.Nifti1Image(data, img.affine, img.header), src)
    assert main(["--input", str(raw), "--output", str(cache)]) == 0
    assert "(3 already done)" in capsys.readouterr().out
    assert load_case(cache / "cases" / "chest").thin.array[0, 0, 0] == data[0, 0, 0]


def test_bad_config_and_missing_input_exit_with_a_message(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  thik: {}\n")
    assert main(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert "data.thik: unknown key (did you mean 'thick'?)" in capsys.readouterr().err
    assert main(["--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2


def test_pseudonymous_case_names_never_repeat_the_folder_name(tmp_path):
    import os
    import yaml

    raw = tmp_path / "raw"
    (raw / "DOE_JOHN_1961").mkdir(parents=True)
    shutil.copy(CHEST, raw / "DOE_JOHN_1961" / "chest.nii.gz")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"case_names": "pseudonym"}}))
    cache = tmp_path / "cache"
    assert main(["--input", str(raw), "--output", str(cache), "--config", str(cfg)]) == 0
    (entry,) = read_manifest(cache)["cases"]
    assert entry["case_id"].startswith("case-") and "DOE" not in json.dumps(entry)
    leaks = [p for p in cache.rglob("*") if p.is_file() and p.suffix in (".json", ".csv") and p.name != "case_names.csv"
             and "DOE" in p.read_text()]
    assert leaks == [] and not any("DOE" in str(p) for p in cache.rglob("*"))
    table = (cache / "case_names.csv").read_text()
    assert entry["case_id"] in table and "DOE_JOHN_1961" in table
    assert os.stat(cache / "case_names.csv").st_mode & 0o077 == 0  # the owner only
    again = tmp_path / "again"  # same key, same name: the same pseudonym; another cache: another one
    assert main(["--input", str(raw), "--output", str(cache), "--config", str(cfg)]) == 0
    assert read_manifest(cache)["cases"][0]["case_id"] == entry["case_id"]
    assert main(["--input", str(raw), "--output", str(again), "--config", str(cfg)]) == 0
    assert read_manifest(again)["cases"][0]["case_id"] != entry["case_id"]

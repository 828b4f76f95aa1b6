"""What happens when the input is bad or the writer is killed: refused before any heavy work with exit 2
and nothing written, or a complete output; never a half-written file that stays."""
import os
import signal
import subprocess
import sys
import time

import nibabel as nib
import numpy as np
import pytest

from dataset.checks import check_ct
from dataset.errors import CaseError
from dataset.volume import CTVolume
from thinslice.atomic import PARTIAL
from evaluation.interpolate_cli import main

from conftest import THICK

FAST = ["--adapt", "0", "--steps", "2", "--spacing", "2.5"]


@pytest.fixture(scope="module")
def thick_img():
    return nib.load(THICK)


def run(weights, src, out, *extra):
    ae, unet = weights
    return main(["--input", str(src), "--output", str(out), "--autoencoder", str(ae), "--unet", str(unet), *FAST, *extra])


def save(tmp_path, name, array, affine):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def test_nan_voxels_are_refused_with_their_count_or_filled_when_asked(weights, thick_img, tmp_path, capsys):
    arr = np.asarray(thick_img.dataobj, dtype=np.float32)
    arr[10:12, 10:20, 3] = np.nan
    src = save(tmp_path, "nan.nii.gz", arr, thick_img.affine)
    out = tmp_path / "out"
    assert run(weights, src, out) == 2
    assert "20 NaN or infinite voxel(s)" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())  # nothing written
    assert run(weights, src, out, "--fill-nonfinite", "-1024") == 0
    written = nib.load(out / "nan.nii.gz").get_fdata()
    assert np.isfinite(written).all() and np.abs(written).max() > 0


def test_volumes_that_are_not_ct_are_refused_unless_overridden(weights, thick_img, tmp_path, capsys):
    rng = np.random.default_rng(0)
    mr = rng.uniform(0, 1500, (64, 64, 12)).astype(np.float32)  # MR-like: no air, arbitrary units
    src = save(tmp_path, "mr.nii.gz", mr, np.diag([0.8, 0.8, 5.0, 1.0]))
    out = tmp_path / "out"
    assert run(weights, src, out) == 2
    assert "no air" in capsys.readouterr().err and not (out / "mr.nii.gz").exists()
    assert run(weights, src, out, "--not-ct-ok") == 0 and (out / "mr.nii.gz").exists()
    one = save(tmp_path, "one.nii.gz", np.asarray(thick_img.dataobj)[:, :, :1], thick_img.affine)
    assert run(weights, one, tmp_path / "o2") == 2
    assert "1 slice(s)" in capsys.readouterr().err


def test_a_memory_plan_too_small_for_one_tile_is_refused_before_any_work(weights, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(weights, THICK, out, "--max-memory-gb", "1.01") == 2
    assert "--max-memory-gb 1.01 is too small" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_check_ct_on_real_ct_passes_and_names_the_problem(chest):
    assert check_ct(chest) is chest
    with pytest.raises(CaseError, match="outside any CT range"):
        check_ct(chest.with_array(np.asarray(chest.array, np.float32) * 100))
    with pytest.raises(CaseError, match="constant"):
        check_ct(CTVolume(np.zeros((32, 32, 4), np.float32), np.eye(4)))


def test_output_stays_within_the_hu_range_of_valid_ct(weights, thick_img, tmp_path):
    import json

    out = tmp_path / "out"
    assert run(weights, THICK, out) == 0
    written = np.asarray(nib.load(out / f"{THICK.name[:-7]}.nii.gz").dataobj)
    info = json.loads((out / "cases.json").read_text())[0]
    lo, hi = info["clipped_voxels"]["range_hu"]
    assert lo == -1024 and written.min() >= lo and written.max() <= hi


WRITER = """
import sys, numpy as np
from evaluation.interpolate_cli import save_nifti
out = sys.argv[1]
a = np.random.default_rng(0).integers(-1024, 2000, (256, 256, 64)).astype(np.int16)
print("ready", flush=True)
for i in range(1000):
    save_nifti(f"{out}/vol{i % 3}.nii.gz", a, np.eye(4))
"""


@pytest.mark.slow
def test_a_rerun_of_the_command_removes_what_a_killed_writer_left_and_completes(weights, tmp_path, capsys):
    """SIGKILL during a write leaves a .partial- file next to the complete ones; rerunning the command on that
    folder must remove it itself (nothing else calls remove_partials here) and write a complete output."""
    out = tmp_path / "out"
    out.mkdir()
    rng = np.random.default_rng(1)
    for _ in range(4):  # kill at random moments until one lands inside a write (nearly always the first)
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(out)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.05, 1.5)))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if list(out.glob(f"{PARTIAL}*")):
            break
    else:  # every kill fell between two writes: plant what one inside a write leaves
        (out / f"{PARTIAL}vol0.nii.gz.k3x9q.nii.gz").write_bytes(b"\x1f\x8b\x08")
    left = sorted(p.name for p in out.glob(f"{PARTIAL}*"))
    assert left
    capsys.readouterr()
    assert run(weights, THICK, out) == 0
    said = capsys.readouterr().out
    assert not list(out.glob(f"{PARTIAL}*"))
    assert all(f"removed {name}: a partial file left by an interrupted run" in said for name in left)
    img = nib.load(out / f"{THICK.name[:-7]}.nii.gz")
    assert img.shape[2] == nib.load(THICK).shape[2] * 2 and np.asarray(img.dataobj).std() > 0  # complete
    for f in out.glob("vol*.nii.gz"):  # what the killed writer finished is whole: atomic renames only
        assert nib.load(f).shape == (256, 256, 64)
        np.asarray(nib.load(f).dataobj)


def test_outputs_are_readable_like_any_file_but_the_pseudonym_key_stays_private(tmp_path):
    from dataset.split import dataset_key
    from thinslice.atomic import write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "report.md", "x")
        dataset_key(tmp_path)
    finally:
        os.umask(old)
    assert (tmp_path / "report.md").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "pseudonym.key").stat().st_mode & 0o777 == 0o600


def test_every_stage_announces_itself_and_quiet_silences_them(weights, tmp_path, capsys):
    assert run(weights, THICK, tmp_path / "out") == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[")]
    stages = [line.split("] ", 1)[1].split(" ")[0] for line in lines]
    assert stages[:5] == ["read", "resample", "encode", "sample", "decode"] and "write" in stages
    assert float(lines[0][1:].split(" s")[0]) < 10  # the first line comes at once
    assert run(weights, THICK, tmp_path / "quiet", "--quiet") == 0
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]

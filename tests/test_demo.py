"""The README's first command: the demo runs every step on the bundled CT and explains its output."""
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
CASE = "thin__lidc-idri-0314_chest_1.0mm_crop-z88-168_inplane2x"


def demo(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evaluation.demo", *map(str, args)], capture_output=True, text=True,
                          cwd="/")  # from any folder


def test_demo_trains_every_step_then_interpolates_the_held_out_chest(tmp_path):
    r = demo("--smoke", "--output", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((tmp_path / "demo.json").read_text())
    assert list(info["seconds"]) == ["prepare the bundled CT", "autoencoder stage 1 (patches)",
                                     "autoencoder stage 2 (decoder on whole crops)", "latents", "latent U-Net",
                                     "interpolate the held-out chest and score it"]
    assert "ae_stage2" in info["autoencoder"] and "unet" in info["unet"]
    out = tmp_path / "interpolated"
    img, truth = nib.load(out / f"{CASE}.nii.gz"), nib.load(tmp_path / "cache" / "cases" / CASE / "thin.nii")
    assert img.get_data_dtype() == np.int16 and np.allclose(img.affine, truth.affine, atol=1e-5)
    assert "What the numbers mean" in r.stdout and "vs cubic" in r.stdout and str(out / "report.md") in r.stdout
    assert "$ python train/train_unet_latent.py" in r.stdout  # each step's command, to copy


@pytest.mark.slow
def test_demo_with_the_shipped_weights(tmp_path):
    r = demo("--pretrained", "--smoke", "--output", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "demo.json").read_text())["unet"].endswith("pretrained/unet.pt")
    assert "shipped weights" in r.stdout
    summary = json.loads((tmp_path / "interpolated" / "summary.json").read_text())["methods"]
    # the slab-consistency projection holds whatever the network does
    assert summary["ours + consistency"]["consistency_mean_abs_hu"] < 0.5
    # the reported figure is the written file's: PSNR on [-1024, 2048] HU of the NIfTI against the 1 mm truth,
    # over the scored slices (the first and last 5 mm slab's five 1 mm slices left out)
    written = np.asarray(nib.load(tmp_path / "interpolated" / f"{CASE}.nii.gz").dataobj, dtype=np.float32)
    truth = nib.load(tmp_path / "cache" / "cases" / CASE / "thin.nii").get_fdata(dtype=np.float32)
    assert written.shape == truth.shape == (256, 256, 80)

    def unit(hu):
        return (np.clip(hu[..., 5:75], -1024, 2048) + 1024) / 3072

    psnr = 10 * np.log10(1 / np.mean((unit(written) - unit(truth)) ** 2, dtype=np.float64))
    assert summary["ours + consistency"]["psnr"] == pytest.approx(psnr, abs=1e-3)
    # and it depends on the networks: the same projection of cubic alone (what a U-Net that changed nothing would
    # give) is 0.41 dB worse with the shipped weights on this machine; a U-Net giving zeros would be far worse still
    assert summary["ours + consistency"]["psnr"] - summary["cubic + consistency"]["psnr"] > 0.2

"""The README's first command: the demo runs every step on the bundled CT and explains its output."""
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

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


def test_demo_with_the_shipped_weights(tmp_path):
    r = demo("--pretrained", "--smoke", "--output", tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "demo.json").read_text())["unet"].endswith("pretrained/unet.pt")
    assert "shipped weights" in r.stdout
    summary = json.loads((tmp_path / "interpolated" / "summary.json").read_text())["methods"]
    # the slab-consistency projection holds whatever the network does
    assert summary["ours + consistency"]["consistency_mean_abs_hu"] < 0.5

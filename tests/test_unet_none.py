"""--unet none (cubic + per-scan adapter + consistency, no latent model), the installed console commands,
and weights found from any folder."""
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dataset.thick import enforce_slab_consistency, simulate_thick
from ddpm.adapt import refine
from evaluation.interpolation import Models, fit_adapter, interpolate, output_grid
from thinslice.config import InterpolateConfig
from thinslice.precision import Precision
from thinslice.weights import ENV, find_weights

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FP32 = Precision(False, "test")
COMMANDS = ["thinslice-prepare", "thinslice-train-autoencoder", "thinslice-latents", "thinslice-train-unet",
            "thinslice-interpolate"]


@pytest.fixture(scope="module")
def thick(chest):
    return simulate_thick(chest, 5.0, 5.0)


@pytest.fixture(scope="module")
def block(thick):
    """128x128 in-plane of the thick chest (lung, vessels, mediastinum): cheap enough to adapt twice."""
    affine = thick.affine.copy()
    affine[:3, 3] = (thick.affine @ np.array([64, 64, 0, 1.0]))[:3]
    return thick.with_array(np.ascontiguousarray(np.asarray(thick.array)[64:192, 64:192]), affine)


def test_unet_none_is_cubic_plus_adapter_plus_consistency(block):
    thick = block
    cfg = InterpolateConfig(adapt_steps=40, adapt_crop=32)
    models = Models.load("unused.pt", "none", "cpu", FP32)
    assert models.unet is None and models.autoencoder is None
    res = interpolate(thick, models, cfg, progress=False)
    grid = output_grid(thick, 1.0)
    cubic = thick.sample_at(grid.affine, grid.shape, order=3)
    net, info = fit_adapter(thick, models, cfg, progress=False)  # seeded: the same network again
    assert info["use"], "the adapter was not used: this test would not see it"
    adapted = refine(net, cubic, 1.0, thick.thickness, FP32, progress=False)
    assert np.abs(adapted - cubic).max() > 5  # the adapter changed something worth checking
    expected = enforce_slab_consistency(adapted, thick.array, grid.weights)
    np.testing.assert_allclose(res.output, expected, atol=1e-3)
    np.testing.assert_allclose(res.adaptation, adapted - cubic, atol=1e-3)
    assert "encode" not in res.seconds and "sample" not in res.seconds


def test_weights_are_looked_up_from_any_folder_and_the_error_names_every_place(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(ENV, raising=False)
    assert find_weights("pretrained/unet.pt") == ROOT / "pretrained" / "unet.pt"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "unet.pt").write_bytes(b"x")
    monkeypatch.setenv(ENV, str(tmp_path / "mine"))
    assert find_weights("pretrained/unet.pt") == tmp_path / "mine" / "unet.pt"
    with pytest.raises(FileNotFoundError) as e:
        find_weights("pretrained/nothing.pt", "U-Net checkpoint")
    msg = str(e.value)
    for place in (tmp_path / "pretrained" / "nothing.pt", tmp_path / "mine" / "nothing.pt",
                  ROOT / "pretrained" / "nothing.pt"):
        assert str(place) in msg
    assert ENV in msg


@pytest.mark.parametrize("command", COMMANDS)
def test_console_commands_are_installed(command):
    exe = BIN / command
    assert exe.is_file(), f"{exe}: not installed (pip install -e . gives it, see pyproject.toml [project.scripts])"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage" in out.stdout


def test_installed_interpolate_runs_outside_the_checkout_with_the_shipped_weights(thick, tmp_path):
    """From a folder with no pretrained/ in it, the shipped weights are found next to the installed package."""
    affine = thick.affine.copy()
    affine[:3, 3] = (thick.affine @ np.array([96, 96, 4, 1.0]))[:3]
    block = thick.with_array(np.ascontiguousarray(np.asarray(thick.array)[96:160, 96:160, 4:10]), affine)
    src = tmp_path / "scan.nii.gz"
    nib.save(block.to_nifti(), src)
    env = {k: v for k, v in os.environ.items() if k != ENV}
    run = subprocess.run([str(BIN / "thinslice-interpolate"), "--input", "scan.nii.gz", "--output", "out",
                          "--adapt", "0", "--quiet", "--device", "cpu"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    out = nib.load(tmp_path / "out" / "scan.nii.gz")
    assert out.shape == (64, 64, 30)
    np.testing.assert_allclose(out.header.get_zooms(), list(thick.spacing[:2]) + [1.0], rtol=1e-5)


def test_cli_unet_none_scores_a_split_without_the_latent_rows(bundled_cache, tmp_path):
    """With the adapter off too, --unet none writes cubic + consistency (rounded to int16 HU): the report says so."""
    import json

    from evaluation.interpolate_cli import main

    out = tmp_path / "out"
    assert main(["--split", "test", "--cache", str(bundled_cache), "--output", str(out), "--unet", "none",
                 "--adapt", "0", "--quiet"]) == 0
    methods = json.loads((out / "summary.json").read_text())["methods"]
    assert not [m for m in methods if "ceiling" in m or "without adaptation" in m]
    assert abs(methods["ours + consistency"]["psnr"] - methods["cubic + consistency"]["psnr"]) < 0.02
    assert methods["cubic + consistency"]["psnr"] > methods["cubic"]["psnr"]

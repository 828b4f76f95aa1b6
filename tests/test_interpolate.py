"""Interpolation: output geometry, slab consistency, sliding-window sampling, metrics, the CLI end to end."""
import json
import resource

import nibabel as nib
import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from dataset.cache import load_case
from dataset.intensity import to_int16_hu
from dataset.thick import enforce_slab_consistency, simulate_thick
from dataset.volume import CTVolume
from ddpm.generate import sample_thin_latent, sliding_window_denoiser, whole_volume_denoiser
from ddpm.latent_data import LatentSpace
from thinslice.checkpoint import file_fingerprint
from ddpm.samplers import DDIMSampler
from ddpm.build import build_diffusion, build_unet
from thinslice.config import Config
from evaluation.interpolate_cli import main
from evaluation.interpolation import Models, consistency_residual, interpolate, latent_ceiling, output_grid
from evaluation.report import lung_mask, score

from conftest import THICK


def oblique_thick(shape=(37, 29, 7), spacing=5.0) -> CTVolume:
    """An LPS-flipped, slightly rotated scan with odd sizes: nothing about the affine is diagonal."""
    a = np.deg2rad(7.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([-0.7, -0.9, spacing])
    affine[:3, 3] = [120.0, -33.0, -410.0]
    return CTVolume(np.zeros(shape, np.float32), affine, slice_thickness=spacing)


@pytest.mark.parametrize("spacing,per_slab", [(1.0, 5), (1.25, 4), (2.5, 2)])
def test_output_grid_tiles_each_slab_with_unchanged_in_plane_geometry(spacing, per_slab):
    thick = oblique_thick()
    grid = output_grid(thick, spacing)
    assert grid.shape == (37, 29, 7 * per_slab)
    np.testing.assert_allclose(grid.affine[:3, :2], thick.affine[:3, :2])  # in-plane unchanged
    np.testing.assert_allclose(np.linalg.norm(grid.affine[:3, 2]), spacing)
    np.testing.assert_allclose(grid.affine[:3, 2] / spacing, thick.affine[:3, 2] / 5.0)  # same slice direction
    centres = thick.affine @ np.array([[0, 0, k, 1.0] for k in range(7)]).T
    thin = grid.affine @ np.array([[0, 0, j, 1.0] for j in range(grid.shape[2])]).T
    for k in range(7):  # every slab's thin slices centre on the thick slice, spread +-(T - s)/2 around it
        mine = thin[:3, k * per_slab:(k + 1) * per_slab]
        np.testing.assert_allclose(mine.mean(axis=1), centres[:3, k], atol=1e-6)
        offsets = np.linalg.norm(mine - centres[:3, k:k + 1], axis=0)
        np.testing.assert_allclose(offsets.max(), (5.0 - spacing) / 2, atol=1e-6)
        if per_slab % 2 == 0:
            assert offsets.min() > 0.1  # an even count puts no thin slice on the slab centre
    assert np.allclose(grid.weights.sum(axis=1), 1) and grid.weights.shape == (7, 7 * per_slab)
    with pytest.raises(ValueError, match="not finer"):
        output_grid(thick, 5.0)


def test_consistency_step_brings_real_ct_within_1_hu_of_the_thick_scan(chest):
    thick = simulate_thick(chest, 5.0, 5.0)
    grid = output_grid(thick, 1.0)
    cubic = thick.sample_at(grid.affine, grid.shape, order=3)
    before = consistency_residual(cubic, thick, grid)
    fixed = to_int16_hu(enforce_slab_consistency(cubic, thick.array, grid.weights)).astype(np.float32)
    after = consistency_residual(fixed, thick, grid)
    assert before["mean_abs_hu"] > 2  # cubic alone does not reproduce the slab averages
    assert after["mean_abs_hu"] < 0.3 and after["max_abs_hu"] < 1.0  # int16 rounding only
    assert np.abs(fixed - cubic).mean() < before["mean_abs_hu"] * 1.01  # the least change that fixes it


class Pointwise(torch.nn.Module):
    """A 1x1x1 network with the U-Net's interface: any window placement must give the same output."""

    multiple = 4

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.mix = torch.nn.Conv3d(8, 4, 1)

    def forward(self, x, t, cond, spacing):
        return self.mix(torch.cat([x, cond], 1)) * (1 + t.float()[:, None, None, None, None] / 1000) * spacing[:, :1, None, None, None]


@pytest.mark.parametrize("window,overlap", [((8, 8, 8), 0.25), ((12, 4, 8), 0.5), ((20, 20, 12), 0.0)])
def test_sliding_window_result_does_not_depend_on_window_placement(window, overlap):
    net = Pointwise()
    x, cond = torch.randn(1, 4, 20, 16, 12), torch.randn(1, 4, 20, 16, 12)
    t, spacing = torch.tensor([500]), torch.tensor([[5.0, 1.0]])
    with torch.no_grad():
        whole = whole_volume_denoiser(net)(x, t, cond, spacing)
        slid = sliding_window_denoiser(net, window, overlap, sw_batch_size=3)(x, t, cond, spacing)
    torch.testing.assert_close(slid, whole, rtol=1e-5, atol=1e-5)
    space = LatentSpace(0.5, True, 2.0)
    sampler = DDIMSampler(build_diffusion(Config()))
    a = sample_thin_latent(net, space, sampler, cond, spacing, 4, torch.Generator().manual_seed(0))
    b = sample_thin_latent(net, space, sampler, cond, spacing, 4, torch.Generator().manual_seed(0),
                           denoiser=sliding_window_denoiser(net, window, overlap))
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_metrics_agree_with_hand_computation(chest):
    truth = np.asarray(chest.array[:, :, 20:36], dtype=np.float32)
    pred = truth + np.random.default_rng(0).normal(0, 40, truth.shape).astype(np.float32)
    lungs = lung_mask(truth)
    assert 0.05 < lungs.mean() < 0.9  # the crop holds lung, and the outside air is not counted as lung
    m = score(pred, truth, lungs)

    def unit(v, lo, hi):
        return (np.clip(v, lo, hi) - lo) / (hi - lo)

    mse = np.mean((unit(pred, -1024, 2048) - unit(truth, -1024, 2048)) ** 2)
    assert m["psnr"] == pytest.approx(10 * np.log10(1 / mse), abs=1e-3)
    mse_lung = np.mean((unit(pred, -1000, 400) - unit(truth, -1000, 400)) ** 2)
    assert m["psnr_lung"] == pytest.approx(10 * np.log10(1 / mse_lung), abs=1e-3)
    assert m["mae_hu"] == pytest.approx(np.abs(np.clip(pred, -1024, 2048) - np.clip(truth, -1024, 2048)).mean(), rel=1e-5)
    assert m["lung_bias_hu"] == pytest.approx(float((pred - truth)[lungs].mean()), abs=1e-3)
    ssim = np.mean([structural_similarity(unit(truth[..., k], -1024, 2048), unit(pred[..., k], -1024, 2048),
                                          data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
                    for k in range(truth.shape[2])])
    assert m["ssim"] == pytest.approx(ssim, abs=0.02)  # MONAI and scikit-image differ only at the borders


@pytest.mark.slow
def test_cli_interpolates_the_held_out_case_and_reports_against_linear_and_cubic(weights, bundled_cache, tmp_path, capsys):
    ae, unet = weights
    out = tmp_path / "out"
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
    assert main(["--split", "test", "--cache", str(bundled_cache), "--output", str(out), "--autoencoder", str(ae),
                 "--unet", str(unet), "--samples", "2", "--adapt", "0"]) == 0
    peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    name = "thin__lidc-idri-0314_chest_1.0mm_crop-z88-168_inplane2x"
    img = nib.load(out / f"{name}.nii.gz")
    truth = nib.load(bundled_cache / "cases" / name / "thin.nii")
    assert img.get_data_dtype() == np.int16 and img.shape == truth.shape == (256, 256, 80)
    np.testing.assert_allclose(img.affine, truth.affine, atol=1e-5)  # lands on the truth's own grid
    assert nib.load(out / f"{name}_std.nii.gz").shape == img.shape
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 9 and {r.split(",")[1] for r in rows[1:]} == {
        "ours", "ours + consistency", "linear", "linear + consistency", "cubic", "cubic + consistency",
        "ceiling", "ceiling + consistency"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["cubic"]["psnr"] > 30  # real chest CT: cubic is a strong baseline
    assert summary["methods"]["ours + consistency"]["consistency_mean_abs_hu"] < 0.5
    assert summary["methods"]["cubic"]["consistency_mean_abs_hu"] > 1
    case = json.loads((out / "cases.json").read_text())[0]
    # this process's peak resident memory when the case was done: between its peaks before and after the run
    assert peak_before - 0.005 <= case["peak_rss_gb"] <= peak_after + 0.005
    # the reported slab residual is the written file's own, and exact wherever nothing was clipped: the
    # consistency step matches every slab mean, then int16 rounding moves a voxel, so a mean, by <= 0.5 HU
    written = np.asarray(img.dataobj).astype(np.float32)
    lo, hi = case["clipped_voxels"]["range_hu"]
    assert lo == -1024 and written.min() >= lo and written.max() <= hi
    slabs = written.reshape(256, 256, 16, 5)  # the 1 mm output tiles the 16 slabs of 5 mm from its first slice
    gap = np.abs(slabs.mean(-1, dtype=np.float64) - load_case(bundled_cache / "cases" / name).thick.array)
    assert case["consistency_residual"]["mean_abs_hu"] == pytest.approx(gap.mean(), abs=1e-4)
    assert case["consistency_residual"]["max_abs_hu"] == pytest.approx(gap.max(), abs=1e-4)
    at_limit = ((slabs == lo) | (slabs == hi)).any(-1)  # slabs holding a clipped voxel (or one exactly at a limit)
    assert case["clipped_voxels"]["count"] <= np.count_nonzero((written == lo) | (written == hi))
    assert at_limit.mean() < 0.5 and gap[~at_limit].max() <= 0.5 + 1e-3
    assert (out / f"{name}.png").stat().st_size > 10_000 and "| cubic |" in (out / "report.md").read_text()
    from PIL import Image

    width, height = Image.open(out / f"{name}.png").size
    assert width >= 7 * 512 and height >= 3 * 150  # 7 columns of >= 512 px panels; axial, coronal, sagittal rows
    assert "first and last slab" in (out / "report.md").read_text()


def test_residual_decoding_passes_on_only_what_the_network_changed(weights, chest_block, monkeypatch):
    """A sampler that returns the condition unchanged must give back cubic exactly: the autoencoder's own
    reconstruction error cancels. Direct decoding of the same latent gives the (untrained) autoencoder's blur."""
    monkeypatch.setattr("ddpm.inferer.sample_thin_latent", lambda net, space, sampler, cond, *a, **k: cond)
    models = Models.load(*weights, torch.device("cpu"))
    thick = simulate_thick(chest_block, 5.0, 5.0)
    cfg = Config().interpolate.model_copy(update={"consistency": False, "window": (16, 16, 8), "adapt_steps": 0})
    res = interpolate(thick, models, cfg.model_copy(update={"decode": "residual"}), progress=False)
    np.testing.assert_allclose(res.output, res.cubic, atol=1e-3)
    # the ceiling decodes a given truth's latent the same way: for the condition itself it is cubic again
    np.testing.assert_allclose(latent_ceiling(res.cubic, res, models), res.cubic, atol=1e-2)
    direct = interpolate(thick, models, cfg.model_copy(update={"decode": "direct"}), progress=False)
    assert np.abs(direct.output - direct.cubic).mean() > 50  # HU: what residual decoding removes


def test_cli_takes_a_thick_nifti_and_names_bad_inputs(weights, tmp_path, capsys):
    ae, unet = weights
    out = tmp_path / "out"
    code = main(["--input", str(THICK), str(tmp_path / "missing.nii.gz"), "--output", str(out), "--autoencoder", str(ae),
                 "--unet", str(unet), "--spacing", "2.5", "--adapt", "0"])
    assert code == 2  # one input failed; the other was still written
    assert "missing.nii.gz: no such file or folder" in capsys.readouterr().err
    img = nib.load(out / "elastix-3dct-lung_chest_5mm-downsampled.nii.gz")
    thick = nib.load(THICK)
    assert img.shape == thick.shape[:2] + (thick.shape[2] * 2,) and np.allclose(img.header.get_zooms(), (2.732, 2.732, 2.5), atol=1e-3)
    assert main(["--input", str(THICK), "--output", str(out), "--autoencoder", str(tmp_path / "none.pt"),
                 "--unet", str(unet)]) == 2
    assert "autoencoder checkpoint not found" in capsys.readouterr().err
    assert main(["--split", "test", "--output", str(out), "--autoencoder", str(ae), "--unet", str(unet)]) == 2
    assert "--split needs --cache" in capsys.readouterr().err


@pytest.mark.parametrize("order", [0, 1, 3])
def test_slice_axis_resampling_equals_the_3d_spline_on_real_ct(chest, order):
    """The thin grid keeps the in-plane voxels, so sample_at runs a 1D spline along z; it must equal
    scipy's 3D spline (the reference) on real CT, for an odd grid too."""
    from scipy import ndimage

    thick = simulate_thick(chest, 5.0, 5.0)
    for spacing in (1.0, 1.25, 0.7):
        grid = output_grid(thick, spacing)
        m = np.linalg.inv(thick.affine) @ grid.affine
        ref = ndimage.affine_transform(np.asarray(thick.array, np.float32), m[:3, :3], offset=m[:3, 3],
                                       output_shape=grid.shape, order=order, mode="nearest")
        np.testing.assert_allclose(thick.sample_at(grid.affine, grid.shape, order=order), ref, atol=2e-3)


DECODE_PROBE = """
import json, math, sys
from types import SimpleNamespace
import torch
from AutoEncoder.codec import load_autoencoder
from evaluation.interpolation import decode_chunk_for, decode_halo
from thinslice.config import Config
from thinslice.precision import Precision
ae = load_autoencoder(sys.argv[1], "cpu")[0]
models = SimpleNamespace(autoencoder=ae, precision=Precision(False, "fp32: this test's CPU"))
shape, limit = (256, 256, 80), float(sys.argv[2])
halo = decode_halo(models, Config().interpolate)
chunk = decode_chunk_for(models, shape, limit, halo)
latent = [math.ceil(s / k) for s, k in zip(shape, ae.compression)]
context = [n if c >= n else min(n, c + 2 * halo) for n, c in zip(latent, chunk)]  # an inner chunk with its halo
def hwm_gb():  # this process's own peak: ru_maxrss would carry the (pytest) parent's peak across fork and exec
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 2**20
runtime = hwm_gb()
with torch.no_grad():
    ae.decode_volume(torch.randn(1, ae.cfg.latent_channels, *context), chunk=context)
print(json.dumps({"chunk": chunk, "latent": latent, "runtime_gb": runtime,
                  "peak_gb": hwm_gb()}))
"""


@pytest.mark.slow
def test_decode_chunks_fit_the_memory_limit(weights):
    """Measured, not recomputed: in a fresh process with the shipped autoencoder (the one the plan's constants
    describe), the runtime plus one decoder chunk of the plan for the held-out case's 256x256x80 under
    --max-memory-gb 2.2 peak within what the plan leaves them (the limit less the output-sized arrays);
    a small scan decodes in one pass."""
    import subprocess
    import sys
    from pathlib import Path

    from evaluation.interpolation import OUTPUT_ARRAYS, RUNTIME_GB, decode_chunk_for

    root = Path(__file__).resolve().parents[1]
    limit = 2.2  # tight: the decoder gets 0.47 GiB, so the plan has to chunk this scan
    probe = subprocess.run([sys.executable, "-c", DECODE_PROBE, str(root / "pretrained" / "autoencoder.pt"), str(limit)],
                           capture_output=True, text=True, timeout=600, cwd=root)
    assert probe.returncode == 0, probe.stderr[-3000:]
    m = json.loads(probe.stdout.splitlines()[-1])
    assert m["chunk"] != m["latent"]  # chunked
    # measured on a 2-core AVX2 CPU: runtime 1.01 GiB, with the chunk 1.46-1.49 GiB, against 1.97 planned
    assert m["runtime_gb"] <= RUNTIME_GB
    assert m["peak_gb"] <= limit - OUTPUT_ARRAYS * 4 * 256 * 256 * 80 / 2**30, m
    models = Models.load(*weights, torch.device("cpu"))
    f = models.autoencoder.compression
    small = decode_chunk_for(models, (256, 256, 80), 8.0, 6)
    assert all(c >= np.ceil(n / k) for c, n, k in zip(small, (256, 256, 80), f))


def test_a_tiled_run_writes_what_the_whole_run_writes(weights, tmp_path):
    """Scans larger than the memory plan are done in thick-slice tiles with a halo; the result matches.
    In fp32: under bf16 the decoder's rounding alone moves voxels by a few HU between any two runs."""
    ae, unet = weights
    args = ["--input", str(THICK), "--autoencoder", str(ae), "--unet", str(unet), "--adapt", "0", "--steps", "1",
            "--spacing", "2.5", "--quiet"]
    for name, extra in (("whole", ""), ("tiled", "  tile_slices: 16\n")):
        (tmp_path / f"{name}.yaml").write_text("interpolate:\n  cpu_bf16: false\n" + extra)
        assert main(args + ["--output", str(tmp_path / name), "--config", str(tmp_path / f"{name}.yaml")]) == 0
    whole, tiled = (nib.load(tmp_path / d / THICK.name) for d in ("whole", "tiled"))
    np.testing.assert_allclose(tiled.affine, whole.affine, atol=1e-6)
    a, b = whole.get_fdata(), tiled.get_fdata()
    assert a.shape == b.shape and tiled.get_data_dtype() == np.int16
    assert np.abs(a - b).mean() < 0.5 and np.abs(a - b).max() <= 8
    (info,) = json.loads((tmp_path / "tiled" / "cases.json").read_text())
    assert info["tiles"] == 4 and info["consistency_residual"]["mean_abs_hu"] < 0.5


def test_the_latent_model_and_the_adapter_run_on_the_body_box_and_leave_the_air_around_it_cubic(weights, chest):
    """The bundled chest is the whole field of view (air around the body): the box holds every voxel above
    -500 HU plus the margin, is smaller than the scan, and outside it ours before the projection is cubic."""
    from evaluation.interpolation import BODY_HU

    models = Models.load(*weights, torch.device("cpu"))
    thick = simulate_thick(chest, 5.0, 5.0)
    cfg = Config().interpolate.model_copy(update={"consistency": False, "adapt_steps": 30, "adapt_crop": 32})
    res = interpolate(thick, models, cfg, progress=False)
    bx, by, bz = res.box
    assert bz == slice(0, res.grid.shape[2])
    assert (bx.stop - bx.start) * (by.stop - by.start) < 0.9 * res.grid.shape[0] * res.grid.shape[1]
    outside = np.ones(res.grid.shape, bool)
    outside[res.box] = False
    assert res.cubic[outside].max() <= BODY_HU  # nothing of the body is left out...
    body = np.argwhere((res.cubic > BODY_HU).any(axis=2))
    assert body[:, 0].min() - bx.start == 32 or bx.start == 0  # ...and the margin is there
    assert by.stop - 1 - body[:, 1].max() == 32 or by.stop == res.grid.shape[1]
    np.testing.assert_array_equal(res.mean[outside], res.cubic[outside])
    assert np.abs(res.mean[res.box] - res.cubic[res.box]).mean() > 0.1  # the box is where the work is
    whole = interpolate(thick, models, cfg.model_copy(update={"body_margin": None}), progress=False)
    assert whole.box == tuple(slice(0, n) for n in res.grid.shape)

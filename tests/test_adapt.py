"""Per-scan adaptation: reproducible, used only where it beats cubic on the scan itself, refuses scans too small
for it."""
import json

import numpy as np
import pytest
import torch

from dataset.thick import simulate_thick
from ddpm.adapt import AdaptSettings, check_adaptable, refine, slab_phase, train_adapter
from evaluation.interpolate_cli import main
from thinslice.precision import Precision

FP32 = Precision(False, "test")


@pytest.fixture(scope="module")
def thick(chest):
    return simulate_thick(chest, 5.0, 5.0)


def test_adapter_is_reproducible_under_a_seed_and_starts_as_identity(thick):
    s = AdaptSettings(steps=3, crop=32, batch=4, channels=8, layers=3, seed=7)
    a, info = train_adapter(thick, 1.0, s, FP32, progress=False)
    b, _ = train_adapter(thick, 1.0, s, FP32, progress=False)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    assert info["steps"] == 3 and info["pair_stacks"] == 4  # two in-plane axes x two slab phases
    untrained, _ = train_adapter(thick, 1.0, AdaptSettings(steps=0, crop=32, channels=8, layers=3), FP32, progress=False)
    cubic = np.random.default_rng(0).normal(-500, 300, (40, 36, 20)).astype(np.float32)
    np.testing.assert_array_equal(refine(untrained, cubic, 1.0, 5.0, FP32, progress=False), cubic)


def test_refine_works_plane_by_plane(thick):
    """The refined volume does not depend on how many planes go through the network at once."""
    net, _ = train_adapter(thick, 1.0, AdaptSettings(steps=2, crop=32, batch=2, channels=8, layers=3), FP32, progress=False)
    cubic = np.random.default_rng(1).normal(-500, 300, (24, 20, 15)).astype(np.float32)
    a = refine(net, cubic, 1.0, 5.0, FP32, planes_per_batch=1, progress=False)
    b = refine(net, cubic, 1.0, 5.0, FP32, planes_per_batch=64, progress=False)
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert np.abs(a - cubic).max() > 0


def test_slab_phase_is_the_position_within_the_slab():
    np.testing.assert_allclose(slab_phase(10, 1.0, 5.0)[:5], [-0.4, -0.2, 0.0, 0.2, 0.4], atol=1e-6)
    np.testing.assert_allclose(slab_phase(10, 1.0, 5.0)[5:], slab_phase(10, 1.0, 5.0)[:5])


def test_too_small_a_scan_is_refused_before_any_work(thick):
    small = thick.with_array(np.asarray(thick.array)[:40, :40])
    with pytest.raises(ValueError, match="too small for adaptation"):
        check_adaptable(small, 1.0, 64)


@pytest.mark.slow
def test_cli_adapt_reports_both_and_keeps_cubic_unless_it_wins_on_the_scan(weights, bundled_cache, tmp_path, capsys):
    """The adapter is used only when it beats cubic on the scan's own held-out in-plane pairs; when it is not,
    the written output is exactly the unadapted one, and when it is, the two differ."""
    ae, unet = weights
    out = tmp_path / "out"
    assert main(["--split", "test", "--cache", str(bundled_cache), "--output", str(out), "--autoencoder", str(ae),
                 "--unet", str(unet), "--adapt", "4"]) == 0
    methods = json.loads((out / "summary.json").read_text())["methods"]
    assert {"ours without adaptation", "ours without adaptation + consistency"} <= set(methods)
    case = json.loads((out / "cases.json").read_text())[0]
    a = case["adaptation"]
    assert a["steps"] == 4 and "adapt" in case["seconds"]
    assert "adaptation:" in capsys.readouterr().out
    # `use` is the self-check's verdict (its figures are rounded to 0.01 HU here, so a tie may go either way)
    adapted, cubic = a["check_l1_hu_adapted"], a["check_l1_hu_cubic"]
    assert adapted <= cubic if a["use"] else adapted >= cubic
    # residual decoding is additive, so without the adapter's change 'ours' is 'ours without adaptation' in every
    # figure (both unrounded, before the consistency step); with it they differ
    same = all(methods["ours"][k] == pytest.approx(v, rel=1e-6, abs=1e-6)
               for k, v in methods["ours without adaptation"].items())
    assert same != a["use"], a


def test_cli_falls_back_with_a_message_when_the_scan_is_too_small(weights, tmp_path, capsys):
    import nibabel as nib

    from conftest import THICK

    img = nib.load(THICK)
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:48, :48], img.affine), small)
    ae, unet = weights
    assert main(["--input", str(small), "--output", str(tmp_path / "out"), "--autoencoder", str(ae), "--unet", str(unet),
                 "--adapt", "5"]) == 0
    assert "too small for adaptation" in capsys.readouterr().out and (tmp_path / "out" / "small.nii.gz").exists()

"""The cascade (latents.cond_adapt_steps): training pairs conditioned as interpolation conditions a scan when its
U-Net was trained that way, the condition kind carried from the latent index to the exported weights."""
import dataclasses

import numpy as np
import pytest
import torch

from dataset.cache import CachedCase
from dataset.thick import simulate_thick
from ddpm.adapt import AdaptSettings, refine, train_adapter
from ddpm.pair_crops import pair_condition, pair_volumes
from evaluation.interpolation import Models, interpolate
from thinslice.config import InterpolateConfig, LatentsConfig
from thinslice.precision import Precision

FP32 = Precision(False, "test")


def test_a_z_pairs_condition_is_what_interpolation_makes_of_its_thick_scan(chest_block):
    """Train as you infer: the pair's condition equals cubic + adapter of interpolation run on the pair's thick scan
    (--unet none, no consistency step, the whole field of view)."""
    case = CachedCase("c", chest_block, simulate_thick(chest_block, 5.0, 5.0), {})
    cfg = LatentsConfig(z_slabs_mm=(5.0,), z_phases=1, inplane=False, crops_per_pair=1, cond_adapt_steps=40)
    describe, cond, _ = next(pair_volumes(case, cfg))
    ours = pair_condition(case, describe, cond, cfg, FP32)
    icfg = InterpolateConfig(adapt_steps=40, spacing_mm=describe["thin_mm"], consistency=False, body_margin=None)
    res = interpolate(simulate_thick(chest_block, 5.0, 5.0), Models.load("unused.pt", "none", "cpu", FP32), icfg,
                      progress=False)
    assert res.adapt_info["use"], "the adapter was not used: this test would not see it"
    assert ours.shape == cond.shape == res.mean.shape
    np.testing.assert_allclose(ours, res.mean, atol=1e-3)
    assert np.abs(ours - cond).max() > 5


def test_refining_along_both_directions_is_the_mean_of_each(chest):
    thick = simulate_thick(chest, 5.0, 5.0)
    net, _ = train_adapter(thick, 1.0, AdaptSettings(steps=3, crop=32, batch=2, channels=8, layers=3), FP32,
                           progress=False)
    cubic = np.random.default_rng(2).normal(-500, 300, (24, 20, 15)).astype(np.float32)
    both = refine(net, cubic, 1.0, 5.0, FP32, progress=False)
    coronal = refine(net, cubic, 1.0, 5.0, FP32, progress=False, directions=(1,))
    sagittal = refine(net, cubic, 1.0, 5.0, FP32, progress=False, directions=(0,))
    np.testing.assert_allclose(both, (coronal + sagittal) / 2, atol=1e-3)
    assert np.abs(coronal - sagittal).max() > 1e-3


@pytest.fixture(scope="module")
def block(thick_block):
    return thick_block  # 16 slices: fewer than a U-Net training crop is deep


@pytest.mark.parametrize("condition", ["cubic", "adapted"])
def test_a_cascade_unet_is_conditioned_on_the_adapted_volume(block, weights, condition):
    models = dataclasses.replace(Models.load(*weights, "cpu", FP32), condition=condition)
    cfg = InterpolateConfig(adapt_steps=40, adapt_crop=32)
    res = interpolate(block, models, cfg, progress=False)
    assert res.adapt_info["use"] and np.abs(res.adaptation).max() > 5
    base = res.cubic + res.adaptation if condition == "adapted" else res.cubic
    expected = models.inferer(cfg).condition(np.ascontiguousarray(base[res.box])).latent
    torch.testing.assert_close(res.cond, expected)


def test_the_condition_kind_travels_from_the_checkpoint_to_the_models(weights, tmp_path):
    ae, unet = weights
    state = torch.load(unet, weights_only=True)
    assert Models.load(ae, unet, "cpu", FP32).condition == "cubic"  # a U-Net saved before the cascade existed
    state["condition"] = "adapted"
    path = tmp_path / "cascade.pt"
    torch.save(state, path)
    assert Models.load(ae, path, "cpu", FP32).condition == "adapted"

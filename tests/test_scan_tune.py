"""Per-scan tuning of the latent U-Net (ddpm/scan_tune.py, interpolate.unet_tune_steps) on real CT."""
import dataclasses

import numpy as np
import pytest
import torch

from ddpm.scan_tune import deep_enough
from evaluation.interpolation import Models, interpolate, tune_models
from thinslice.config import InterpolateConfig
from thinslice.precision import Precision

FP32 = Precision(False, "test")


@pytest.fixture(scope="module")
def block(thick_block):
    return thick_block  # 16 slices: fewer than a U-Net training crop is deep


def test_a_shallow_scan_is_mirrored_to_the_depth_a_crop_needs(block):
    deep = deep_enough(block, 40)
    a = np.asarray(block.array)
    assert deep.shape == block.shape[:2] + (40,)
    np.testing.assert_array_equal(deep.array[..., :16], a)
    np.testing.assert_array_equal(deep.array[..., 16:32], a[..., ::-1])
    np.testing.assert_array_equal(deep.array[..., 32:], a[..., :8])
    np.testing.assert_array_equal(deep.affine, block.affine)
    assert deep_enough(block, 16) is block


def test_tuning_trains_a_copy_on_the_scans_own_pairs_and_the_sample_uses_it(block, weights):
    models = Models.load(*weights, "cpu", FP32)
    ucfg = models.unet_config
    models = dataclasses.replace(models, unet_config=ucfg.model_copy(update={
        "unet_train": ucfg.unet_train.model_copy(update={"crop_size": (16, 16, 8)})}))
    before = {k: v.clone() for k, v in models.unet.state_dict().items()}
    cfg = InterpolateConfig(adapt_steps=0, unet_tune_steps=40, unet_tune_lr=2e-3, window=(16, 16, 8))
    tuned, info = tune_models(block, models, cfg, progress=False)
    assert tuned.unet is not models.unet
    assert all(torch.equal(before[k], v) for k, v in models.unet.state_dict().items()), "loaded weights changed"
    assert info["crops"] > 0 and info["loss_last"] < 0.9 * info["loss_first"], info
    assert any(not torch.equal(before[k], v) for k, v in tuned.unet.state_dict().items())
    res = interpolate(block, models, cfg, progress=False)
    assert res.tune_info == {**info, "seconds": res.tune_info["seconds"]}  # seeded: the same tuning again
    assert "tune" in res.seconds
    plain = interpolate(block, models, cfg.model_copy(update={"unet_tune_steps": 0}), progress=False)
    assert plain.tune_info is None and np.abs(res.mean - plain.mean).max() > 1.0  # the tuned net sampled

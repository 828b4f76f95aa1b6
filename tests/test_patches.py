import numpy as np
import torch
import torchio as tio

from dataset.cache import read_manifest
from dataset.intensity import hu_to_unit, unit_to_hu
from dataset.patches import RandomHUJitter, patch_queue
from thinslice.config import parse_config


def case_dirs(cache):
    return [cache / "cases" / c["case_id"] for c in read_manifest(cache)["cases"]]


def test_bundled_cache_has_the_expected_cases(bundled_cache):
    manifest = read_manifest(bundled_cache)
    splits = {c["case_id"]: c["split"] for c in manifest["cases"]}
    assert splits["thin__lidc-idri-0314_chest_1.0mm_crop-z88-168_inplane2x"] == "test"
    assert "dicom__totalseg-s3_abdomen_2mm" in splits


def test_patches_come_from_the_body_and_keep_hu(bundled_cache):
    cfg = parse_config({"data": {"patches": {"size": [32, 32, 32], "samples_per_volume": 4,
                                             "queue_length": 16}}}).data
    torch.manual_seed(0)
    loader = torch.utils.data.DataLoader(patch_queue(case_dirs(bundled_cache), cfg, augment=False), batch_size=4)
    volumes = {}
    for i, batch in enumerate(loader):
        x = batch["thin"][tio.DATA]
        assert x.shape == (4, 1, 32, 32, 32) and x.min() >= -1 and x.max() <= 1
        for patch, loc, cid in zip(x, batch[tio.LOCATION], batch["case_id"]):
            if cid not in volumes:
                volumes[cid] = tio.ScalarImage(bundled_cache / "cases" / cid / "thin.nii").numpy()[0]
            vol = volumes[cid]
            i0, j0, k0, i1, j1, k1 = loc.tolist()
            if k1 <= vol.shape[2]:  # unpadded: the patch is exactly the windowed HU at its location
                expect = hu_to_unit(vol[i0:i1, j0:j1, k0:k1].astype(np.float32), cfg.hu_window)
                assert np.allclose(patch[0].numpy(), expect, atol=1e-6)
            centre = unit_to_hu(patch[0, 16, 16, 16].item(), cfg.hu_window)
            assert centre > cfg.patches.body_threshold_hu  # centres drawn from the body mask
        if i == 3:
            break


def test_thin_volumes_smaller_than_a_patch_are_padded_with_air(bundled_cache):
    cfg = parse_config({"data": {"patches": {"size": [64, 64, 64], "samples_per_volume": 2,
                                             "queue_length": 4}}}).data
    dicom_case = [bundled_cache / "cases" / "dicom__totalseg-s3_abdomen_2mm"]  # 20 slices only
    patch = next(iter(torch.utils.data.DataLoader(patch_queue(dicom_case, cfg, augment=False), batch_size=1)))
    x = patch["thin"][tio.DATA][0, 0]
    assert x.shape == (64, 64, 64)
    assert torch.all(x[:, :, :22] == -1) and torch.all(x[:, :, -22:] == -1)  # 44 slices of air, centred


def test_hu_jitter_is_a_small_affine_change():
    torch.manual_seed(1)
    hu = torch.linspace(-1000, 1000, 1000).reshape(1, 10, 10, 10)
    subject = tio.Subject(thin=tio.ScalarImage(tensor=hu.clone()))
    out = RandomHUJitter(shift_hu=10, scale=0.02)(subject)["thin"].data
    a, b = np.polyfit(hu.flatten().numpy(), out.flatten().numpy(), 1)
    assert abs(a - 1) <= 0.02 + 1e-6 and abs(b) <= 10 + 1e-3
    assert not torch.equal(out, hu)

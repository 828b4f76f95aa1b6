import numpy as np
import torch
import torchio as tio

from dataset.cache import has_thin, read_manifest
from dataset.intensity import hu_to_unit, unit_to_hu
from dataset.patches import PatchStream, RandomHUJitter, patch_loader
from thinslice.config import parse_config

CFG = parse_config({}).data


def case_dirs(cache):
    return [cache / "cases" / c["case_id"] for c in read_manifest(cache)["cases"] if has_thin(c)]


def test_bundled_cache_has_the_expected_cases(bundled_cache):
    splits = {c["case_id"]: c["split"] for c in read_manifest(bundled_cache)["cases"]}
    assert splits["thin__lidc-idri-0314_chest_1.0mm_crop-z88-168_inplane2x"] == "test"
    assert splits["thin__totalseg-s1_chest_1.5mm-resampled_crop-z64-144"] == "train"  # pinned by config/demo_data.yaml
    assert "dicom__totalseg-s3_abdomen_2mm" in splits
    kinds = {c["case_id"]: c["thick_kind"] for c in read_manifest(bundled_cache)["cases"]}
    assert kinds["thick__elastix-3dct-lung_chest_5mm-downsampled"] == "thick-only"  # trains the U-Net only


def test_patches_come_from_the_body_and_keep_hu(bundled_cache):
    stream = PatchStream(case_dirs(bundled_cache), CFG, size=(32, 32, 32), augment=False)
    volumes = {}
    for i in range(24):
        item = stream[i]
        x = item["image"]
        assert x.shape == (1, 32, 32, 32) and x.min() >= -1 and x.max() <= 1
        cid = item["case_id"]
        if cid not in volumes:
            volumes[cid] = tio.ScalarImage(bundled_cache / "cases" / cid / "thin.nii").numpy()[0]
        vol = volumes[cid]
        x0, y0, z0 = item["location"].tolist()
        if vol.shape[2] >= 32:  # unpadded: the patch is exactly the windowed HU at its location
            expect = hu_to_unit(vol[x0:x0 + 32, y0:y0 + 32, z0:z0 + 32].astype(np.float32), CFG.hu_window)
            assert np.allclose(x[0].numpy(), expect, atol=1e-6)
        assert (unit_to_hu(x, CFG.hu_window) > CFG.patches.body_threshold_hu).float().mean() > 0.05


def test_stream_is_a_pure_function_of_the_index(bundled_cache):
    a = PatchStream(case_dirs(bundled_cache), CFG, size=(32, 32, 32), seed=3)
    b = PatchStream(case_dirs(bundled_cache), CFG, size=(32, 32, 32), seed=3)
    assert torch.equal(a[17]["image"], b[17]["image"]) and not torch.equal(a[17]["image"], a[18]["image"])
    # two ranks of batch 2 read exactly the items one process of batch 4 reads, at any start step
    single = next(iter(patch_loader(a, 4, start=5)))["image"]
    ranks = [next(iter(patch_loader(a, 2, rank=r, world=2, start=5)))["image"] for r in range(2)]
    assert torch.equal(torch.cat(ranks), single)


def test_thin_volumes_smaller_than_a_patch_are_padded_with_air(bundled_cache):
    stream = PatchStream([bundled_cache / "cases" / "dicom__totalseg-s3_abdomen_2mm"], CFG, size=(64, 64, 64),
                         augment=False)  # 20 slices only
    x = stream[0]["image"][0]
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

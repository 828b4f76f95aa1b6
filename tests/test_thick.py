import numpy as np
import pytest

from dataset.errors import CaseError
from dataset.thick import simulate_thick, slab_weights, thin_grid
from dataset.volume import CTVolume


def world_z(vol: CTVolume, k: float) -> np.ndarray:
    return (vol.affine @ np.array([0, 0, k, 1.0]))[:3]


def test_integer_slabs_are_plain_means_at_the_slab_centre(chest):
    thick = simulate_thick(chest, 5.0, 5.0)
    assert thick.shape == (256, 256, 16)  # 80 slices of 1 mm -> 16 slabs of 5 mm
    assert np.allclose(thick.spacing, [1.5625, 1.5625, 5.0])
    assert thick.thickness == 5.0
    for k in (0, 7, 15):
        hand = chest.array[:, :, 5 * k:5 * k + 5].astype(np.float64).mean(axis=2)
        assert np.allclose(thick.array[:, :, k], hand, atol=1e-3)
        # slab k covers thin slices 5k..5k+4: its centre is thin slice 5k+2
        assert np.allclose(world_z(thick, k), world_z(chest, 5 * k + 2))
    assert np.allclose(thick.affine[:3, :2], chest.affine[:3, :2])


def test_fractional_slabs_weigh_cut_slices_by_overlap(small):
    # 3 mm thin, 5 mm slabs: slab 0 = [0, 5] mm over boxes [0, 3], [3, 6] -> weights 3/5, 2/5
    thick = simulate_thick(small, 5.0, 5.0)
    a = small.array.astype(np.float64)
    assert np.allclose(thick.array[..., 0], 0.6 * a[..., 0] + 0.4 * a[..., 1], atol=1e-3)
    # slab 1 = [5, 10]: box [3, 6] gives 1 mm, [6, 9] 3 mm, [9, 12] 1 mm
    assert np.allclose(thick.array[..., 1], (a[..., 1] + 3 * a[..., 2] + a[..., 3]) / 5, atol=1e-3)
    # centre of slab 0 is 2.5 mm above the lower edge, i.e. 1 mm above thin slice 0's centre
    assert np.allclose(world_z(thick, 0), world_z(small, 1.0 / 3.0))
    assert thick.shape[2] == int((112 * 3 - 5) // 5) + 1


def test_weights_rows_sum_to_one_and_short_volume_is_refused():
    W, centres = slab_weights(37, 0.8, 5.0, 4.0)
    assert np.allclose(W.sum(axis=1), 1.0)
    with pytest.raises(CaseError, match="less than one"):
        slab_weights(3, 1.0, 5.0, 5.0)


def test_rethickening_the_thin_grid_gives_back_the_thick_scan(chest):
    thick = simulate_thick(chest, 5.0, 5.0)
    affine, n = thin_grid(thick, 1.0)
    assert n == chest.shape[2]
    assert np.allclose(affine, chest.affine)  # the thin grid of a simulated thick scan is the original grid
    # any thin volume that is constant within each slab re-thickens to exactly the thick scan
    blocky = CTVolume(np.repeat(thick.array, 5, axis=2), affine)
    assert np.allclose(simulate_thick(blocky, 5.0, 5.0).array, thick.array, atol=1e-4)
    assert np.allclose(simulate_thick(blocky, 5.0, 5.0).affine, thick.affine)


def test_thin_grid_for_a_real_thick_scan_tiles_each_slab():
    thick = CTVolume(np.zeros((4, 4, 10), np.float32), np.diag([0.7, 0.7, 5.0, 1.0]))
    affine, n = thin_grid(thick, 1.0)
    assert n == 50
    z = [(affine @ [0, 0, j, 1])[2] for j in range(5)]
    assert np.allclose(z, [-2.0, -1.0, 0.0, 1.0, 2.0])  # slab 0 spans [-2.5, 2.5] mm
    affine2, n2 = thin_grid(thick, 1.25)  # even count per slab: no thin slice on the slab centre
    assert n2 == 40
    assert np.allclose([(affine2 @ [0, 0, j, 1])[2] for j in range(4)], [-1.875, -0.625, 0.625, 1.875])

"""In-plane self-supervised pairs: each is exactly what interpolation sees along the slice axis, rotated."""
import numpy as np
import pytest

from dataset.inplane_pairs import PairGeometry, inplane_pair, rethicken
from dataset.thick import simulate_thick, slab_residual
from dataset.volume import CTVolume
from evaluation.interpolation import output_grid


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("out_mm,slab_mm", [(1.0, 5.0), (1.25, 5.0), (1.0, 3.0)])
def test_pair_rethickens_to_its_condition_and_matches_interpolation(chest, axis, out_mm, slab_mm):
    """Real chest CT (0.7-1.5 mm pixels): the target's slab means are the thick slices the condition was
    resampled from, and the condition is what interpolation's own grid and cubic resampling give."""
    arr = np.asarray(chest.array, dtype=np.float32)[:, :, :8]
    geom = PairGeometry.matching(chest.spacing[axis], out_mm, slab_mm)
    cond, target = inplane_pair(arr, chest.spacing, axis, geom)
    assert cond.shape == target.shape and cond.shape[:2] == (arr.shape[1 - axis], 8)
    tvol = CTVolume(target, np.diag([1.0, 1.0, geom.thin_mm, 1.0]))
    thick = simulate_thick(tvol, geom.slab_mm, geom.slab_mm)
    grid = output_grid(thick, geom.thin_mm)  # interpolation's own thin grid
    assert grid.shape == target.shape
    np.testing.assert_allclose(thick.sample_at(grid.affine, grid.shape, order=3), cond, atol=1e-3)
    assert np.abs(slab_residual(target, thick.array, grid.weights)).max() < 1e-3  # re-thickens exactly
    np.testing.assert_allclose(rethicken(target, geom.thin_mm, geom.slab_mm), thick.array, atol=1e-3)


def test_box_average_to_the_thin_spacing_keeps_the_mean_in_mm(chest):
    """With pixels finer than the output spacing, the target is the exact mm-box average of the pixels."""
    arr = np.asarray(chest.array, dtype=np.float32)[:, :, :4]
    pixel = float(chest.spacing[0])
    geom = PairGeometry(thin_mm=pixel * 2.5, slab_mm=pixel * 12.5)
    _, target = inplane_pair(arr, chest.spacing, 0, geom)
    # thin sample 1 covers pixels [2.5, 5): half of pixel 2, all of 3 and 4
    expected = (0.5 * arr[2] + arr[3] + arr[4]) / 2.5
    np.testing.assert_allclose(target[..., 1], expected, atol=1e-2)


def test_phase_shifts_the_slab_grid(chest):
    arr = np.asarray(chest.array, dtype=np.float32)[:, :, :3]
    geom = PairGeometry.matching(chest.spacing[0], 1.0, 5.0)
    _, t0 = inplane_pair(arr, chest.spacing, 0, geom, phase=0)
    c2, t2 = inplane_pair(arr, chest.spacing, 0, geom, phase=2)
    n = t2.shape[2]
    np.testing.assert_array_equal(t2, t0[..., 2:2 + n])
    assert np.abs(rethicken(t2, geom.thin_mm, geom.slab_mm) - rethicken(t0[..., 2:], geom.thin_mm, geom.slab_mm)).max() < 1e-3


def test_coarse_pixels_keep_the_slab_to_spacing_ratio():
    geom = PairGeometry.matching(1.5625, 1.0, 5.0)
    assert geom.thin_mm == 1.5625 and geom.slab_mm == pytest.approx(5 * 1.5625)
    fine = PairGeometry.matching(0.7, 1.0, 5.0)
    assert fine.thin_mm == 1.0 and fine.slab_mm == 5.0

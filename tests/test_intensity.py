import numpy as np
import torch

from dataset.intensity import hu_to_unit, to_int16_hu, unit_to_hu


def test_round_trip_is_exact_for_every_hu_in_the_window():
    hu = np.arange(-1024, 2049, dtype=np.int16)
    x = hu_to_unit(hu.astype(np.float32)).astype(np.float32)
    assert x.min() == -1.0 and x.max() == 1.0
    assert np.array_equal(to_int16_hu(unit_to_hu(x)), hu)


def test_round_trip_on_real_ct_and_torch(chest):
    hu = chest.array
    back = to_int16_hu(unit_to_hu(hu_to_unit(torch.from_numpy(hu.astype(np.float32))).numpy()))
    assert np.array_equal(back, np.clip(hu, -1024, 2048))


def test_outside_window_is_clipped():
    x = hu_to_unit(np.array([-3024.0, 5000.0]))
    assert np.array_equal(x, [-1.0, 1.0])
    assert np.array_equal(unit_to_hu(np.array([-2.0, 3.0])), [-1024.0, 2048.0])

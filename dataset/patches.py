"""Random patches (or large crops) of the cached thin volumes for autoencoder training.

Sample i is a pure function of (seed, i): which case, where, which flips and jitter. A resumed or
multi-process run therefore sees exactly the samples an uninterrupted single run would (a
tio.Queue keeps a buffer of patches that a checkpoint cannot capture). Patch centres are drawn from
the body (HU above a threshold), so patches of empty air around the patient are rare. Augmentation
(TorchIO) keeps HU meaning: flips and a small affine HU jitter, applied before the window.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torchio as tio
from torch.utils.data import Dataset, Sampler
from torchio.transforms.augmentation import RandomTransform

from dataset.intensity import hu_to_unit
from thinslice.config import DataConfig

_CENTRE_STRIDE = 4  # body-voxel table on a coarse grid: enough for centres, 64x smaller


class RandomHUJitter(RandomTransform, tio.IntensityTransform):
    """hu' = hu * (1 + a) + b with a ~ U(-scale, scale), b ~ U(-shift_hu, shift_hu): water stays near 0."""

    def __init__(self, shift_hu: float = 10.0, scale: float = 0.02, **kwargs):
        super().__init__(**kwargs)
        self.shift_hu = shift_hu
        self.scale = scale

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        for image in self.get_images(subject):
            a = 1.0 + self.sample_uniform(-self.scale, self.scale)
            b = self.sample_uniform(-self.shift_hu, self.shift_hu)
            image.set_data(image.data.float() * a + b)
        return subject


def patch_transform(cfg: DataConfig, augment: bool = True) -> tio.Compose:
    p = cfg.patches
    steps = []
    if augment and p.flip_axes:
        steps.append(tio.RandomFlip(axes=p.flip_axes))
    if augment and (p.jitter_hu or p.jitter_scale):
        steps.append(RandomHUJitter(p.jitter_hu, p.jitter_scale))
    steps.append(tio.Lambda(partial(hu_to_unit, window=cfg.hu_window), types_to_apply=[tio.INTENSITY]))
    return tio.Compose(steps)


class PatchStream(Dataset):
    """Item i: {'image': (1, *size) tensor in [-1, 1], 'case_id', 'location': (x0, y0, z0)}.

    `size=None` returns whole volumes (use batch size 1). Volumes smaller than `size` are padded
    with air, centred.
    """

    def __init__(self, case_dirs: list[Path], cfg: DataConfig, size=None, seed: int = 0, augment: bool = True):
        if not case_dirs:
            raise ValueError("no cases to sample patches from")
        self.case_dirs = [Path(d) for d in case_dirs]
        self.cfg = cfg
        self.size = tuple(size) if size is not None else None
        self.seed = seed
        self.transform = patch_transform(cfg, augment)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return 2**62  # an endless stream; the sampler decides which items a rank reads

    def _volume(self, j: int):
        if j not in self._cache:
            arr = np.asanyarray(nib.load(self.case_dirs[j] / "thin.nii", mmap=True).dataobj)
            coarse = arr[::_CENTRE_STRIDE, ::_CENTRE_STRIDE, ::_CENTRE_STRIDE]
            centres = np.argwhere(coarse > self.cfg.patches.body_threshold_hu) * _CENTRE_STRIDE
            self._cache[j] = (arr, centres.astype(np.int32))
        return self._cache[j]

    def _crop(self, arr, centre):
        starts, pads, slices = [], [], []
        for c, n, s in zip(centre, arr.shape, self.size):
            if n >= s:
                a = int(np.clip(c - s // 2, 0, n - s))
                slices.append(slice(a, a + s))
                pads.append((0, 0))
            else:
                a = 0
                slices.append(slice(0, n))
                pads.append(((s - n) // 2, s - n - (s - n) // 2))
            starts.append(a)
        patch = np.asarray(arr[tuple(slices)], dtype=np.float32)
        if any(p != (0, 0) for p in pads):
            patch = np.pad(patch, pads, constant_values=self.cfg.hu_window[0])
        return patch, starts

    def __getitem__(self, i: int) -> dict:
        rng = np.random.default_rng([self.seed, int(i)])
        j = int(rng.integers(len(self.case_dirs)))
        arr, centres = self._volume(j)
        if self.size is None:
            patch, start = np.asarray(arr, dtype=np.float32), [0, 0, 0]
        else:
            if len(centres):
                centre = centres[rng.integers(len(centres))]
            else:
                centre = [int(rng.integers(n)) for n in arr.shape]
            patch, start = self._crop(arr, centre)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(rng.integers(2**31)))
            subject = self.transform(tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(patch)[None])))
        return {"image": subject["image"].data.float(), "case_id": self.case_dirs[j].name,
                "location": torch.tensor(start)}


class StreamSampler(Sampler):
    """Endless indices for one rank, starting at micro-batch `start`: micro-batch k of rank r holds
    items ((k * world + r) * batch ...), so a global step reads the same items for any world size
    that keeps world * batch fixed, and resuming at step s continues where the run stopped."""

    def __init__(self, batch_size: int, rank: int = 0, world: int = 1, start: int = 0):
        self.batch_size, self.rank, self.world, self.start = batch_size, rank, world, start

    def __iter__(self):
        k = self.start
        while True:
            base = (k * self.world + self.rank) * self.batch_size
            yield from range(base, base + self.batch_size)
            k += 1


def patch_loader(stream: PatchStream, batch_size: int, rank: int = 0, world: int = 1, start: int = 0,
                 num_workers: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(stream, batch_size=batch_size, num_workers=num_workers,
                                       sampler=StreamSampler(batch_size, rank, world, start),
                                       persistent_workers=num_workers > 0)

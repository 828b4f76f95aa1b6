"""Random patches of the cached thin volumes for autoencoder training (TorchIO Queue).

Patch centres are drawn from a body mask (HU above a threshold), so patches of empty air around
the patient are rare. Augmentation keeps HU meaning: left-right / front-back flips and a small
affine intensity jitter in HU (a scanner-calibration-sized change), applied before the window.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
import torchio as tio
from torchio.transforms.augmentation import RandomTransform

from dataset.cache import read_meta
from dataset.intensity import hu_to_unit
from thinslice.config import DataConfig

BODY_MAP = "body"


class AddBodyMap(tio.Transform):
    """Pad each image to at least the patch size with air and add the body mask used for sampling."""

    def __init__(self, patch_size, threshold_hu: float, air_hu: float, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = tuple(patch_size)
        self.threshold_hu = threshold_hu
        self.air_hu = air_hu

    def apply_transform(self, subject: tio.Subject) -> tio.Subject:
        image = subject["thin"]
        data = image.data.float()
        pad = [max(0, p - s) for p, s in zip(self.patch_size, data.shape[1:])]
        if any(pad):
            # centre the volume in the padded box; F.pad lists the last axis first
            data = F.pad(data, [w for p in reversed(pad) for w in (p // 2, p - p // 2)], value=self.air_hu)
            image.set_data(data)
        body = data > self.threshold_hu
        # the sampler only uses centres at least half a patch from the border
        inner = body[(slice(None),) + tuple(slice(p // 2, s - (p - 1) // 2) for p, s in zip(self.patch_size, body.shape[1:]))]
        if not inner.any():
            body = torch.ones_like(body)
        subject.add_image(tio.LabelMap(tensor=body.to(torch.uint8), affine=image.affine), BODY_MAP)
        return subject


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
    steps = [AddBodyMap(p.size, p.body_threshold_hu, cfg.hu_window[0])]
    if augment:
        if p.flip_axes:
            steps.append(tio.RandomFlip(axes=p.flip_axes))
        if p.jitter_hu or p.jitter_scale:
            steps.append(RandomHUJitter(p.jitter_hu, p.jitter_scale, include=["thin"]))
    steps.append(tio.Lambda(partial(hu_to_unit, window=cfg.hu_window), types_to_apply=[tio.INTENSITY]))
    return tio.Compose(steps)


def thin_subjects(case_dirs: list[Path]) -> list[tio.Subject]:
    subjects = []
    for d in case_dirs:
        meta = read_meta(d)
        if meta is None:
            raise FileNotFoundError(f"{d}: not a prepared case")
        subjects.append(tio.Subject(thin=tio.ScalarImage(Path(d) / "thin.nii"), case_id=meta["case_id"]))
    return subjects


def patch_queue(case_dirs: list[Path], cfg: DataConfig, augment: bool = True, num_workers: int = 0) -> tio.Queue:
    """A Queue yielding dicts whose ['thin'][tio.DATA] is a (1, *size) patch in [-1, 1]."""
    if not case_dirs:
        raise ValueError("no cases to sample patches from")
    dataset = tio.SubjectsDataset(thin_subjects(case_dirs), transform=patch_transform(cfg, augment))
    sampler = tio.WeightedSampler(cfg.patches.size, probability_map=BODY_MAP)
    return tio.Queue(dataset, max_length=cfg.patches.queue_length, samples_per_volume=cfg.patches.samples_per_volume,
                     sampler=sampler, num_workers=num_workers)

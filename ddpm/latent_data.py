"""Training data for the latent U-Net: random crops of pre-encoded cases, reproducible and resumable.

Crop k of epoch e is a pure function of (seed, e, k), whichever rank or worker draws it, so a
resumed run and a DDP run see exactly the crops an uninterrupted single run would.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils.data import Dataset, DistributedSampler


@dataclass
class LatentCase:
    case_id: str
    split: str
    thin: torch.Tensor  # (C, X, Y, Z) float32
    cond: torch.Tensor
    spacing: torch.Tensor  # (2,): thick and thin slice spacing in mm
    cond_image: torch.Tensor | None = None  # (1, X, Y, Z) unit-scale cubic crop (extra pairs only)
    kind: str = "case"  # case: the case's own pair; z or inplane: an extra pair crop
    thin_image: torch.Tensor | None = None  # (1, X, Y, Z) unit-scale target crop (extra pairs only)


def space_to_depth(image: torch.Tensor, factor, shape=None) -> torch.Tensor:
    """(B, 1, X, Y, Z) -> (B, fx*fy*fz, X/fx, Y/fy, Z/fz): every image voxel of a latent voxel as a channel,
    padded at the far end with the image's minimum (air) to a multiple of the factor, as the encoder pads;
    `shape`: cut to that latent grid (the condition latent's spatial shape)."""
    fx, fy, fz = factor
    pad = [(-s) % f for s, f in zip(image.shape[2:], factor)]
    if any(pad):
        image = F.pad(image, [0, pad[2], 0, pad[1], 0, pad[0]], value=float(image.min()))
    b, c, X, Y, Z = image.shape
    t = image.reshape(b, c, X // fx, fx, Y // fy, fy, Z // fz, fz).permute(0, 1, 3, 5, 7, 2, 4, 6)
    out = t.reshape(b, c * fx * fy * fz, X // fx, Y // fy, Z // fz)
    return out if shape is None else out[(..., *(slice(0, s) for s in shape))]


def read_index(latents: str | Path) -> dict:
    path = Path(latents) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"no latent index at {path}: run train/generate_training_latent.py first")
    return json.loads(path.read_text())


def load_latent_cases(latents: str | Path, split: str, whole: bool = True, pairs: bool = True) -> list[LatentCase]:
    """The split's latents: each case's own pair (`whole`) and its extra pair crops (`pairs`)."""
    latents = Path(latents)
    out = []
    for c in read_index(latents)["cases"]:
        if c["split"] != split:
            continue
        with safe_open(str(latents / c["file"]), "pt") as f:
            keys = set(f.keys())
            if whole and "thin" in keys:
                out.append(LatentCase(c["case_id"], c["split"], f.get_tensor("thin").float(), f.get_tensor("cond").float(),
                                      torch.tensor([c["thick_spacing"][2], c["thin_spacing"][2]], dtype=torch.float32),
                                      f.get_tensor("cond_image") if "cond_image" in keys else None))
            if pairs:
                for k, d in enumerate(json.loads(f.metadata().get("pairs", "[]"))):
                    out.append(LatentCase(f"{c['case_id']}#pair{k}", c["split"], f.get_tensor(f"pair{k}.thin").float(),
                                          f.get_tensor(f"pair{k}.cond").float(),
                                          torch.tensor([d["slab_mm"], d["thin_mm"]], dtype=torch.float32),
                                          f.get_tensor(f"pair{k}.cond_image"), d["kind"],
                                          f.get_tensor(f"pair{k}.thin_image") if f"pair{k}.thin_image" in keys else None))
    return out


class LatentSpace:
    """Maps (thin, cond) latents to what the network sees and back.

    cond is scaled by 1/std of the thin latents; the diffused x0 is either the scaled thin latent or,
    with `residual`, the scaled difference thin - cond (its own 1/std), which is mostly the detail
    the thick scan lacks.
    """

    def __init__(self, scale: float, residual: bool, residual_scale: float | None = None):
        self.scale, self.residual = float(scale), residual
        self.residual_scale = float(residual_scale) if residual_scale else None

    @classmethod
    def fit(cls, cases: list[LatentCase], residual: bool) -> "LatentSpace":
        thin = torch.cat([c.thin.flatten() for c in cases]).double()
        diff = torch.cat([(c.thin - c.cond).flatten() for c in cases]).double()
        return cls(1.0 / float(thin.std()), residual, 1.0 / float(diff.std()))

    def state_dict(self) -> dict:
        return {"scale": self.scale, "residual": self.residual, "residual_scale": self.residual_scale}

    @classmethod
    def from_state(cls, state: dict) -> "LatentSpace":
        return cls(state["scale"], state["residual"], state["residual_scale"])

    def condition(self, cond: torch.Tensor) -> torch.Tensor:
        return cond * self.scale

    def to_x0(self, thin: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return (thin - cond) * self.residual_scale if self.residual else thin * self.scale

    def to_thin(self, x0: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return cond + x0 / self.residual_scale if self.residual else x0 / self.scale


def crop_start(shape, size, gen: torch.Generator) -> tuple[int, ...]:
    return tuple(int(torch.randint(0, s - c + 1, (1,), generator=gen)) for s, c in zip(shape, size))


class RandomLatentCrops(Dataset):
    """`samples_per_case` random crops per case per epoch; call set_epoch with the sampler's."""

    def __init__(self, cases: list[LatentCase], size, samples_per_case: int, seed: int, min_length: int = 1,
                 cond_image: bool = False):
        fits = [c for c in cases if all(s >= k for s, k in zip(c.thin.shape[1:], size))]
        if not fits:
            shapes = ", ".join(f"{c.case_id} {tuple(c.thin.shape[1:])}" for c in cases) or "none"
            raise ValueError(f"no training latent is at least crop_size {tuple(size)} (latent shapes: {shapes})")
        self.cases, self.size, self.seed, self.epoch, self.cond_image = fits, tuple(size), seed, 0, cond_image
        kept = {id(c) for c in fits}
        self.skipped = [c.case_id for c in cases if id(c) not in kept]
        self.length = max(len(fits) * samples_per_case, min_length)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int) -> dict:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + k)
        case = self.cases[int(torch.randint(0, len(self.cases), (1,), generator=gen))]
        start = crop_start(case.thin.shape[1:], self.size, gen)
        sl = (slice(None),) + tuple(slice(s, s + c) for s, c in zip(start, self.size))
        out = {"thin": case.thin[sl], "cond": case.cond[sl]}
        if self.cond_image:
            f = [i // z for i, z in zip(case.cond_image.shape[1:], case.thin.shape[1:])]
            out["cond_image"] = case.cond_image[(slice(None),) + tuple(slice(s * g, (s + c) * g) for s, c, g in
                                                                       zip(start, self.size, f))].float()
        if torch.rand((), generator=gen) < 0.5:  # left-right flip: anatomy is mirror-plausible
            out = {k: v.flip(1) for k, v in out.items()}
        if self.size[0] == self.size[1] and torch.rand((), generator=gen) < 0.5:  # swap the in-plane axes
            out = {k: v.transpose(1, 2) for k, v in out.items()}
        return {**{k: v.contiguous() for k, v in out.items()}, "spacing": case.spacing}


class ResumableDistributedSampler(DistributedSampler):
    """DistributedSampler that can start part-way into an epoch (a resumed run skips what it saw)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        self.start = 0
        return iter(indices)

    def __len__(self) -> int:
        return self.num_samples - self.start

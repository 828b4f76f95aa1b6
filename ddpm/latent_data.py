"""Training data for the latent U-Net: random crops of pre-encoded cases, reproducible and resumable.

Crop k of epoch e is a pure function of (seed, e, k), whichever rank or worker draws it, so a
resumed run and a DDP run see exactly the crops an uninterrupted single run would.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset, DistributedSampler


@dataclass
class LatentCase:
    case_id: str
    split: str
    thin: torch.Tensor  # (C, X, Y, Z) float32
    cond: torch.Tensor
    spacing: torch.Tensor  # (2,): thick and thin slice spacing in mm


def read_index(latents: str | Path) -> dict:
    path = Path(latents) / "index.json"
    if not path.is_file():
        raise FileNotFoundError(f"no latent index at {path}: run train/generate_training_latent.py first")
    return json.loads(path.read_text())


def load_latent_cases(latents: str | Path, split: str) -> list[LatentCase]:
    latents = Path(latents)
    out = []
    for c in read_index(latents)["cases"]:
        if c["split"] != split:
            continue
        t = load_file(str(latents / c["file"]))
        out.append(LatentCase(c["case_id"], c["split"], t["thin"].float(), t["cond"].float(),
                              torch.tensor([c["thick_spacing"][2], c["thin_spacing"][2]], dtype=torch.float32)))
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

    def __init__(self, cases: list[LatentCase], size, samples_per_case: int, seed: int, min_length: int = 1):
        fits = [c for c in cases if all(s >= k for s, k in zip(c.thin.shape[1:], size))]
        if not fits:
            shapes = ", ".join(f"{c.case_id} {tuple(c.thin.shape[1:])}" for c in cases) or "none"
            raise ValueError(f"no training latent is at least crop_size {tuple(size)} (latent shapes: {shapes})")
        self.cases, self.size, self.seed, self.epoch = fits, tuple(size), seed, 0
        self.skipped = [c.case_id for c in cases if c not in fits]
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
        thin, cond = case.thin[sl], case.cond[sl]
        if torch.rand((), generator=gen) < 0.5:  # left-right flip: anatomy is mirror-plausible
            thin, cond = thin.flip(1), cond.flip(1)
        return {"thin": thin.contiguous(), "cond": cond.contiguous(), "spacing": case.spacing}


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

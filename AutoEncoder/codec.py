"""HU <-> latent in one place: the HU window comes from the autoencoder checkpoint, the precision from
thinslice.precision, so latent generation, U-Net validation, interpolation and the autoencoder's own
evaluation encode and decode exactly alike (no train/test shift between them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from AutoEncoder.model import PatchVolumeAutoencoder
from dataset.intensity import hu_to_unit, unit_to_hu
from thinslice.checkpoint import load_checkpoint
from thinslice.config import AutoencoderConfig
from thinslice.precision import Precision, choose


def load_autoencoder(path: str | Path, device="cpu") -> tuple[PatchVolumeAutoencoder, dict]:
    state = load_checkpoint(path)
    model = PatchVolumeAutoencoder(AutoencoderConfig.model_validate(state["config"]["autoencoder"]))
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def export_autoencoder(src: str | Path, dst: str | Path) -> dict:
    """The weights and config of an autoencoder checkpoint without optimiser, discriminator and RNG states."""
    from thinslice.atomic import atomic_path

    state = load_checkpoint(src)
    slim = {"model": state["model"], "config": state["config"], "step": state["step"], "stage": state.get("stage")}
    with atomic_path(Path(dst)) as tmp:
        torch.save({k: v for k, v in slim.items() if v is not None}, tmp)
    return slim


@dataclass
class Codec:
    model: PatchVolumeAutoencoder
    window: tuple[float, float]  # HU window of the autoencoder (its checkpoint's data.hu_window)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: Precision | None = None  # thinslice.precision.choose(device) unless given

    def __post_init__(self):
        self.device = torch.device(self.device)
        if self.precision is None:
            self.precision = choose(self.device)
        # channels-last memory: encoder and decoder about 2-3x faster on CPU (benchmarks/results/whole_scan.json)
        self.model.to(memory_format=torch.channels_last_3d)

    @classmethod
    def load(cls, path: str | Path, device="cpu", precision: Precision | None = None) -> tuple["Codec", dict]:
        model, state = load_autoencoder(path, device)
        return cls(model, tuple(state["config"]["data"]["hu_window"]), torch.device(device), precision), state

    @property
    def compression(self) -> tuple[int, int, int]:
        return self.model.compression

    def to_unit(self, hu) -> torch.Tensor:
        hu = torch.as_tensor(np.asarray(hu, dtype=np.float32)) if not torch.is_tensor(hu) else hu.float()
        return hu_to_unit(hu, self.window)

    @torch.no_grad()
    def encode(self, hu, progress: bool = False, overlap: float | None = None) -> torch.Tensor:
        """(X, Y, Z) HU (array or tensor) -> (1, C, x, y, z) float32 latent on the device; `overlap` of the
        encoding patches (None: the autoencoder's encode_overlap)."""
        x = self.to_unit(hu)[None, None].to(self.device)
        with self.precision.autocast(self.device):
            return self.model.encode_volume(x, overlap, progress=progress).float()

    @torch.no_grad()
    def decode(self, z: torch.Tensor, shape, progress: bool = False, chunk=None, halo=None) -> torch.Tensor:
        """(B, C, x, y, z) latent -> (B, 1, X, Y, Z) float32 HU on the CPU."""
        with self.precision.autocast(self.device):
            unit = self.model.decode_volume(z.to(self.device), shape=shape, progress=progress, chunk=chunk,
                                             halo=halo).float()
        return unit_to_hu(unit.cpu(), self.window)

    @torch.no_grad()
    def decode_difference(self, z: torch.Tensor, minus: torch.Tensor, shape, progress: bool = False, chunk=None,
                          halo=None) -> torch.Tensor:
        """HU(D(z)) - HU(D(minus)), (B, 1, X, Y, Z) float32 on the CPU, decoded as a pair chunk by chunk: chunks
        whose latent context is the same in both are exactly zero without decoding."""
        with self.precision.autocast(self.device):
            diff = self.model.decode_volume(z.to(self.device), shape=shape, progress=progress, chunk=chunk, halo=halo,
                                            minus=minus.to(self.device),
                                            transform=lambda y: unit_to_hu(y.float(), self.window))
        return diff.cpu()

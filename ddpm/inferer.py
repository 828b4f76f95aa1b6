"""The latent pipeline in one object, as MONAI's LatentDiffusionInferer: it owns the codec, the latent scale,
the network and the sampler, and gives the three steps everyone needs (condition, sample, residual decode).
Training validation, interpolation and the ceiling row all call it, so they condition and decode alike."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from AutoEncoder.codec import Codec
from ddpm.generate import sample_thin_latent, whole_volume_denoiser
from ddpm.latent_data import LatentSpace, space_to_depth
from ddpm.samplers import Sampler


@dataclass
class Condition:
    """What the network is conditioned on: the cubic volume's latent and (unet.cond_image) the cubic volume
    itself, space-to-depth on the latent grid (lossless)."""

    latent: torch.Tensor  # (B, C, x, y, z) unscaled
    image: torch.Tensor | None  # (B, fx*fy*fz, x, y, z) unit-scale cubic, or None


@dataclass
class LatentInferer:
    codec: Codec
    net: torch.nn.Module
    space: LatentSpace
    sampler: Sampler
    steps: int
    # wraps the network for sampling: whole volume by default, sliding windows for whole scans
    # (ddpm.generate.sliding_window_denoiser)
    denoiser: Callable | None = None
    encode_overlap: float | None = None  # patch overlap of the condition's encoding (None: the autoencoder's)

    def __post_init__(self):
        if self.denoiser is None:
            self.denoiser = whole_volume_denoiser(self.net, self.codec.precision)

    @property
    def device(self) -> torch.device:
        return self.codec.device

    @property
    def reads_image(self) -> bool:
        """unet.cond_image: the network also reads the cubic volume, one channel per image voxel of a latent voxel."""
        return self.net.cond_channels > self.net.latent_channels

    def encode(self, hu, progress: bool = False) -> torch.Tensor:
        """(X, Y, Z) HU -> (1, C, x, y, z) latent, encoded as the condition is (its patch overlap)."""
        return self.codec.encode(hu, progress, self.encode_overlap)

    def condition(self, cubic_hu, progress: bool = False, latent: torch.Tensor | None = None) -> Condition:
        """`cubic_hu`: (X, Y, Z) or (B, 1, X, Y, Z) HU; `latent`: its latent when already encoded (training
        latents), else it is encoded here."""
        hu = torch.as_tensor(np.asarray(cubic_hu, dtype=np.float32)) if not torch.is_tensor(cubic_hu) else cubic_hu
        if latent is None:
            latent = self.encode(hu if hu.ndim == 3 else hu[0, 0], progress)
        image = None
        if self.reads_image:
            unit = self.codec.to_unit(hu)
            unit = unit if unit.ndim == 5 else unit[None, None]
            image = space_to_depth(unit, self.codec.compression, latent.shape[2:]).to(self.device)
        return Condition(latent.to(self.device), image)

    @torch.no_grad()
    def sample(self, cond: Condition, spacing: torch.Tensor, generator: torch.Generator | None = None,
               progress=None) -> torch.Tensor:
        """The thin latent; `spacing`: (B, 2) thick and thin slice spacing in mm."""
        return sample_thin_latent(self.net, self.space, self.sampler, cond.latent, spacing, self.steps, generator,
                                  progress=progress, denoiser=self.denoiser, extra=cond.image)

    def decode(self, z: torch.Tensor, shape, progress: bool = False, chunk=None, halo=None) -> torch.Tensor:
        """(B, C, x, y, z) latent -> (B, 1, X, Y, Z) HU on the CPU."""
        return self.codec.decode(z, shape, progress, chunk, halo)

    def residual(self, z: torch.Tensor, cond: torch.Tensor, shape, progress: bool = False, chunk=None,
                 halo=None) -> torch.Tensor:
        """D(z) - D(cond) in HU, (B, 1, X, Y, Z) on the CPU: what the sampled latent changes in the image.
        Decoded chunk by chunk as a pair; a chunk whose latent context is the same in both is exactly zero and
        is not decoded (the decoder is deterministic and sees only that context)."""
        return self.codec.decode_difference(z, cond, shape, progress, chunk, halo)

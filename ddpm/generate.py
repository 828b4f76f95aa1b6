"""Sampling a thin latent given the condition latent: the network, the latent space and a sampler."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ddpm.latent_data import LatentSpace
from ddpm.samplers import Sampler


def pad_to_multiple(z: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Replicate-pad (B, C, X, Y, Z) at the far end so every spatial size divides `multiple`."""
    shape = tuple(z.shape[2:])
    pad = [(-s) % multiple for s in shape]
    if any(pad):
        z = F.pad(z, [0, pad[2], 0, pad[1], 0, pad[0]], mode="replicate")
    return z, shape


@torch.no_grad()
def sample_thin_latent(net, space: LatentSpace, sampler: Sampler, cond: torch.Tensor, spacing: torch.Tensor,
                       steps: int, generator: torch.Generator | None = None, bf16: bool = False, progress=None):
    """cond: (B, C, X, Y, Z) unscaled condition latent; spacing: (B, 2) mm. Returns the thin latent."""
    c, shape = pad_to_multiple(space.condition(cond), net.multiple)
    noise = torch.randn(c.shape, generator=generator, device="cpu").to(c.device)

    def model(x, t, **kw):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            return net(x, t, **kw).float()

    x0 = sampler.sample(model, c.shape, steps, generator=generator, device=c.device, noise=noise,
                        progress=progress, cond=c, spacing=spacing.to(c.device))
    x0 = x0[(slice(None), slice(None)) + tuple(slice(0, s) for s in shape)]
    return space.to_thin(x0, cond)

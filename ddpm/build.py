"""Building the network, the diffusion and the network's condition from a config: shared by training and
inference, so inference never imports the trainer (and with it TensorBoard and DDP)."""
from __future__ import annotations

import torch

from ddpm.diffusion import GaussianDiffusion
from ddpm.latent_data import LatentSpace, space_to_depth
from ddpm.schedule import cosine_alphas_cumprod
from ddpm.unet import LatentUNet
from thinslice.config import Config


def build_unet(cfg: Config, latent_channels: int, compression=None) -> LatentUNet:
    """`compression`: the autoencoder's, needed when unet.cond_image adds one channel per image voxel."""
    u = cfg.unet
    extra = 0
    if u.cond_image:
        if compression is None:
            raise ValueError("unet.cond_image needs the autoencoder's compression")
        extra = int(torch.tensor(compression).prod())
    # the schema's unet fields are LatentUNet's keyword arguments: a new setting is added in those two places only
    return LatentUNet(latent_channels, cond_channels=latent_channels + extra, **u.model_dump(exclude={"cond_image"}))


def condition_input(space: LatentSpace, cond: torch.Tensor, cond_image: torch.Tensor | None, compression) -> torch.Tensor:
    """What the network is conditioned on: the scaled condition latent, then (cond_image) the cubic volume
    space-to-depth on the latent grid. Training passes the image; sampling (ddpm.inferer) its space-to-depth."""
    extra = None if cond_image is None else space_to_depth(cond_image.to(cond.dtype), compression, cond.shape[2:])
    return network_condition(space, cond, extra)


def network_condition(space: LatentSpace, cond: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    c = space.condition(cond)
    return c if extra is None else torch.cat([c, extra.to(c)], dim=1)


def build_diffusion(cfg: Config) -> GaussianDiffusion:
    d = cfg.diffusion
    return GaussianDiffusion(cosine_alphas_cumprod(d.num_steps), d.prediction, d.min_snr_gamma)


def diffusion_loss(net, diffusion: GaussianDiffusion, space: LatentSpace, batch: dict, t, noise, bf16: bool,
                   compression=None):
    """Per-sample weighted loss of one batch: the one function training (DDP or single process) and per-scan
    tuning (ddpm.scan_tune) differentiate."""
    x0 = space.to_x0(batch["thin"], batch["cond"])

    def model(x, tt, **kw):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            return net(x, tt, **kw)

    cond = condition_input(space, batch["cond"], batch.get("cond_image"), compression)
    return diffusion.training_losses(model, x0, t, noise, cond=cond, spacing=batch["spacing"])

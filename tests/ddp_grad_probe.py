"""Run under torchrun by test_unet_trainer: each rank takes its half of a fixed global batch, one DDP
backward, rank 0 saves the averaged gradients to argv[1]."""
import sys

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ddpm.build import build_diffusion, build_unet
from ddpm.trainer import diffusion_loss
from ddpm.latent_data import LatentSpace
from thinslice.config import load_config
from thinslice.distributed import cleanup, init_distributed


def global_batch(n: int = 4) -> tuple[dict, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    thin = torch.randn(n, 8, 8, 8, 4, generator=g)
    batch = {"thin": thin, "cond": thin + 0.3 * torch.randn(thin.shape, generator=g),
             "spacing": torch.tensor([[5.0, 1.0], [5.0, 1.25], [3.0, 1.0], [5.0, 2.0]])[:n]}
    return batch, torch.randint(0, 1000, (n,), generator=g), torch.randn(thin.shape, generator=g)


def model_and_loss(cfg_path):
    cfg = load_config(cfg_path)
    torch.manual_seed(0)
    model = build_unet(cfg, 8)
    for p in model.parameters():  # leave the zero-initialised state so every layer gets a gradient
        torch.nn.init.normal_(p, std=0.05)
    return model, build_diffusion(cfg), LatentSpace(0.8, True, 2.0)


if __name__ == "__main__":
    ctx = init_distributed()
    model, diffusion, space = model_and_loss(sys.argv[2])
    net = DDP(model)
    batch, t, noise = global_batch()
    half = slice(2 * ctx.rank, 2 * ctx.rank + 2)
    mine = {k: v[half] for k, v in batch.items()}
    diffusion_loss(net, diffusion, space, mine, t[half], noise[half], bf16=False).mean().backward()
    if ctx.is_main:
        torch.save({n: p.grad for n, p in model.named_parameters()}, sys.argv[1])
    cleanup()

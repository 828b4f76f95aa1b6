"""Latent regularisers: EMA vector quantisation (MONAI) with dead-code restart, or a KL latent.

Both run in float32 outside autocast: nearest-code search and log-variances are not bf16-safe.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from monai.networks.layers.vector_quantizer import EMAQuantizer
from torch import nn


class VQBottleneck(nn.Module):
    """EMA codebook (statistics all-reduced across DDP ranks by MONAI's EMAQuantizer); codes whose
    EMA usage falls under `dead_threshold` are restarted on random encoder outputs, chosen on rank 0
    and broadcast so every rank keeps the same codebook."""

    def __init__(self, dim: int, size: int, commitment: float, decay: float, dead_threshold: float, restart_every: int):
        super().__init__()
        self.quantizer = EMAQuantizer(spatial_dims=3, num_embeddings=size, embedding_dim=dim,
                                      commitment_cost=commitment, decay=decay, ddp_sync=True)
        self.dead_threshold = dead_threshold
        self.restart_every = restart_every
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.in_channels = dim

    def forward(self, z):
        with torch.autocast(z.device.type, enabled=False):
            z = z.float()
            quantized, loss, indices = self.quantizer(z)
            counts = torch.bincount(indices.flatten(), minlength=self.quantizer.num_embeddings).float()
            probs = counts / counts.sum()
            stats = {"perplexity": torch.exp(-(probs * torch.log(probs + 1e-10)).sum()),
                     "usage": (counts > 0).float().mean()}
            if self.training:
                self.calls += 1
                if int(self.calls) % self.restart_every == 0:
                    stats["restarted"] = torch.tensor(float(self._restart_dead_codes(z)))
        return quantized, loss, stats

    @torch.no_grad()
    def _restart_dead_codes(self, z) -> int:
        q = self.quantizer
        dead = q.ema_cluster_size < self.dead_threshold
        flat = z.permute(0, 2, 3, 4, 1).reshape(-1, z.shape[1])
        pick = torch.randint(0, flat.shape[0], (q.num_embeddings,), device=z.device)
        fresh = flat[pick]
        if dist.is_available() and dist.is_initialized():
            dead = dead.to(torch.uint8)
            dist.broadcast(dead, 0)
            dead = dead.bool()
            dist.broadcast(fresh, 0)
        n = int(dead.sum())
        if n:
            q.embedding.weight.data[dead] = fresh[dead]
            q.ema_w.data[dead] = fresh[dead]
            q.ema_cluster_size.data[dead] = 1.0
        return n

    def latent(self, z):
        """Deterministic latent for a pre-quantisation tensor (nearest codes)."""
        with torch.autocast(z.device.type, enabled=False):
            indices = self.quantizer.quantize(z.float())[2]
            return self.quantizer.embed(indices)


class KLBottleneck(nn.Module):
    """z ~ N(mu, sigma^2) in training, mu at inference; the loss is KL to N(0, 1) per element."""

    def __init__(self, dim: int, weight: float):
        super().__init__()
        self.weight = weight
        self.in_channels = 2 * dim

    def forward(self, h):
        with torch.autocast(h.device.type, enabled=False):
            mu, logvar = h.float().chunk(2, dim=1)
            logvar = logvar.clamp(-30.0, 20.0)
            kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()
            z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if self.training else mu
        return z, self.weight * kl, {"kl": kl.detach()}

    def latent(self, h):
        return h.float().chunk(2, dim=1)[0]

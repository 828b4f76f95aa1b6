"""Transformer-augmented 3D U-Net on latents (BiFlowNet-style intra-/inter-patch attention).

Conv ResBlocks with timestep (and spacing) modulation carry local detail; adaLN-Zero DiT blocks
attend within latent sub-volumes of `window`^3 tokens at the attention levels (intra-patch), and
over all tokens at the bottleneck (inter-patch, global). The condition latent (thick scan brought
onto the thin grid and encoded; optionally also that cubic volume itself, space-to-depth onto the
latent grid, which is lossless) is concatenated on channels; the thick and thin spacings are
embedded so one network serves several slice thicknesses.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def sinusoidal(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, c // 4) if c >= 8 else 1, c)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, emb_dim: int):
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv3d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.conv2 = norm(c_out), nn.Conv3d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class DiTBlock(nn.Module):
    """adaLN-Zero transformer block on (B, N, C) tokens; the gates start at zero (identity block)."""

    def __init__(self, c: int, emb_dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        hidden = int(c * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(c, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, c))
        self.ada = nn.Linear(emb_dim, 6 * c)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, tokens, emb):
        b, n, c = tokens.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(emb))[:, None].chunk(6, dim=-1)
        h = self.norm1(tokens) * (1 + scale1) + shift1
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        tokens = tokens + gate1 * self.proj(h)
        h = self.norm2(tokens) * (1 + scale2) + shift2
        return tokens + gate2 * self.mlp(h)


class WindowAttention(nn.Module):
    """DiT blocks over non-overlapping window^3 sub-volumes (window=None: all voxels, global)."""

    def __init__(self, c: int, emb_dim: int, heads: int, depth: int, window: int | None):
        super().__init__()
        self.window = window
        self.blocks = nn.ModuleList(DiTBlock(c, emb_dim, heads) for _ in range(depth))

    def forward(self, x, emb):
        b, c, X, Y, Z = x.shape
        w = self.window
        if w is None or (X <= w and Y <= w and Z <= w):
            tokens, n_win = x.flatten(2).transpose(1, 2), 1
        else:
            if X % w or Y % w or Z % w:
                raise ValueError(f"feature map {X}x{Y}x{Z} is not a multiple of the attention window {w}")
            t = x.view(b, c, X // w, w, Y // w, w, Z // w, w).permute(0, 2, 4, 6, 3, 5, 7, 1)
            n_win = (X // w) * (Y // w) * (Z // w)
            tokens = t.reshape(b * n_win, w**3, c)
        e = emb.repeat_interleave(n_win, dim=0)
        for blk in self.blocks:
            tokens = blk(tokens, e)
        if n_win == 1 and (w is None or (X <= w and Y <= w and Z <= w)):
            return tokens.transpose(1, 2).reshape(b, c, X, Y, Z)
        t = tokens.view(b, X // w, Y // w, Z // w, w, w, w, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return t.reshape(b, c, X, Y, Z)


class LatentUNet(nn.Module):
    def __init__(self, latent_channels: int = 8, model_channels: int = 64, channel_mult=(1, 2, 4),
                 num_res_blocks: int = 2, attention_levels=(1,), window: int = 4, dit_depth: int = 1,
                 heads: int = 4, global_depth: int = 2, grad_checkpoint: bool = False, cond_channels: int | None = None):
        super().__init__()
        self.latent_channels = latent_channels
        self.cond_channels = latent_channels if cond_channels is None else cond_channels
        self.grad_checkpoint = grad_checkpoint
        self.levels = len(channel_mult)
        self.attention_levels, self.window = tuple(attention_levels), window
        emb_dim = 4 * model_channels
        self.model_channels = model_channels
        self.time_mlp = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.spacing_mlp = nn.Sequential(nn.Linear(2 * model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv3d(latent_channels + self.cond_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips = [model_channels]
        c = model_channels
        for lvl, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks = nn.ModuleList([ResBlock(c, model_channels * mult, emb_dim)])
                c = model_channels * mult
                if lvl in attention_levels:
                    blocks.append(WindowAttention(c, emb_dim, heads, dit_depth, window))
                self.down.append(blocks)
                skips.append(c)
            if lvl < self.levels - 1:
                self.down.append(nn.ModuleList([nn.Conv3d(c, c, 3, stride=2, padding=1)]))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb_dim), WindowAttention(c, emb_dim, heads, global_depth, None),
                                  ResBlock(c, c, emb_dim)])
        self.up = nn.ModuleList()
        for lvl, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                blocks = nn.ModuleList([ResBlock(c + skips.pop(), model_channels * mult, emb_dim)])
                c = model_channels * mult
                if lvl in attention_levels:
                    blocks.append(WindowAttention(c, emb_dim, heads, dit_depth, window))
                if lvl > 0 and i == num_res_blocks:
                    blocks.append(nn.Upsample(scale_factor=2, mode="nearest"))
                    blocks.append(nn.Conv3d(c, c, 3, padding=1))
                self.up.append(blocks)
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv3d(c, latent_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    @property
    def multiple(self) -> int:
        """Latent sizes must be a multiple of this: the down-sampling levels, and the attention window
        at every level that has window attention."""
        return math.lcm(2 ** (self.levels - 1), *(self.window * 2 ** lvl for lvl in self.attention_levels))

    def _run(self, blocks, h, emb):
        for blk in blocks:
            if isinstance(blk, (ResBlock, WindowAttention)):
                if self.grad_checkpoint and self.training:
                    h = checkpoint(blk, h, emb, use_reentrant=False)
                else:
                    h = blk(h, emb)
            else:
                h = blk(h)
        return h

    def forward(self, x, t, cond, spacing):
        """x: noisy latent; t: (B,) steps; cond: condition latent like x (then, with cond_image, the cubic
        volume space-to-depth on the latent grid); spacing: (B, 2) mm (thick, thin)."""
        emb = self.time_mlp(sinusoidal(t, self.model_channels))
        sp = torch.log(spacing.float().clamp(min=1e-3)) * 100.0
        emb = emb + self.spacing_mlp(torch.cat([sinusoidal(sp[:, 0], self.model_channels),
                                                sinusoidal(sp[:, 1], self.model_channels)], dim=-1))
        h = self.conv_in(torch.cat([x, cond], dim=1))
        hs = [h]
        for blocks in self.down:
            h = self._run(blocks, h, emb)
            hs.append(h)
        h = self._run(self.mid, h, emb)
        for blocks in self.up:
            h = self._run(blocks, torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)

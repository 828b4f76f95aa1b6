"""3D building blocks. Normalisation is per voxel over channels (no spatial statistics), so the
decoder is a local operator: decoding a chunk with enough context gives the one-shot result."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def channels_last(weight: torch.Tensor) -> bool:
    """Whether a model was put in channels-last memory (inference: oneDNN's 3D convolutions run about 2x faster
    on CPU, and ChannelNorm becomes one fused layer_norm)."""
    return weight.is_contiguous(memory_format=torch.channels_last_3d) and not weight.is_contiguous()


class ChannelNorm(nn.Module):
    """LayerNorm over the channel axis at every voxel."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        if x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
            # channels last (inference): one fused layer_norm over the channels, the innermost axis in memory
            return F.layer_norm(x.permute(0, 2, 3, 4, 1), (x.shape[1],), self.weight, self.bias,
                                self.eps).permute(0, 4, 1, 2, 3)
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) * torch.rsqrt(var + self.eps)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return x * self.weight.view(shape) + self.bias.view(shape)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1 = ChannelNorm(c_in)
        self.conv1 = nn.Conv3d(c_in, c_out, 3, padding=1)
        self.norm2 = ChannelNorm(c_out)
        self.conv2 = nn.Conv3d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv3d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over all voxels (scaled_dot_product_attention)."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = ChannelNorm(channels)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.proj = nn.Conv3d(channels, channels, 1)

    def forward(self, x):
        b, c, *spatial = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, -1).transpose(-1, -2).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(h.transpose(-1, -2).reshape(b, c, *spatial))


class Downsample(nn.Module):
    def __init__(self, channels: int, stride: tuple[int, int, int]):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, stride=stride, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, scale: tuple[int, int, int]):
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


def level_strides(compression: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Per-level strides for a per-axis compression, e.g. (8, 8, 4) -> (2,2,2), (2,2,2), (2,2,1)."""
    levels = max(compression).bit_length() - 1
    return [tuple(2 if c >= 2 ** (i + 1) else 1 for c in compression) for i in range(levels)]


class Encoder(nn.Module):
    def __init__(self, channels, num_res_blocks: int, out_channels: int, compression, attention: bool):
        super().__init__()
        strides = level_strides(compression)
        self.conv_in = nn.Conv3d(1, channels[0], 3, padding=1)
        blocks: list[nn.Module] = []
        c = channels[0]
        for i, width in enumerate(channels):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(c, width))
                c = width
            if i < len(strides):
                blocks.append(Downsample(c, strides[i]))
        blocks += [ResBlock(c, c)] + ([Attention(c)] if attention else []) + [ResBlock(c, c)]
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = ChannelNorm(c)
        self.conv_out = nn.Conv3d(c, out_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        if channels_last(self.conv_out.weight):
            h = h.contiguous(memory_format=torch.channels_last_3d)  # a 1-channel input cannot carry the format
        return self.conv_out(F.silu(self.norm_out(self.blocks(h))))


class Decoder(nn.Module):
    """No attention and no spatial normalisation: it must decode whole volumes in chunks exactly."""

    def __init__(self, channels, num_res_blocks: int, in_channels: int, compression):
        super().__init__()
        strides = level_strides(compression)
        c = channels[-1]
        self.conv_in = nn.Conv3d(in_channels, c, 3, padding=1)
        blocks: list[nn.Module] = [ResBlock(c, c), ResBlock(c, c)]
        for i in reversed(range(len(channels))):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(c, channels[i]))
                c = channels[i]
            if i > 0:
                blocks.append(Upsample(c, strides[i - 1]))
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = ChannelNorm(c)
        self.conv_out = nn.Conv3d(c, 1, 3, padding=1)

    def forward(self, z):
        if channels_last(self.conv_out.weight):
            z = z.contiguous(memory_format=torch.channels_last_3d)
        h = F.silu(self.norm_out(self.blocks(self.conv_in(z))))
        with torch.autocast(h.device.type, enabled=False):  # the image itself in fp32: bf16 would round it to 6 HU
            return self.conv_out(h.float())

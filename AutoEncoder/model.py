"""Patch-Volume autoencoder: encode a volume patch by patch, decode the whole latent volume.

Encoding runs the encoder on patches (MONAI sliding window, Gaussian blending of the
pre-quantisation latents where patches overlap), so memory is bounded and independent of the scan
size. Decoding sees the whole latent volume; for large scans it runs in chunks with a halo of
context at least the decoder's receptive field, which reproduces one-shot decoding.
"""
from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import nn

from AutoEncoder.blocks import Decoder, Encoder
from AutoEncoder.bottleneck import KLBottleneck, VQBottleneck
from thinslice.config import AutoencoderConfig

AIR = -1.0  # the bottom of the HU window after hu_to_unit


class PatchVolumeAutoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.regularizer == "vq":
            self.bottleneck = VQBottleneck(cfg.latent_channels, cfg.codebook_size, cfg.commitment, cfg.ema_decay,
                                           cfg.dead_code_threshold, cfg.restart_every)
        else:
            self.bottleneck = KLBottleneck(cfg.latent_channels, cfg.kl_weight)
        self.encoder = Encoder(cfg.channels, cfg.num_res_blocks, self.bottleneck.in_channels, cfg.compression,
                               cfg.encoder_attention)
        self.decoder = Decoder(cfg.channels, cfg.num_res_blocks, cfg.latent_channels, cfg.compression)

    @property
    def compression(self) -> tuple[int, int, int]:
        return self.cfg.compression

    def forward(self, x):
        """Training path on a patch: (reconstruction, regularisation loss, stats)."""
        z, reg_loss, stats = self.bottleneck(self.encoder(x))
        return self.decoder(z), reg_loss, stats

    # ---- whole volumes -------------------------------------------------------------------
    def pad_to_grid(self, x):
        """Pad (B, C, X, Y, Z) at the far end with air to a multiple of the compression."""
        pad = [(-s) % c for s, c in zip(x.shape[2:], self.compression)]
        if any(pad):
            x = F.pad(x, [0, pad[2], 0, pad[1], 0, pad[0]], value=AIR)
        return x

    @torch.no_grad()
    def encode_volume(self, x, overlap: float | None = None, progress: bool = False):
        """Latent of a whole volume (any size), encoded patch-wise. Deterministic (eval latent)."""
        x = self.pad_to_grid(x)
        roi = tuple(min(p, s) for p, s in zip(self.cfg.patch_size, x.shape[2:]))
        roi = tuple(r - r % c for r, c in zip(roi, self.compression))
        h = sliding_window_inference(x, roi, sw_batch_size=4, predictor=self.encoder,
                                     overlap=self.cfg.encode_overlap if overlap is None else overlap,
                                     mode="gaussian", padding_mode="constant", cval=AIR, progress=progress)
        return self.bottleneck.latent(h)

    def decode_volume(self, z, shape=None, chunk=None, halo: int | None = None, progress: bool = False,
                      minus=None, transform=None):
        """Decode a latent volume, in chunks when it exceeds `chunk`; crop to `shape` (X, Y, Z).

        `transform` maps each decoded chunk (e.g. to HU). `minus`: a latent of z's shape whose decoding is
        subtracted chunk by chunk, T(D(z)) - T(D(minus)), without either being kept whole; a chunk whose latent
        context is identical in both is exactly zero and is not decoded (the decoder sees only that context)."""
        chunk = tuple(chunk or self.cfg.decode_chunk)
        halo = self.cfg.decode_halo if halo is None else halo
        transform = transform or (lambda y: y)
        if minus is None and all(s <= c for s, c in zip(z.shape[2:], chunk)):
            out = transform(self.decoder(z))  # one pass (the training path: differentiable)
        else:
            out = self._decode_chunked(z, chunk, halo, progress, minus, transform)
        if shape is not None:
            out = out[(...,) + tuple(slice(0, s) for s in shape)]
        return out

    def _decode_chunked(self, z, chunk, halo, progress: bool, minus, transform):
        from tqdm import tqdm

        if minus is not None and minus.shape != z.shape:
            raise ValueError(f"decoding a difference needs latents of one shape, got {tuple(z.shape)} and "
                             f"{tuple(minus.shape)}")
        f = self.compression
        full = (z.shape[0], 1) + tuple(s * k for s, k in zip(z.shape[2:], f))
        out = None
        grids = [range(0, s, c) for s, c in zip(z.shape[2:], chunk)]
        starts = list(itertools.product(*grids))
        for start in tqdm(starts, desc="decode", unit="chunk", disable=not progress or len(starts) < 2, leave=False):
            core = [slice(a, min(a + c, s)) for a, c, s in zip(start, chunk, z.shape[2:])]
            ctx = [slice(max(0, sl.start - halo), min(s, sl.stop + halo)) for sl, s in zip(core, z.shape[2:])]
            window = (slice(None), slice(None)) + tuple(ctx)
            src = tuple(slice((c.start - x.start) * k, (c.stop - x.start) * k) for c, x, k in zip(core, ctx, f))
            dst = tuple(slice(c.start * k, c.stop * k) for c, k in zip(core, f))
            if minus is not None and torch.equal(z[window], minus[window]):
                if out is None:
                    out = z.new_empty(full, dtype=torch.float32)
                out[(slice(None), slice(None)) + dst] = 0
                continue
            y = transform(self.decoder(z[window])[(slice(None), slice(None)) + src])
            if minus is not None:
                y = y.float() - transform(self.decoder(minus[window])[(slice(None), slice(None)) + src]).float()
            if out is None:
                out = y.new_empty(full)
            out[(slice(None), slice(None)) + dst] = y
        return out

    def reconstruct_volume(self, x, overlap: float | None = None):
        """Patch-encode, volume-decode, crop back to the input size."""
        return self.decode_volume(self.encode_volume(x, overlap), shape=x.shape[2:])


def latent_shape(shape, compression) -> tuple[int, ...]:
    return tuple(math.ceil(s / c) for s, c in zip(shape, compression))

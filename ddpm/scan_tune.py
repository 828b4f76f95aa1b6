"""Per-scan tuning of the latent U-Net (issue 26): before a scan is sampled, a copy of the network trains for a few
steps on the scan's own in-plane pairs (an in-plane axis made the slice axis and averaged into slabs: the pairs the
U-Net's thick-only training cases gave it, and the ones the per-scan 2D adapter learns from), encoded by the same
autoencoder. The latent model then learns this scan's anatomy, noise and kernel itself, instead of leaving that to
the 2D adapter. Nothing is written and the loaded weights are untouched; a seed fixes the crops and the noise."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import default_collate
from tqdm import tqdm

from AutoEncoder.codec import Codec
from dataset.cache import CachedCase
from dataset.volume import CTVolume
from ddpm.build import diffusion_loss
from ddpm.diffusion import GaussianDiffusion
from ddpm.latent_data import LatentCase, LatentSpace, RandomLatentCrops
from ddpm.pair_crops import BODY_HU, pair_crops
from thinslice.config import LatentsConfig
from thinslice.precision import Precision


@dataclass
class TuneSettings:
    steps: int = 0
    lr: float = 1e-4
    batch: int = 4
    crops_per_pair: int = 12  # encoded crops per in-plane pair volume (2 axes x 2 slab phases)
    final_step_fraction: float = 0.5  # as the shipped recipe trains: the step a 1-step sample starts from
    seed: int = 0


def deep_enough(thick: CTVolume, slices: int) -> CTVolume:
    """The scan mirrored at its far end until it has `slices` slices: an in-plane pair volume's second axis is the
    scan's slice axis, and a training crop needs that many (a 16-slice crop of 5 mm slabs has too few). The mirror
    keeps real anatomy and noise on both sides of every plane; the geometry of the first slices is unchanged."""
    n = thick.shape[2]
    if n >= slices:
        return thick
    reps = -(-slices // n)
    array = np.asarray(thick.array, dtype=np.float32)
    mirrored = np.concatenate([array if k % 2 == 0 else array[..., ::-1] for k in range(reps)], axis=2)
    return thick.with_array(np.ascontiguousarray(mirrored[..., :slices]))


def scan_latent_pairs(codec: Codec, thick: CTVolume, out_spacing_mm: float, crop_size, settings: TuneSettings,
                      reads_image: bool) -> list[LatentCase]:
    """The scan's in-plane pair crops, encoded as training latents are (the autoencoder's own patch overlap)."""
    f = codec.compression
    crop_hu = tuple(int(c) * int(k) for c, k in zip(crop_size, f))
    pairs = LatentsConfig(z_slabs_mm=(), inplane=True, inplane_phases=2, output_spacing_mm=out_spacing_mm,
                          crop=crop_hu, crops_per_pair=settings.crops_per_pair, whole_train_cases=False,
                          seed=settings.seed)
    cases = []
    for crop in pair_crops(CachedCase("scan", None, deep_enough(thick, crop_hu[1]), {}), pairs, f, BODY_HU):
        image = codec.to_unit(crop.cond_hu)[None].float() if reads_image else None
        cases.append(LatentCase("scan", "tune", codec.encode(crop.thin_hu)[0].cpu(), codec.encode(crop.cond_hu)[0].cpu(),
                                torch.tensor([crop.describe["slab_mm"], crop.describe["thin_mm"]], dtype=torch.float32),
                                image, "inplane"))
    return cases


def tune_unet(net: torch.nn.Module, space: LatentSpace, diffusion: GaussianDiffusion, codec: Codec, thick: CTVolume,
              out_spacing_mm: float, crop_size, settings: TuneSettings, policy: Precision,
              progress: bool = True) -> tuple[torch.nn.Module, dict]:
    """A copy of `net` trained `settings.steps` steps on the scan's in-plane pairs (the training loss, half of each
    batch at the final step); the copy in eval mode and what happened (losses, crops, seconds)."""
    t0 = time.perf_counter()
    reads_image = net.cond_channels > net.latent_channels
    cases = scan_latent_pairs(codec, thick, out_spacing_mm, crop_size, settings, reads_image)
    if not cases:
        raise ValueError("scan too small for tuning the U-Net: no in-plane pair crop fits its training crop")
    crops = RandomLatentCrops(cases, crop_size, samples_per_case=4, seed=settings.seed, cond_image=reads_image)
    device = codec.device
    tuned = copy.deepcopy(net).train().requires_grad_(True)
    opt = torch.optim.AdamW(tuned.parameters(), lr=settings.lr)
    torch.manual_seed(settings.seed)
    n, losses, k = diffusion.num_steps, [], 0
    bar = tqdm(range(settings.steps), desc="tune the U-Net to this scan", unit="step", disable=not progress,
               mininterval=1)
    for _ in bar:
        items = []
        for _ in range(settings.batch):
            crops.set_epoch(k // len(crops))
            items.append(crops[k % len(crops)])
            k += 1
        batch = {key: v.to(device) for key, v in default_collate(items).items()}
        b = batch["thin"].shape[0]
        t = torch.randint(0, n, (b,))
        t[: round(settings.final_step_fraction * b)] = n - 1
        noise = torch.randn(batch["thin"].shape)
        loss = diffusion_loss(tuned, diffusion, space, batch, t.to(device), noise.to(device), policy.bf16,
                              codec.compression).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tuned.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    tail = max(1, min(50, len(losses) // 4))
    info = {"steps": settings.steps, "lr": settings.lr, "crops": len(cases),
            "loss_first": round(float(np.mean(losses[:tail])), 5) if losses else None,
            "loss_last": round(float(np.mean(losses[-tail:])), 5) if losses else None,
            "seconds": round(time.perf_counter() - t0, 2)}
    return tuned.eval().requires_grad_(False), info

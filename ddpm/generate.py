"""Sampling a thin latent given the condition latent: the network, the latent space and a sampler."""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference

from ddpm.build import build_unet, network_condition
from ddpm.latent_data import LatentSpace
from ddpm.samplers import Sampler
from thinslice.checkpoint import load_checkpoint
from thinslice.config import from_stored
from thinslice.precision import Precision


def pad_to_multiple(z: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Replicate-pad (B, C, X, Y, Z) at the far end so every spatial size divides `multiple`."""
    shape = tuple(z.shape[2:])
    pad = [(-s) % multiple for s in shape]
    if any(pad):
        z = F.pad(z, [0, pad[2], 0, pad[1], 0, pad[0]], mode="replicate")
    return z, shape


def _autocast(precision: Precision | None, device):
    return precision.autocast(device) if precision is not None else contextlib.nullcontext()


def whole_volume_denoiser(net, precision: Precision | None = None):
    """The network on the whole latent at once; `precision`: thinslice.precision's policy (None: fp32)."""

    def model(x, t, cond, spacing):
        with _autocast(precision, x.device):
            return net(x, t, cond, spacing).float()

    return model


def sliding_window_denoiser(net, window, overlap: float = 0.25, sw_batch_size: int = 4,
                            precision: Precision | None = None):
    """The network applied over latent windows (MONAI sliding window, Gaussian blending) at every
    denoising step, so whole scans sample in bounded memory. Batch size 1 (one scan at a time)."""

    def model(x, t, cond, spacing):
        channels = x.shape[1]

        def predictor(win):
            n = win.shape[0]
            with _autocast(precision, win.device):
                out = net(win[:, :channels], t[:1].expand(n), win[:, channels:], spacing[:1].expand(n, -1))
            return out.float()

        roi = tuple(min(w, s) for w, s in zip(window, x.shape[2:]))
        return sliding_window_inference(torch.cat([x, cond], dim=1), roi, sw_batch_size, predictor, overlap=overlap,
                                        mode="gaussian", padding_mode="replicate")

    return model


@torch.no_grad()
def sample_thin_latent(net, space: LatentSpace, sampler: Sampler, cond: torch.Tensor, spacing: torch.Tensor,
                       steps: int, generator: torch.Generator | None = None, precision: Precision | None = None,
                       progress=None, denoiser=None, extra: torch.Tensor | None = None):
    """cond: (B, C, X, Y, Z) unscaled condition latent; spacing: (B, 2) mm. Returns the thin latent.

    `denoiser` (default: the whole volume at once) wraps the network, e.g. sliding_window_denoiser.
    `extra`: more condition channels on the latent grid (the space-to-depth cubic of unet.cond_image)."""
    c = network_condition(space, cond, extra)
    c, shape = pad_to_multiple(c, net.multiple)
    x_shape = (c.shape[0], cond.shape[1]) + tuple(c.shape[2:])
    noise = torch.randn(x_shape, generator=generator, device="cpu").to(c.device)
    model = denoiser or whole_volume_denoiser(net, precision)
    x0 = sampler.sample(model, x_shape, steps, generator=generator, device=c.device, noise=noise,
                        progress=progress, cond=c, spacing=spacing.to(c.device))
    x0 = x0[(slice(None), slice(None)) + tuple(slice(0, s) for s in shape)]
    return space.to_thin(x0, cond)


def load_unet(path, device="cpu"):
    """The EMA weights of a U-Net checkpoint (best.pt or a step checkpoint): (net, latent space, config)."""
    state = load_checkpoint(path)
    cfg = from_stored(state["config"])
    weights = state["ema"]
    if "n_averaged" in weights:  # a step checkpoint holds the AveragedModel's own state dict
        weights = {k.removeprefix("module."): v for k, v in weights.items() if k != "n_averaged"}
    net = build_unet(cfg, state["latent_channels"], state.get("compression"))
    net.load_state_dict(weights)
    return net.to(device).eval(), LatentSpace.from_state(state["latent_space"]), cfg, state


def export_unet(src, dst, autoencoder=None) -> dict:
    """What inference needs from a U-Net checkpoint (EMA weights, config, latent space, the autoencoder's
    fingerprint), without optimiser, scheduler and RNG states: pretrained/unet.pt is made with this.

    `autoencoder`: (exported, trained_with): the U-Net is bound to `exported` instead, after checking that
    `trained_with` is the checkpoint its latents came from and that both hold the same weights."""
    from AutoEncoder.codec import load_autoencoder
    from thinslice.atomic import atomic_path
    from thinslice.checkpoint import file_fingerprint

    net, space, _, state = load_unet(src)
    bound = state.get("ae_fingerprint")
    if autoencoder is not None:
        exported, trained_with = autoencoder
        if bound != file_fingerprint(trained_with):
            raise ValueError(f"{src} was not trained on latents of {trained_with}")
        a, b = load_autoencoder(exported)[0].state_dict(), load_autoencoder(trained_with)[0].state_dict()
        if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
            raise ValueError(f"{exported} does not hold the weights of {trained_with}")
        bound = file_fingerprint(exported)
    slim = {"ema": net.state_dict(), "config": state["config"], "latent_channels": state["latent_channels"],
            "latent_space": space.state_dict(), "ae_fingerprint": bound, "step": state["step"],
            "compression": state.get("compression"), "condition": state.get("condition"),
            "val": state.get("val")}
    with atomic_path(Path(dst)) as tmp:
        torch.save({k: v for k, v in slim.items() if v is not None}, tmp)
    return slim

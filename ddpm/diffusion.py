"""Gaussian diffusion math, kept apart from any network (as in openai/guided-diffusion).

x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps. The network may predict eps, v or x0; every
conversion between them lives here, and so does the training loss with min-SNR weighting
(Hang et al. 2023), so samplers and trainers never touch the parameterisation.
"""
from __future__ import annotations

from typing import Callable, Literal

import torch

Prediction = Literal["eps", "v", "x0"]


def _gather(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    out = values.to(t.device)[t].float()
    return out.view(-1, *([1] * (ndim - 1)))


class GaussianDiffusion:
    def __init__(self, alphas_cumprod: torch.Tensor, prediction: Prediction = "v", min_snr_gamma: float | None = 5.0):
        self.alphas_cumprod = alphas_cumprod.double()
        self.num_steps = len(alphas_cumprod)
        self.prediction = prediction
        self.min_snr_gamma = min_snr_gamma

    def coefs(self, t, ndim):
        abar = _gather(self.alphas_cumprod, t, ndim)
        return abar.sqrt(), (1 - abar).sqrt()

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        abar = self.alphas_cumprod.to(t.device)[t]
        return (abar / (1 - abar)).float()

    def q_sample(self, x0, t, noise):
        a, s = self.coefs(t, x0.ndim)
        return a * x0 + s * noise

    def target(self, x0, noise, t):
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        a, s = self.coefs(t, x0.ndim)
        return a * noise - s * x0  # v

    def predict_x0_eps(self, x_t, t, out):
        """(x0, eps) implied by the network output at (x_t, t)."""
        a, s = self.coefs(t, x_t.ndim)
        if self.prediction == "eps":
            eps = out
            x0 = (x_t - s * eps) / a
        elif self.prediction == "x0":
            x0 = out
            eps = (x_t - a * x0) / s
        else:
            x0 = a * x_t - s * out
            eps = s * x_t + a * out
        return x0, eps

    def loss_weight(self, t):
        """min-SNR-gamma weight, written for the prediction type so every type weighs x0-error alike."""
        snr = self.snr(t)
        clipped = snr.clamp(max=self.min_snr_gamma) if self.min_snr_gamma else snr
        if self.prediction == "eps":
            return clipped / snr if self.min_snr_gamma else torch.ones_like(snr)
        if self.prediction == "v":
            return clipped / (snr + 1) if self.min_snr_gamma else torch.ones_like(snr)
        return clipped if self.min_snr_gamma else torch.ones_like(snr)

    def training_losses(self, model: Callable, x0, t, noise=None, **kwargs) -> torch.Tensor:
        """Per-sample weighted MSE between the network output and its target."""
        noise = torch.randn_like(x0) if noise is None else noise
        out = model(self.q_sample(x0, t, noise), t, **kwargs)
        mse = (out.float() - self.target(x0, noise, t)).pow(2).flatten(1).mean(1)
        return self.loss_weight(t) * mse

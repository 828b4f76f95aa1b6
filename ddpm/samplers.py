"""Samplers over any subset of the training timesteps, chosen at sampling time (no retraining).

DDPM is ancestral sampling on the respaced chain (betas recomputed from abar at the kept steps, as
guided-diffusion's respacing); DDIM (eta = 0: deterministic) jumps between the kept steps. Both share
one small interface: `timesteps(n)` and `sample(model, shape, n, generator)`.
"""
from __future__ import annotations

from typing import Callable

import torch

from ddpm.diffusion import GaussianDiffusion


def respaced_timesteps(num_train: int, num_steps: int) -> torch.Tensor:
    """Evenly spaced training steps, descending, always ending at t = 0."""
    if not 1 <= num_steps <= num_train:
        raise ValueError(f"sampling steps must be in [1, {num_train}], got {num_steps}")
    return torch.linspace(num_train - 1, 0, num_steps).round().long()


class Sampler:
    def __init__(self, diffusion: GaussianDiffusion, clip_x0: float | None = None):
        self.diffusion = diffusion
        self.clip_x0 = clip_x0

    def timesteps(self, num_steps: int) -> torch.Tensor:
        return respaced_timesteps(self.diffusion.num_steps, num_steps)

    def _x0_eps(self, model, x, t, kwargs):
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        x0, eps = self.diffusion.predict_x0_eps(x, tt, model(x, tt, **kwargs).float())
        if self.clip_x0 is not None:
            x0 = x0.clamp(-self.clip_x0, self.clip_x0)
            a, s = self.diffusion.coefs(tt, x.ndim)
            eps = (x - a * x0) / s
        return x0, eps

    @torch.no_grad()
    def sample(self, model: Callable, shape, num_steps: int, generator: torch.Generator | None = None,
               device="cpu", noise: torch.Tensor | None = None, progress=None, **kwargs) -> torch.Tensor:
        x = noise if noise is not None else torch.randn(shape, generator=generator, device=device)
        steps = self.timesteps(num_steps).tolist()
        it = progress(range(len(steps))) if progress else range(len(steps))
        for i in it:
            t, t_prev = steps[i], (steps[i + 1] if i + 1 < len(steps) else -1)
            x = self.step(model, x, t, t_prev, generator, kwargs)
        return x


class DDIMSampler(Sampler):
    def __init__(self, diffusion: GaussianDiffusion, eta: float = 0.0, clip_x0: float | None = None):
        super().__init__(diffusion, clip_x0)
        self.eta = eta

    def step(self, model, x, t, t_prev, generator, kwargs):
        x0, eps = self._x0_eps(model, x, t, kwargs)
        abar = self.diffusion.alphas_cumprod
        a_t = float(abar[t])
        a_prev = float(abar[t_prev]) if t_prev >= 0 else 1.0
        sigma = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x = a_prev ** 0.5 * x0 + max(0.0, 1 - a_prev - sigma**2) ** 0.5 * eps
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device)
        return x


class DDPMSampler(Sampler):
    def step(self, model, x, t, t_prev, generator, kwargs):
        x0, _ = self._x0_eps(model, x, t, kwargs)
        abar = self.diffusion.alphas_cumprod
        a_t = float(abar[t])
        a_prev = float(abar[t_prev]) if t_prev >= 0 else 1.0
        beta = 1 - a_t / a_prev  # the respaced chain's beta between the two kept steps
        mean = (a_prev ** 0.5 * beta / (1 - a_t)) * x0 + ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a_t)) * x
        if t_prev < 0:
            return mean
        var = beta * (1 - a_prev) / (1 - a_t)
        return mean + var**0.5 * torch.randn(x.shape, generator=generator, device=x.device)


SAMPLERS = {"ddim": lambda diffusion, eta, **kw: DDIMSampler(diffusion, eta, **kw),
            "ddpm": lambda diffusion, eta, **kw: DDPMSampler(diffusion, **kw)}  # DDPM is always fully stochastic


def make_sampler(name: str, diffusion: GaussianDiffusion, eta: float = 0.0, **kw) -> Sampler:
    """By name (SAMPLERS); `eta` is DDIM's. An unknown name is an error, never a silent fallback."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    return SAMPLERS[name](diffusion, eta, **kw)

"""Noise schedules: alphas_cumprod over T training steps."""
from __future__ import annotations

import math

import torch


def cosine_alphas_cumprod(num_steps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule, as float64 alpha-bar_t for t = 0 .. T-1."""
    f = lambda t: math.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(num_steps)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), dim=0)

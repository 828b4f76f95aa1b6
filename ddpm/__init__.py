"""Latent diffusion: schedules, samplers and the transformer-augmented 3D U-Net (issue 4)."""

"""Train the latent diffusion U-Net on pre-encoded latents.

  python train/train_unet_latent.py --config config/cpu.yaml --latents LATENTS --output runs/unet
  torchrun --nproc_per_node=8 train/train_unet_latent.py --config config/cluster.yaml --latents LATENTS --output runs/unet

Rerunning the same command resumes from the run folder's latest checkpoint.
"""
import sys

from ddpm.trainer import main

if __name__ == "__main__":
    sys.exit(main())

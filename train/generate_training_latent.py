"""Pre-encode every case of a prepared cache into the latent dataset (python or torchrun).

  python train/generate_training_latent.py --cache CACHE --checkpoint runs/ae_stage2/checkpoints/best.pt --output LATENTS
"""
import sys

from ddpm.latents import main

if __name__ == "__main__":
    sys.exit(main())

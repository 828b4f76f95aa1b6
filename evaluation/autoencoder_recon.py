"""Score autoencoder reconstructions (patch-encode, volume-decode) of a prepared split.

  python evaluation/autoencoder_recon.py --checkpoint runs/ae_stage1/checkpoints/best.pt --cache CACHE --split test
"""
import sys

from AutoEncoder.evaluate import main

if __name__ == "__main__":
    sys.exit(main())

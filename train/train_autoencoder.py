"""Train the patch-volume autoencoder.

  python train/train_autoencoder.py --config config/cpu.yaml --cache CACHE --output runs/ae_stage1
  torchrun --nproc_per_node=8 train/train_autoencoder.py --config config/cluster_autoencoder_stage2.yaml ...

Rerunning the same command resumes from the run folder's latest checkpoint.
"""
import sys

from AutoEncoder.trainer import main

if __name__ == "__main__":
    sys.exit(main())

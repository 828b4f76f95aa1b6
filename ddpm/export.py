"""Command line: export the EMA U-Net of a training checkpoint for inference (pretrained/unet.pt is made so)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ddpm.generate import export_unet


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Export the EMA U-Net of a training checkpoint for inference.")
    p.add_argument("checkpoint", type=Path, help="best.pt or step_*.pt of train/train_unet_latent.py")
    p.add_argument("output", type=Path, help="e.g. pretrained/unet.pt")
    p.add_argument("--autoencoder", nargs=2, type=Path, metavar=("EXPORTED", "TRAINED_WITH"),
                   help="bind to an exported autoencoder holding the same weights as the one the latents came from")
    args = p.parse_args(argv)
    slim = export_unet(args.checkpoint, args.output, args.autoencoder)
    print(f"{args.output}: step {slim['step']}, {args.output.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

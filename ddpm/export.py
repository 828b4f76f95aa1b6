"""Command line: export the EMA U-Net of a training checkpoint for inference (pretrained/unet.pt is made so).

  python -m ddpm.export UNET_RUN/checkpoints/best.pt OUT/unet.pt --export-autoencoder AE_RUN/checkpoints/best.pt OUT/autoencoder.pt

writes both weight files a release needs in one step (the autoencoder without its optimiser and discriminator, the
U-Net bound to that exported file), so a cluster's last job (kub_files/export-job.yaml) is what gets shipped.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ddpm.generate import export_unet


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m ddpm.export",
                                description="Export the EMA U-Net of a training checkpoint for inference.")
    p.add_argument("checkpoint", type=Path, help="best.pt or step_*.pt of train/train_unet_latent.py")
    p.add_argument("output", type=Path, help="e.g. pretrained/unet.pt")
    bind = p.add_mutually_exclusive_group()
    bind.add_argument("--autoencoder", nargs=2, type=Path, metavar=("EXPORTED", "TRAINED_WITH"),
                      help="bind to an exported autoencoder holding the same weights as the one the latents came from")
    bind.add_argument("--export-autoencoder", nargs=2, type=Path, metavar=("TRAINED_WITH", "EXPORTED"),
                      help="export the autoencoder checkpoint the latents came from to EXPORTED first, then bind to it")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    autoencoder = args.autoencoder
    if args.export_autoencoder:
        from AutoEncoder.codec import export_autoencoder

        trained_with, exported = args.export_autoencoder
        export_autoencoder(trained_with, exported)
        print(f"{exported}: autoencoder from {trained_with}, {exported.stat().st_size / 2**20:.1f} MiB")
        autoencoder = (exported, trained_with)
    slim = export_unet(args.checkpoint, args.output, autoencoder)
    print(f"{args.output}: step {slim['step']}, {args.output.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Interpolate thick CT into thin slices and, where the thin truth is known, score against linear and cubic.

  python evaluation/interpolate.py --input thick_scan.nii.gz --output out/
  python evaluation/interpolate.py --split test --cache CACHE --output out/ --autoencoder AE.pt --unet UNET.pt

With no weights named (flags or the config's `interpolate` section) the ones in pretrained/ are used.
"""
import sys

from evaluation.interpolate_cli import main

if __name__ == "__main__":
    sys.exit(main())

"""Learnability check: can the U-Net fit one case it is allowed to memorise?

Makes a latent view in which one case of LATENTS is the whole training set and its own z-pair crops
at one slab thickness are the validation set, so the trainer's val curve (val.jsonl: ours, cubic,
and the perfect-U-Net ceiling, all on crops of that same case) shows how close and how fast the
network gets to what the autoencoder allows. If it cannot approach the ceiling here, the cause is in
the model or the loss, not in the amount of data.

  python benchmarks/learnability.py LATENTS CASE_ID OUT [--slab 5 --val-crops 8]
  python train/train_unet_latent.py --config config/cpu.yaml --latents OUT --output runs/learn
"""
from __future__ import annotations

import argparse
from pathlib import Path

from ddpm.learnability import make_view


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("latents", type=Path)
    p.add_argument("case_id")
    p.add_argument("output", type=Path)
    p.add_argument("--slab", type=float, default=5.0, help="slab thickness of the validation crops (mm)")
    p.add_argument("--val-crops", type=int, default=8)
    a = p.parse_args(argv)
    view = make_view(a.latents, a.case_id, a.output, a.slab, a.val_crops)
    print(f"{a.output / 'index.json'}: train = {a.case_id} ({view['cases'][0]['pairs']} pair crops), "
          f"val = {view['cases'][1]['pairs']} of its own {a.slab:g} mm z crops")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

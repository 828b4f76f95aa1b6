"""Command line: reconstruction quality of whole cached volumes (patch-encode, volume-decode), in HU windows."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from AutoEncoder.codec import load_autoencoder
from AutoEncoder.reconstruction import reconstruct_case
from dataset.cache import cases_in_split
from thinslice import precision
from thinslice.config import AETrainConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Score autoencoder reconstructions of whole cached volumes.")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--cache", required=True, type=Path)
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--output", type=Path, default=None, help="write metrics JSON here")
    args = p.parse_args(argv)
    try:
        model, state = load_autoencoder(args.checkpoint)
        cases = cases_in_split(args.cache, args.split)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    window = tuple(state["config"]["data"]["hu_window"])
    device = torch.device("cpu")
    policy = precision.for_loop(device, AETrainConfig.model_validate(state["config"]["ae_train"]))
    print(f"precision: {policy}")  # the trainer's own rule, so this reproduces its validation figures
    results = {}
    for d in cases:
        t = time.time()
        metrics, _ = reconstruct_case(model, d, window, device, policy.bf16)
        metrics["seconds"] = round(time.time() - t, 1)
        results[d.name] = metrics
        print(f"{d.name}: PSNR {metrics['psnr']:.2f} dB, lung {metrics['psnr_lung']:.2f} dB, "
              f"SSIM {metrics['ssim']:.4f}, MAE {metrics['mae_hu']:.1f} HU ({metrics['seconds']} s)")
    if args.output:
        args.output.write_text(json.dumps({"checkpoint": str(args.checkpoint), "step": state["step"],
                                           "cases": results}, indent=2))
    return 0

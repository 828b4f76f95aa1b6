"""Reconstruction quality of whole cached volumes (patch-encode, volume-decode), in HU windows."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from AutoEncoder.codec import load_autoencoder
from AutoEncoder.model import PatchVolumeAutoencoder
from dataset.cache import cases_in_split, load_case
from dataset.intensity import hu_to_unit, unit_to_hu
from thinslice.checkpoint import load_checkpoint
from thinslice import precision
from thinslice.config import AETrainConfig, AutoencoderConfig
from thinslice.images import midplane_panel
from thinslice.metrics import LUNG_WINDOW, mae_hu, psnr, ssim_axial


@torch.no_grad()
def reconstruct_case(model: PatchVolumeAutoencoder, case_dir: Path, hu_window, device, bf16: bool = False):
    """Returns (metrics, panel): PSNR on [-1024, 2048] and lung window, axial SSIM, MAE in HU."""
    thin = load_case(case_dir).thin
    x = hu_to_unit(torch.from_numpy(thin.array.astype("float32")), hu_window)[None, None].to(device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        rec = model.reconstruct_volume(x).float().clamp(-1, 1)
    true_hu, rec_hu = unit_to_hu(x, hu_window).cpu(), unit_to_hu(rec, hu_window).cpu()
    metrics = {"psnr": psnr(rec_hu, true_hu), "psnr_lung": psnr(rec_hu, true_hu, LUNG_WINDOW),
               "ssim": ssim_axial(rec_hu, true_hu), "mae_hu": mae_hu(rec_hu, true_hu)}
    return metrics, midplane_panel(x[0, 0].cpu(), rec[0, 0].cpu())


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

"""How the per-scan adapter and the latent U-Net should combine, chosen on validation scans only.

  python benchmarks/combine_sweep.py THIN.nii.gz [THIN ...] --slab-slices 4 [--set interpolate.KEY=VALUE ...] --out FILE.json

Each thin scan is re-thickened (slab means of `--slab-slices` thin slices) and interpolated back to its
own spacing with the shipped weights and defaults: one run gives cubic, the adapter's change A and the
U-Net's change U (residual decoding is additive). Every output cubic + a*A + u*U, projected onto the
slabs, is scored against the truth (first and last slab excluded). a = u = 1 is today's default (the sum);
(1, 0) is --unet none, (0, 1) is --adapt 0. Never run it on the held-out test scan (LIDC-IDRI-0314).
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np

from dataset.readers import read_volume
from dataset.thick import enforce_slab_consistency, simulate_thick
from evaluation.interpolation import Models, interpolate
from evaluation.report import lung_mask, score, scored_slices
from thinslice import precision
from thinslice.atomic import write_json
from thinslice.config import InterpolateConfig, add_set_argument, load_config

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def sweep_case(path: Path, models: Models, slab_slices: int, cfg: InterpolateConfig) -> dict:
    thin = read_volume(path)
    slab = slab_slices * thin.slice_spacing
    thick = simulate_thick(thin, slab, slab)
    cfg = cfg.model_copy(update={"spacing_mm": thin.slice_spacing, "consistency": False})
    t0 = time.perf_counter()
    res = interpolate(thick, models, cfg, progress=False)
    seconds = time.perf_counter() - t0
    cubic, adapt = res.cubic, res.adaptation if res.adaptation is not None else np.zeros_like(res.cubic)
    unet = res.mean - cubic - adapt
    truth = np.asarray(thin.array, np.float32)[..., : res.grid.shape[2]]
    z = scored_slices(res.grid.shape[2], res.grid.weights)
    lungs = lung_mask(truth[..., z])
    base = score(enforce_slab_consistency(cubic, thick.array, res.grid.weights)[..., z], truth[..., z], lungs)["psnr"]
    grid = {}
    for a in WEIGHTS:
        for u in WEIGHTS:
            out = enforce_slab_consistency(cubic + a * adapt + u * unet, thick.array, res.grid.weights)
            grid[f"a={a:g} u={u:g}"] = round(score(out[..., z], truth[..., z], lungs)["psnr"] - base, 3)
    best = max(grid, key=grid.get)
    print(f"{path.name}: cubic + consistency {base:.2f} dB; sum {grid['a=1 u=1']:+.2f}, adapter only "
          f"{grid['a=1 u=0']:+.2f}, U-Net only {grid['a=0 u=1']:+.2f}, best {best} {grid[best]:+.2f}", flush=True)
    return {"case": path.name, "thin_spacing_mm": round(thin.slice_spacing, 4), "slab_mm": round(slab, 4),
            "shape": list(thin.shape), "cubic_consistency_psnr": round(base, 3), "gain_db": grid, "best": best,
            "adapt_info": res.adapt_info, "tune_info": res.tune_info, "seconds": round(seconds, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("thin", nargs="+", type=Path)
    p.add_argument("--slab-slices", type=int, default=4, help="thin slices per simulated thick slab")
    add_set_argument(p)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if any("0314" in t.name for t in a.thin):
        p.error("LIDC-IDRI-0314 is the held-out test scan: it must not take part in any choice")
    cfg = load_config(None, a.overrides).interpolate
    policy = precision.choose("cpu")
    models = Models.load(cfg.autoencoder, cfg.unet, "cpu", policy)
    cases = [sweep_case(t, models, a.slab_slices, cfg) for t in a.thin]
    mean = {k: round(float(np.mean([c["gain_db"][k] for c in cases])), 3) for k in cases[0]["gain_db"]}
    write_json(a.out, {"source": "python benchmarks/combine_sweep.py " + " ".join(str(t) for t in a.thin)
                                 + f" --slab-slices {a.slab_slices}" + "".join(f" --set {x}" for x in a.overrides),
                       "machine": {"cpu": platform.processor() or platform.machine(), "precision": str(policy)},
                       "what": "PSNR gain in dB over cubic + consistency of cubic + a*adapter + u*U-Net + consistency",
                       "cases": cases, "mean_gain_db": mean, "best_mean": max(mean, key=mean.get)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

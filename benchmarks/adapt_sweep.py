"""Per-scan adaptation on a thin scan: simulate 5 mm slabs, adapt for each N, score against the truth.

  python benchmarks/adapt_sweep.py THIN.nii.gz --steps 200 600 2000 [--crop X0 X1 Y0 Y1 Z0 Z1]

Prints PSNR (on [-1024, 2048] HU and the lung window) of cubic, cubic + consistency and the adapted
cubic with and without consistency, the first and last slab excluded, as the adaptation table of
docs/experiments.md (figures in docs/results/adapt_sweep.json). The latent model is left out.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from dataset.readers import read_volume
from dataset.thick import enforce_slab_consistency, simulate_thick
from thinslice import precision
from ddpm.adapt import AdaptSettings, refine, train_adapter
from evaluation.interpolation import output_grid
from evaluation.report import lung_mask, score, scored_slices


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("thin")
    p.add_argument("--steps", type=int, nargs="+", default=[200, 600, 2000])
    p.add_argument("--crop", type=int, nargs=6, metavar=("X0", "X1", "Y0", "Y1", "Z0", "Z1"))
    p.add_argument("--slab", type=float, default=5.0)
    a = p.parse_args(argv)
    thin = read_volume(a.thin)
    if a.crop:
        sl = tuple(slice(a.crop[2 * i], a.crop[2 * i + 1]) for i in range(3))
        shift = np.eye(4)
        shift[:3, 3] = [s.start for s in sl]
        thin = thin.with_array(np.ascontiguousarray(thin.array[sl]), thin.affine @ shift)
    thick = simulate_thick(thin, a.slab, a.slab)
    grid = output_grid(thick, thin.slice_spacing)
    cubic = thick.sample_at(grid.affine, grid.shape, 3)
    truth = np.asarray(thin.array, np.float32)[..., : grid.shape[2]]
    z = scored_slices(grid.shape[2], grid.weights)
    lungs = lung_mask(truth[..., z])

    def scored(v):
        s = score(v[..., z], truth[..., z], lungs)
        return {"psnr": round(s["psnr"], 3), "psnr_lung": round(s["psnr_lung"], 3)}

    policy = precision.choose("cpu")
    rows = {"cubic": scored(cubic), "cubic + consistency": scored(enforce_slab_consistency(cubic, thick.array, grid.weights))}
    for n in a.steps:
        net, info = train_adapter(thick, thin.slice_spacing, AdaptSettings(steps=n), policy, progress=False)
        ref = refine(net, cubic, thin.slice_spacing, thick.thickness, policy, progress=False) if info["use"] else cubic
        rows[f"adapted {n}"] = {**scored(ref), "train_s": info["seconds"]}
        rows[f"adapted {n} + consistency"] = scored(enforce_slab_consistency(ref, thick.array, grid.weights))
        print(json.dumps({f"adapted {n} + consistency": rows[f"adapted {n} + consistency"], **info}), flush=True)
    print(json.dumps({"case": a.thin, "shape": list(thin.shape), "precision": str(policy), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

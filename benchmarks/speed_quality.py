"""What a speed change costs in quality: held-out PSNR of the default output before and after it.

  python benchmarks/speed_quality.py --variant NAME [--set KEY=VALUE ...] --out benchmarks/results/speed_quality.json

Interpolates, with the shipped weights and the given `interpolate` settings, the LIDC-IDRI-0314 crops the
model card scores (bundled: data/ct, 1.56 mm pixels, the whole field of view; native: 0.78 mm pixels,
`[128:384, 128:384, 170:250]` of ../shared/data/thin/lidc-idri-0314_chest_1.0mm.nii.gz) and the whole
validation chest (../shared/data/thin/totalseg-s1_chest_1.5mm-resampled.nii.gz, 6 mm slabs), each
re-thickened as slab means. Scores ours + consistency and cubic + consistency (PSNR on [-1024, 2048] HU,
first and last slab excluded) and adds them under `--variant` to the results file, with the seconds. Speed
changes are not model choices: the 0314 figures here decide nothing but whether a change keeps quality
(issue 25: no change may cost more than 0.05 dB).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import yaml

from dataset.readers import read_volume
from dataset.thick import enforce_slab_consistency, simulate_thick
from evaluation.interpolation import Models, interpolate
from evaluation.report import lung_mask, score, scored_slices
from thinslice.atomic import write_json
from thinslice.config import InterpolateConfig
from thinslice.precision import choose, cpu_model

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data" / "thin"
CASES = {  # name: (file, crop, thin slices per slab)
    "0314 bundled": (ROOT / "data/ct/thin/lidc-idri-0314_chest_1.0mm_crop-z88-168_inplane2x.nii.gz", None, 5),
    "0314 native": (SHARED / "lidc-idri-0314_chest_1.0mm.nii.gz", (slice(128, 384), slice(128, 384), slice(170, 250)), 5),
    "val whole": (SHARED / "totalseg-s1_chest_1.5mm-resampled.nii.gz", None, 4),
}


def run_case(path: Path, crop, per_slab: int, models: Models, cfg: InterpolateConfig) -> dict:
    thin = read_volume(path)
    if crop is not None:
        shift = np.eye(4)
        shift[:3, 3] = [s.start for s in crop]
        thin = thin.with_array(np.asarray(thin.array[crop]), thin.affine @ shift)
    slab = per_slab * thin.slice_spacing
    thick = simulate_thick(thin, slab, slab)
    cfg = cfg.model_copy(update={"spacing_mm": thin.slice_spacing})
    t0 = time.perf_counter()
    res = interpolate(thick, models, cfg, progress=False)
    seconds = time.perf_counter() - t0
    truth = np.asarray(thin.array, np.float32)[..., : res.grid.shape[2]]
    z = scored_slices(res.grid.shape[2], res.grid.weights)
    lungs = lung_mask(truth[..., z])
    cubic = enforce_slab_consistency(res.cubic, thick.array, res.grid.weights)
    return {"shape": list(thin.shape), "slab_mm": round(slab, 3),
            "psnr_cubic_consistency": round(score(cubic[..., z], truth[..., z], lungs)["psnr"], 3),
            "psnr_ours_consistency": round(score(res.output[..., z], truth[..., z], lungs)["psnr"], 3),
            "seconds": round(seconds, 1), "stages": {k: round(v, 1) for k, v in res.seconds.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", required=True)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="interpolate settings (YAML values)")
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    base = InterpolateConfig()
    cfg = base.model_validate({**base.model_dump(), **overrides})
    policy = choose("cpu", cfg.bf16, cfg.cpu_bf16)
    models = Models.load(cfg.autoencoder, cfg.unet, "cpu", policy)
    rows = {}
    for name in a.cases:
        path, crop, per_slab = CASES[name]
        if not path.exists():
            print(f"{name}: {path} not found, skipped")
            continue
        rows[name] = run_case(path, crop, per_slab, models, cfg)
        r = rows[name]
        print(f"{a.variant} / {name}: ours + consistency {r['psnr_ours_consistency']:.3f} dB (cubic + consistency "
              f"{r['psnr_cubic_consistency']:.3f}) in {r['seconds']:.0f} s", flush=True)
    results = json.loads(a.out.read_text()) if a.out.exists() else {
        "source": "python benchmarks/speed_quality.py --variant NAME [--set KEY=VALUE ...] --out " + str(a.out),
        "what": "PSNR (dB, [-1024, 2048] HU, first and last slab excluded) of the default output with each speed "
                "change, shipped weights; 0314 = LIDC-IDRI-0314 (held out), val = TotalSegmentator s1",
        "variants": {}}
    results["variants"][a.variant] = {"settings": overrides, "cpu": cpu_model(), "precision": str(policy),
                                      "date": time.strftime("%Y-%m-%d"), "cases": rows}
    write_json(a.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

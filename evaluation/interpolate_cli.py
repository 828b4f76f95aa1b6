"""Command line of evaluation/interpolate.py: thick scans in, thin NIfTI and/or DICOM (HU, int16) out, and a
report against linear and cubic interpolation whenever the thin truth is known."""
from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from dataset.checks import check_ct
from dataset.dicom_write import software, write_series
from dataset.cache import cases_in_split, load_case
from dataset.errors import CaseError
from dataset.intensity import to_int16_hu
from dataset.readers import case_series, strip_source_suffix
from dataset.split import KEY_FILE, case_pseudonym, key_from_file
from dataset.volume import CTVolume
from thinslice.atomic import atomic_path, remove_partials, write_json
from thinslice.config import ConfigError, add_set_argument, load_config
from dataset.thick import enforce_slab_consistency
from thinslice.precision import choose
from evaluation.interpolation import (Models, Stages, consistency_residual, interpolate, interpolate_tiled,
                                     latent_ceiling, plan_tiles)
from evaluation.report import lung_mask, score, scored_slices, write_metrics, write_panel


def read_thick(source: Path) -> CTVolume:
    """The thickest usable series of a source (a DICOM export may also hold thin or other series)."""
    with case_series(source) as series:
        usable = [s for s in series if not s.skip_reason]
        if not usable:
            raise CaseError("; ".join(s.skip_reason for s in series) or f"{source}: no usable series")
        chosen = max(usable, key=lambda s: s.spacing or 0.0)
        if len(usable) > 1:
            print(f"{source.name}: {len(usable)} series, using the thickest: {chosen.name} ({chosen.spacing:.2f} mm)")
        return chosen.read()


def output_name(source: Path) -> str:
    return strip_source_suffix(source.name)


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        nib.save(CTVolume(array, affine).to_nifti(), tmp)


@dataclass
class Outputs:
    """What is written of each case: NIfTI and/or a DICOM series (--output-format), maybe anonymized."""

    format: str | None = None  # nifti, dicom or both; None: both for a DICOM input, else nifti
    key: bytes | None = None  # --anonymize: case names are pseudonyms under this key, and so is the DICOM patient


def save_outputs(out: Path, name: str, array: np.ndarray, affine: np.ndarray, thick: CTVolume, outputs: Outputs,
                 stage) -> list[Path]:
    """The thin int16 volume as OUT/<name>.nii.gz and/or OUT/<name>_dicom/ (a new series in the input's study)."""
    fmt = outputs.format or ("both" if thick.info.get("format") == "dicom" else "nifti")
    written = []
    if fmt in ("nifti", "both"):
        written.append(out / f"{name}.nii.gz")
        stage(f"write {written[-1]}")
        save_nifti(written[-1], array, affine)
    if fmt in ("dicom", "both"):
        written.append(out / f"{name}_dicom")
        stage(f"write {written[-1]}")
        thin = float(nib.affines.voxel_sizes(affine)[2])
        write_series(written[-1], array, affine, thick.info.get("dicom_header"),
                     f"thin {thin:g} mm from {thick.thickness:g} mm, {software()}",
                     pseudonym=name if outputs.key else None, key=outputs.key or b"")
    return written


ADAPTER_ONLY = "adapter only"  # the report's name of cubic + the per-scan adapter (--unet none's output)


def truth_on_grid(truth: CTVolume, grid) -> tuple[np.ndarray, str | None]:
    """The truth at the output grid's voxels: a crop when the grids coincide, else linear resampling."""
    m = np.linalg.inv(truth.affine) @ grid.affine
    offset = m[2, 3]
    aligned = np.allclose(m[:3, :3], np.eye(3), atol=1e-4) and np.allclose(m[:2, 3], 0, atol=1e-4) \
        and abs(offset - round(offset)) < 1e-3 and 0 <= round(offset) and round(offset) + grid.shape[2] <= truth.shape[2]
    if aligned:
        k = int(round(offset))
        return np.asarray(truth.array[..., k:k + grid.shape[2]], dtype=np.float32), None
    return truth.sample_at(grid.affine, grid.shape, order=1), "truth resampled (linear) onto the output grid: its slices do not coincide"


def hu_limits(thick: CTVolume) -> tuple[float, float]:
    """The output's HU range: valid CT (-1024..3071) widened to whatever the thick input itself holds."""
    return min(-1024.0, float(thick.array.min())), max(3071.0, float(thick.array.max()))


def case_info(name: str, thick: CTVolume, cfg, res, consistency: dict, clipped: int, limits) -> dict:
    """What cases.json says of a case, whole or tiled."""
    info = {"case": name, "input_shape": list(thick.shape), "input_spacing_mm": [round(float(s), 4) for s in thick.spacing],
            "slab_thickness_mm": thick.thickness, "output_shape": list(res.grid.shape),
            "output_spacing_mm": cfg.spacing_mm, "seconds": {k: round(v, 2) for k, v in res.seconds.items()},
            "consistency_residual": consistency, "clipped_voxels": {"count": clipped, "range_hu": list(limits)},
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if res.adapt_info:
        info["adaptation"] = res.adapt_info
    if res.tune_info:
        info["unet_tuning"] = res.tune_info
    return info


def run_case(name: str, thick: CTVolume, truth: CTVolume | None, models: Models, cfg, out: Path, rows: list,
             progress: bool = True, stage: Stages | None = None, outputs: Outputs | None = None) -> dict:
    if models.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    stage = stage or Stages(progress)
    tiles = plan_tiles(thick, models, cfg) if truth is None and cfg.samples == 1 else None
    if tiles:
        return run_tiled(name, thick, models, cfg, out, tiles, stage, t0, progress, outputs)
    res = interpolate(thick, models, cfg, progress, stage)
    lo, hi = hu_limits(thick)
    clipped = int(np.count_nonzero((res.output < lo) | (res.output > hi)))
    final = to_int16_hu(np.clip(res.output, lo, hi))
    written = save_outputs(out, name, final, res.grid.affine, thick, outputs or Outputs(), stage)
    if res.std is not None:
        save_nifti(out / f"{name}_std.nii.gz", res.std.astype(np.float32), res.grid.affine)
    info = case_info(name, thick, cfg, res, consistency_residual(final.astype(np.float32), thick, res.grid), clipped,
                     (lo, hi))
    info["outputs"] = [p.name for p in written]
    if models.device.type == "cuda":
        info["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if truth is not None:
        stage("score against the truth (linear, cubic, ceiling) and draw the report")
        truth_hu, note = truth_on_grid(truth, res.grid)
        if note:
            info["note"] = note
        z = scored_slices(res.grid.shape[2], res.grid.weights)
        lungs = lung_mask(truth_hu[..., z])
        linear = thick.sample_at(res.grid.affine, res.grid.shape, order=1)
        methods = {"ours": res.mean, "linear": linear, "cubic": res.cubic}
        ceiling = latent_ceiling(truth_hu, res, models, cfg)  # None with --unet none
        if ceiling is not None:
            methods["ceiling"] = ceiling
        for method, vol in list(methods.items()):
            if method == "ours" and cfg.consistency:  # score what was written (consistent, rounded to int16)
                methods["ours + consistency"] = final.astype(np.float32)
            else:
                methods[f"{method} + consistency"] = enforce_slab_consistency(vol, thick.array, res.grid.weights)
        names = ["ours", "ours + consistency", "linear", "linear + consistency", "cubic", "cubic + consistency",
                 "ceiling", "ceiling + consistency"]
        if res.adaptation is not None and models.unet is not None:
            # the ablation of one run (residual decoding is additive): the same sample on plain cubic (the U-Net
            # alone, what --adapt 0 writes) and the adapter alone (what --unet none writes: the same seeded fit)
            for method, vol in (("ours without adaptation", res.mean - res.adaptation),
                                (ADAPTER_ONLY, res.cubic + res.adaptation)):
                methods[method] = vol
                methods[f"{method} + consistency"] = enforce_slab_consistency(vol, thick.array, res.grid.weights)
            names[2:2] = ["ours without adaptation", "ours without adaptation + consistency", ADAPTER_ONLY,
                          f"{ADAPTER_ONLY} + consistency"]
        for method in (m for m in names if m in methods):
            vol = methods[method]
            row = {"case": name, "method": method, **score(vol[..., z], truth_hu[..., z], lungs),
                   "consistency_mean_abs_hu": consistency_residual(vol, thick, res.grid)["mean_abs_hu"]}
            rows.append(row)
        panel = {"thick input": thick.sample_at(res.grid.affine, res.grid.shape, order=0), "cubic": res.cubic,
                 "ours": final.astype(np.float32), "truth": truth_hu,
                 "error: cubic - truth": res.cubic - truth_hu,
                 "error: ours - truth": final.astype(np.float32) - truth_hu}
        if res.std is not None:
            panel["uncertainty (std)"] = res.std
        write_panel(out / f"{name}.png", panel, [float(s) for s in thick.spacing[:2]] + [cfg.spacing_mm])
    info["seconds"]["case"] = round(time.perf_counter() - t0, 2)
    return info


def run_tiled(name: str, thick: CTVolume, models: Models, cfg, out: Path, tiles, stage: Stages, t0: float,
              progress: bool, outputs: Outputs | None = None) -> dict:
    """A scan larger than the memory plan, without truth: interpolated tile by tile (evaluation.interpolation)."""
    lo, hi = hu_limits(thick)
    stage(f"{thick.shape[0]}x{thick.shape[1]}x{thick.shape[2]} is larger than --max-memory-gb {cfg.max_memory_gb:g} "
          f"allows at once: {len(tiles)} tiles of thick slices")
    res = interpolate_tiled(thick, models, cfg, tiles, (lo, hi), progress, stage)
    written = save_outputs(out, name, res.output, res.grid.affine, thick, outputs or Outputs(), stage)
    info = {**case_info(name, thick, cfg, res, res.consistency, res.clipped, (lo, hi)), "tiles": res.tiles,
            "outputs": [p.name for p in written]}
    info["seconds"]["case"] = round(time.perf_counter() - t0, 2)
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Interpolate thick CT into thin slices with the latent diffusion model; "
                                            "score against linear and cubic interpolation when the thin truth is known.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", nargs="+", type=Path, help="thick scans: DICOM folders, DICOM ZIPs, NIfTI, NRRD, MHA")
    src.add_argument("--split", choices=["train", "val", "test"], help="every case of this split of --cache")
    p.add_argument("--cache", type=Path, help="prepared dataset (dataset/prepare.py --output), with --split")
    p.add_argument("--output", required=True, type=Path, help="folder for the outputs and the report")
    p.add_argument("--output-format", choices=["nifti", "dicom", "both"],
                   help="OUT/<name>.nii.gz, OUT/<name>_dicom/ (a new series in the input's study: same patient and "
                        "study, new series UID, DERIVED) or both; default both for a DICOM input, else nifti")
    p.add_argument("--anonymize", action="store_true",
                   help="name outputs by a keyed pseudonym of the input's name and make it the DICOM patient "
                        "(no birth date or other patient attributes, new study UIDs)")
    p.add_argument("--pseudonym-key", type=Path, metavar="FILE",
                   help=f"secret for --anonymize (default OUT/{KEY_FILE}, made owner-only on first use): the same "
                        "key gives the same pseudonyms; keep it, but do not pass it on with the outputs")
    p.add_argument("--config", type=Path, help="YAML whose `interpolate` section names weights and settings")
    add_set_argument(p)
    p.add_argument("--autoencoder", type=Path, help="autoencoder checkpoint (default: the config's, else pretrained/)")
    p.add_argument("--unet", type=Path, help="U-Net checkpoint (default: the config's, else pretrained/); 'none': no "
                                            "autoencoder or U-Net, only the per-scan adapter and the consistency step")
    p.add_argument("--spacing", type=float, help="output slice spacing in mm (default 1.0)")
    p.add_argument("--steps", type=int, help="sampler steps (default: the config's diffusion.sample_steps, 1: the "
                                             "posterior-mean estimate, as good as 25 on held-out CT)")
    p.add_argument("--samples", type=int, help="samples to average; > 1 also writes a per-voxel std NIfTI")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-consistency", action="store_true", help="skip the slab-consistency projection")
    p.add_argument("--decode", choices=["residual", "direct"],
                   help="residual (default): cubic + D(z_thin) - D(z_cubic); direct: D(z_thin)")
    p.add_argument("--adapt", type=int, metavar="N",
                   help="fine-tune a per-scan refiner for N steps on the input's own in-plane pairs first "
                        "(ddpm/adapt.py; about 0.1 s a step on a 2-core CPU); default 600, 0 = off")
    p.add_argument("--max-memory-gb", type=float, metavar="GB",
                   help="peak memory to plan for (default 8): decoder chunks shrink and long scans are tiled to fit it")
    p.add_argument("--fill-nonfinite", type=float, metavar="HU",
                   help="replace NaN/Inf input voxels with this value (default: refuse such input)")
    p.add_argument("--not-ct-ok", action="store_true",
                   help="interpolate volumes that do not look like CT in HU (no air, implausible range)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or stage lines (errors and the report only)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-cases", type=int, default=None, help="with --split: only the first N cases")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.split and not args.cache:
            raise ConfigError("--split needs --cache")
        full = load_config(args.config, args.overrides)
        cfg = full.interpolate
        sampling = full.diffusion if args.steps is None else \
            full.diffusion.model_validate({**full.diffusion.model_dump(), "sample_steps": args.steps})
        overrides = {"autoencoder": args.autoencoder and str(args.autoencoder), "unet": args.unet and str(args.unet),
                     "spacing_mm": args.spacing, "samples": args.samples, "seed": args.seed,
                     "consistency": False if args.no_consistency else None, "decode": args.decode,
                     "adapt_steps": args.adapt, "max_memory_gb": args.max_memory_gb}
        cfg = cfg.model_validate({**cfg.model_dump(), **{k: v for k, v in overrides.items() if v is not None}})
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        policy = choose(device, cfg.bf16, cfg.cpu_bf16)
        print(f"precision: {policy}", flush=True)
        models = Models.load(cfg.autoencoder, cfg.unet, device, policy, sampling)
        jobs = [(output_name(s), s) for s in args.input] if args.input else \
            [(d.name, d) for d in cases_in_split(args.cache, args.split)[: args.max_cases]]
        if not jobs:
            raise CaseError(f"no {args.split} cases in {args.cache}")
        outputs = Outputs(args.output_format)
        if args.anonymize:
            outputs.key = key_from_file(args.pseudonym_key or args.output / KEY_FILE)
            jobs = [(case_pseudonym(name, outputs.key), source) for name, source in jobs]
    except (ConfigError, FileNotFoundError, ValueError, CaseError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    progress = not args.quiet
    stage = Stages(progress)
    for gone in remove_partials(args.output):
        print(f"removed {gone.name}: a partial file left by an interrupted run", flush=True)
    rows, infos, failed = [], [], 0
    for name, source in jobs:
        try:
            stage(f"read {name if args.anonymize else source}")
            if args.input:
                thick, truth = read_thick(source), None
            else:
                case = load_case(source)
                thick, truth = case.thick, case.thin
            thick = check_ct(thick, "input", args.not_ct_ok, args.fill_nonfinite)
            info = run_case(name, thick, truth, models, cfg, args.output, rows, progress, stage, outputs)
        except (CaseError, ValueError, OSError) as e:
            print(f"error: {name}: {e}", file=sys.stderr)
            failed += 1
            continue
        infos.append(info)
        r = info["consistency_residual"]
        written = ", ".join(str(args.output / o) for o in info["outputs"])
        print(f"{name}: {info['output_shape']} at {cfg.spacing_mm:g} mm -> {written} "
              f"({info['seconds']['case']:.1f} s, slab residual {r['mean_abs_hu']:.3f} HU mean, {r['max_abs_hu']:.2f} max, "
              f"{info['clipped_voxels']['count']} voxel(s) clipped to {info['clipped_voxels']['range_hu']} HU)")
    if infos:
        write_json(args.output / "cases.json", infos)
    if rows:
        notes = ["PSNR, SSIM, MAE and lung bias exclude the first and last slab (the thin slices they cover).",
                 "'+ consistency': projected so every slab average equals the thick slice; the written output is "
                 "'ours + consistency' rounded to int16 HU." if cfg.consistency else
                 "consistency step disabled for the written output (--no-consistency).",
                 "'ceiling': the true thin scan's latent decoded as ours is (a perfect U-Net); when it does not "
                 "beat cubic, the autoencoder, not the U-Net, limits the result."]
        if any(i.get("adaptation") for i in infos):
            notes.append(f"'ours' includes per-scan adaptation ({cfg.adapt_steps} steps on the input's own in-plane "
                         "pairs); 'ours without adaptation' is the same sample on plain cubic (the U-Net alone, as "
                         "--adapt 0 writes it); 'adapter only' is cubic + the adapter without the U-Net (as --unet none "
                         "writes it).")
        summary = write_metrics(args.output, rows, notes)
        print((args.output / "report.md").read_text())
        psnr = {m: v["psnr"] for m, v in summary["methods"].items()}
        if "ours + consistency" in psnr:
            print(f"ours + consistency vs cubic: {psnr['ours + consistency'] - psnr['cubic']:+.2f} dB PSNR on "
                  f"[-1024, 2048] HU; vs cubic + consistency (the same projection, no network): "
                  f"{psnr['ours + consistency'] - psnr['cubic + consistency']:+.2f} dB" +
                  (f"; autoencoder ceiling (true latent) + consistency vs cubic + consistency: "
                   f"{psnr['ceiling + consistency'] - psnr['cubic + consistency']:+.2f} dB"
                   if "ceiling + consistency" in psnr else ""))
        if "ours without adaptation + consistency" in psnr:
            print(f"adaptation: {psnr['ours + consistency'] - psnr['ours without adaptation + consistency']:+.2f} dB "
                  f"over the same run without it")
        if f"{ADAPTER_ONLY} + consistency" in psnr:
            print(f"latent U-Net: {psnr['ours + consistency'] - psnr[ADAPTER_ONLY + ' + consistency']:+.2f} dB over the "
                  f"adapter alone (--unet none)")
    print(f"outputs in {args.output}" + (f"; {failed} input(s) failed" if failed else ""))
    return 2 if failed else 0

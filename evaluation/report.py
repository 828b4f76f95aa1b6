"""Scoring interpolated volumes against the thin truth, and writing the report files.

Figures follow the issue's definitions: PSNR on HU clipped to [-1024, 2048] mapped to [0, 1] and
in a lung window [-1000, 400] (MONAI PSNRMetric), SSIM as the mean over axial slices (MONAI
SSIMMetric), MAE in HU, and the mean HU bias inside the lungs. The first and last slab are left
out: there the thick scan has no neighbour on one side and every method extrapolates.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from thinslice.atomic import atomic_path, write_json, write_text
from thinslice.metrics import LUNG_WINDOW, mae_hu, psnr, ssim_axial

METRICS = ("psnr", "psnr_lung", "ssim", "mae_hu", "lung_bias_hu")


def lung_mask(truth_hu: np.ndarray) -> np.ndarray:
    """Air-density regions (< -400 HU) not connected to the in-plane border (the air around the body)."""
    air = truth_hu < -400
    labels, n = ndimage.label(air)
    if n == 0:
        return air
    border = np.unique(np.concatenate([labels[0].ravel(), labels[-1].ravel(), labels[:, 0].ravel(),
                                       labels[:, -1].ravel()]))
    mask = air & ~np.isin(labels, border)
    return ndimage.binary_opening(mask, iterations=1) if mask.any() else mask


def scored_slices(n_slices: int, weights: np.ndarray) -> slice:
    """The thin slices outside the first and last slab."""
    first = np.nonzero(weights[0])[0].max() + 1
    last = np.nonzero(weights[-1])[0].min()
    return slice(int(first), int(max(first, last)))


def score(pred_hu: np.ndarray, truth_hu: np.ndarray, lungs: np.ndarray) -> dict:
    p = torch.from_numpy(np.ascontiguousarray(pred_hu, dtype=np.float32))[None, None]
    t = torch.from_numpy(np.ascontiguousarray(truth_hu, dtype=np.float32))[None, None]
    bias = float((pred_hu.astype(np.float64) - truth_hu)[lungs].mean()) if lungs.any() else math.nan
    return {"psnr": psnr(p, t), "psnr_lung": psnr(p, t, LUNG_WINDOW), "ssim": ssim_axial(p, t),
            "mae_hu": mae_hu(p, t), "lung_bias_hu": bias}


def write_metrics(out: Path, rows: list[dict], notes: list[str]) -> dict:
    """metrics.csv (a row per case and method), summary.json (means per method), report.md."""
    fields = ["case", "method"] + list(METRICS) + ["consistency_mean_abs_hu"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})
    write_text(out / "metrics.csv", buf.getvalue())
    methods = list(dict.fromkeys(r["method"] for r in rows))
    summary = {"cases": len({r["case"] for r in rows}), "methods": {}}
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        summary["methods"][m] = {k: float(np.nanmean([r[k] for r in mine])) if any(
            not math.isnan(r[k]) for r in mine) else None for k in METRICS + ("consistency_mean_abs_hu",)}
    summary["notes"] = notes
    write_json(out / "summary.json", summary)
    lines = ["| method | PSNR [-1024, 2048] dB | PSNR lung dB | SSIM | MAE HU | lung bias HU | slab residual HU |",
             "|---|---|---|---|---|---|---|"]
    for m, v in summary["methods"].items():
        cells = [f"{v[k]:.3f}" if v[k] is not None else "n/a" for k in METRICS + ("consistency_mean_abs_hu",)]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    text = (f"# Interpolation report ({summary['cases']} case(s))\n\nMeans over cases; per-case rows in metrics.csv.\n\n"
            + "\n".join(lines) + "\n\n" + "".join(f"- {n}\n" for n in notes))
    write_text(out / "report.md", text)
    return summary


DISPLAY_WINDOW = (-1000.0, 400.0)  # chest: lungs to mediastinum in one grey scale (W 1400, L -300)
ERROR_RANGE = 200.0  # HU either side of zero for signed error maps


def _planes(v: np.ndarray, centre) -> list[np.ndarray]:
    """Axial, coronal and sagittal planes through `centre`, each (horizontal, vertical) for imshow(.T)."""
    x, y, z = centre
    return [v[:, :, z], v[:, y, :], v[x, :, :]]


def write_panel(path: Path, images: dict[str, np.ndarray], spacing, window=DISPLAY_WINDOW) -> None:
    """Axial, coronal and sagittal planes of each (X, Y, Z) volume in a column, at their physical aspect,
    each panel at least 512 px wide, with its window and a colour bar in HU. Names starting with
    'error' are signed maps (diverging, +-200 HU); 'uncertainty' maps run 0-200 HU."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(images)
    shape = next(iter(images.values())).shape
    centre = tuple(n // 2 for n in shape)
    extent_mm = [shape[k] * spacing[k] for k in range(3)]
    # (width mm, height mm) of each row's planes: axial X x Y, coronal X x Z, sagittal Y x Z
    dims = [(extent_mm[0], extent_mm[1]), (extent_mm[0], extent_mm[2]), (extent_mm[1], extent_mm[2])]
    col_in = 3.6
    rows_h = [col_in * h / w for w, h in dims]
    fig, axes = plt.subplots(3, len(names), figsize=(col_in * len(names) * 1.25, sum(rows_h) + 1.4), squeeze=False,
                             gridspec_kw={"height_ratios": rows_h})
    for col, name in enumerate(names):
        v = images[name]
        signed, unc = name.startswith("error"), name.startswith("uncertainty")
        if signed:
            cmap, vmin, vmax, label = "RdBu_r", -ERROR_RANGE, ERROR_RANGE, f"HU, +-{ERROR_RANGE:g}"
        elif unc:
            cmap, vmin, vmax, label = "magma", 0.0, ERROR_RANGE, f"std HU, 0..{ERROR_RANGE:g}"
        else:
            cmap, vmin, vmax, label = "gray", window[0], window[1], f"HU, window {window[0]:g}..{window[1]:g}"
        for row, (plane, (w, h)) in enumerate(zip(_planes(v, centre), dims)):
            ax = axes[row, col]
            im = ax.imshow(plane.T, cmap=cmap, origin="lower", vmin=vmin, vmax=vmax, interpolation="nearest",
                           extent=(0, w, 0, h))
            ax.set_xticks([])
            ax.set_yticks([])
            bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
            bar.ax.tick_params(labelsize=7)
            if row == 0:
                ax.set_title(f"{name}\n{label}", fontsize=9)
        for row, what in enumerate(("axial", "coronal", "sagittal")):
            axes[row, 0].set_ylabel(what)
    fig.tight_layout()
    dpi = max(110, int(np.ceil(512 / (col_in * 0.8))))  # each panel at least 512 px wide
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)

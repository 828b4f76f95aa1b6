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


def write_panel(path: Path, images: dict[str, np.ndarray], spacing, window=(-1024.0, 2048.0)) -> None:
    """Coronal and sagittal mid-planes of each (X, Y, Z) volume in a column, true aspect from `spacing`;
    names starting with '|' or 'uncertainty' are shown as 0-200 HU heat maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(images)
    shape = next(iter(images.values())).shape
    rows_h = [2.6 * shape[2] * spacing[2] / (shape[k] * spacing[k]) for k in (0, 1)]  # true physical aspect
    fig, axes = plt.subplots(2, len(names), figsize=(2.6 * len(names), sum(rows_h) + 1.0), squeeze=False,
                             gridspec_kw={"height_ratios": rows_h})
    for col, name in enumerate(names):
        v = images[name]
        for row, plane in enumerate((v[:, v.shape[1] // 2, :], v[v.shape[0] // 2, :, :])):
            ax = axes[row, col]
            err = name.startswith("|") or name.startswith("uncertainty")
            ax.imshow(plane.T, cmap="magma" if err else "gray", origin="lower", aspect=spacing[2] / spacing[row],
                      vmin=0 if err else window[0], vmax=200 if err else window[1])
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=9)
        axes[0, 0].set_ylabel("coronal")
        axes[1, 0].set_ylabel("sagittal")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


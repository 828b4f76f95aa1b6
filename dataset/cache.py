"""The prepared-dataset cache: one folder per case, a manifest and a failures file.

CACHE/cases/<case_id>/{thin.nii, thick.nii, meta.json} is written (a thick-only case has no thin.nii) into a temporary folder and
renamed into place, so a case folder that exists is complete. Uncompressed NIfTI keeps the affine,
opens in 3D Slicer, and memory-maps for fast patch sampling.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from dataset.readers import strip_source_suffix
from dataset.volume import CTVolume
from thinslice.atomic import atomic_dir, atomic_path, write_json, write_text

CACHE_VERSION = 2  # 2: keyed patient pseudonyms
MANIFEST = "manifest.json"
FAILURES = "failures.csv"


def case_id_for(source: Path, root: Path) -> str:
    """Named after the file or folder it comes from; sub-folders of the input joined with '__'."""
    rel = source.relative_to(root) if source != root else Path(source.name)
    name = strip_source_suffix(str(rel))
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("/", "__")).strip("_") or "case"


def source_checksum(source: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
    for f in files:
        h.update(str(f.relative_to(source) if source.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def volume_meta(vol: CTVolume) -> dict:
    return {"shape": list(vol.shape), "spacing": [round(float(v), 6) for v in vol.spacing],
            "slice_thickness": vol.thickness, "affine": vol.affine.tolist(),
            "orientation": vol.orientation, "dtype": str(vol.array.dtype)}


def write_case(case_dir: Path, thin: CTVolume | None, thick: CTVolume, meta: dict) -> dict:
    meta = {**meta, "cache_version": CACHE_VERSION, "thin": volume_meta(thin) if thin is not None else None,
            "thick": volume_meta(thick)}
    with atomic_dir(case_dir) as tmp:
        if thin is not None:
            nib.save(thin.to_nifti(), tmp / "thin.nii")
        nib.save(thick.to_nifti(), tmp / "thick.nii")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def read_meta(case_dir: Path) -> dict | None:
    try:
        return json.loads((Path(case_dir) / "meta.json").read_text())
    except (OSError, ValueError):
        return None


@dataclass
class CachedCase:
    case_id: str
    thin: CTVolume | None  # None: a thick-only case
    thick: CTVolume
    meta: dict


def _load_nifti(path: Path, thickness: float | None) -> CTVolume:
    img = nib.load(str(path), mmap=True)
    return CTVolume(np.asanyarray(img.dataobj), img.affine, slice_thickness=thickness)


def load_case(case_dir: str | Path) -> CachedCase:
    case_dir = Path(case_dir)
    meta = read_meta(case_dir)
    if meta is None:
        raise FileNotFoundError(f"{case_dir}: not a prepared case (meta.json missing)")
    thin = _load_nifti(case_dir / "thin.nii", meta["thin"]["slice_thickness"]) if meta.get("thin") else None
    return CachedCase(meta["case_id"], thin, _load_nifti(case_dir / "thick.nii", meta["thick"]["slice_thickness"]), meta)


def write_manifest(cache: Path, cases: list[dict], config: dict) -> None:
    cases = sorted(cases, key=lambda c: c["case_id"])
    counts = {s: sum(c["split"] == s for c in cases) for s in ("train", "val", "test")}
    write_json(cache / MANIFEST, {"cache_version": CACHE_VERSION, "counts": counts, "data_config": config,
                                  "cases": cases})


def read_manifest(cache: str | Path) -> dict:
    path = Path(cache) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no manifest; run `python dataset/prepare.py` first")
    return json.loads(path.read_text())


def has_thin(entry: dict) -> bool:
    return entry.get("thick_kind") != "thick-only"


def cases_in_split(cache: str | Path, split: str, thick_only: bool = False) -> list[Path]:
    """Case folders of a split; thick-only cases (no thin truth) only when asked for."""
    cache = Path(cache)
    return [cache / "cases" / c["case_id"] for c in read_manifest(cache)["cases"]
            if c["split"] == split and (thick_only or has_thin(c))]


def write_failures(cache: Path, failures: list[tuple[str, str, str]]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["case_id", "source", "reason"])
    writer.writerows(sorted(failures))
    write_text(cache / FAILURES, buf.getvalue())


CASE_NAMES = "case_names.csv"


def write_case_names(cache: Path, rows: list[tuple[str, str]]) -> None:
    """case id -> source, for case_names: pseudonym; owner-only, never copied into latents or reports."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["case_id", "source"])
    writer.writerows(sorted(rows))
    with atomic_path(cache / CASE_NAMES, mode=0o600) as tmp:
        tmp.write_text(buf.getvalue())


def read_failures(cache: str | Path) -> dict[str, str]:
    with open(Path(cache) / FAILURES, newline="") as f:
        return {row["case_id"]: row["reason"] for row in csv.DictReader(f)}

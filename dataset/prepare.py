"""Prepare a dataset: python dataset/prepare.py --input RAW --output CACHE [--config config/cpu.yaml]

Walks RAW, turns every case (DICOM folder, DICOM ZIP, NIfTI, NRRD/MHA) into a cached thin/thick
pair, then writes a manifest with a patient-level split and a failures file naming every case
skipped and why. Re-running skips cases already done with the same source and settings.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dataset.cache import (CACHE_VERSION, FAILURES, MANIFEST, case_id_for, read_meta, source_checksum,
                           write_case, write_case_names, write_failures, write_manifest)
from dataset.errors import CaseError
from dataset.pairing import choose_pair
from dataset.readers import case_series, discover_sources
from dataset.split import assign_split, case_pseudonym, dataset_key, patient_key, patient_raw_id
from dataset.thick import simulate_thick
from dataset.checks import check_ct
from dataset.volume import CTVolume
from thinslice.config import ConfigError, DataConfig, add_set_argument, load_config


def prep_fingerprint(cfg: DataConfig) -> str:
    """What a cached case depends on; a change re-prepares the case."""
    blob = json.dumps({"v": CACHE_VERSION, "thick": cfg.thick.model_dump(), "series": cfg.series.model_dump()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def check_volume(vol: CTVolume, what: str) -> None:
    """The checks interpolation applies to its input (dataset.checks): NaN/Inf, not CT, too small."""
    check_ct(vol, what)


def check_overlap(thin: CTVolume, thick: CTVolume, min_fraction: float = 0.5) -> None:
    """A real thick series must cover the same stretch of body as the thin one."""
    ends = np.array([[0, 0, -0.5, 1], [0, 0, thick.shape[2] - 0.5, 1]]).T
    z = (np.linalg.inv(thin.affine) @ thick.affine @ ends)[2]
    lo, hi = sorted(z)
    covered = max(0.0, min(hi, thin.shape[2] - 0.5) - max(lo, -0.5))
    if covered < min_fraction * (hi - lo):
        raise CaseError(f"thick and thin series do not overlap (only {covered * thin.slice_spacing:.0f} mm shared)")


def case_names(source: Path, root: Path, cfg: DataConfig, key: bytes) -> tuple[str, str, str]:
    """(case id, source as written to the cache, name the patient regex reads); with case_names: pseudonym
    neither the id nor the written source repeats the folder or file name."""
    name = case_id_for(source, root)
    rel = str(source.relative_to(root)) if source != root else source.name
    if cfg.case_names == "pseudonym":
        pseudonym = case_pseudonym(name, key)
        return pseudonym, pseudonym, name
    return name, rel, name


def prepare_case(source: Path, root: Path, cache: Path, cfg: DataConfig, fingerprint: str,
                 key: bytes) -> tuple[dict, bool]:
    """Cache one case; returns (meta, reused) where reused means it was already done."""
    case_id, shown, name = case_names(source, root, cfg, key)
    case_dir = cache / "cases" / case_id
    checksum = source_checksum(source)
    meta = read_meta(case_dir)
    if meta and meta.get("source_sha256") == checksum and meta.get("prep_fingerprint") == fingerprint:
        return meta, True
    with case_series(source, workdir=cache) as series:
        pair = choose_pair(series, cfg.series, cfg.thick.slab_spacing_mm)
        thin = None
        if pair.thin is not None:
            thin = pair.thin.read()
            check_volume(thin, "thin")
        if pair.thin is None:
            thick = pair.thick.read()
            check_volume(thick, "thick")
            thick_kind = "thick-only"
        elif pair.thick is not None:
            thick = pair.thick.read()
            check_volume(thick, "thick")
            check_overlap(thin, thick)
            thick_kind = "paired"
        else:
            thick = simulate_thick(thin, cfg.thick.slab_thickness_mm, cfg.thick.slab_spacing_mm)
            thick_kind = "simulated"
        named = pair.thin if pair.thin is not None else pair.thick
        raw_patient = patient_raw_id(name, named.patient_id, cfg.patient_regex)
    meta = {
        "case_id": case_id,
        "patient": patient_key(raw_patient, key),
        # a label taken from the file name is not identifying; a DICOM PatientID never leaves here
        "patient_label": None if named.patient_id.strip() or cfg.case_names == "pseudonym" else raw_patient,
        "source": shown,
        "source_sha256": checksum,
        "prep_fingerprint": fingerprint,
        "thin_series": pair.thin.name if pair.thin is not None else None,
        "thick_series": pair.thick.name if pair.thick is not None else None,
        "thick_kind": thick_kind,
        "slab": {"thickness_mm": thick.thickness, "spacing_mm": thick.slice_spacing},
        "skipped_series": pair.skipped,
    }
    return write_case(case_dir, thin, thick, meta), False


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, type=Path, help="folder of cases (or one case)")
    p.add_argument("--output", required=True, type=Path, help="cache folder (created; re-runs resume)")
    p.add_argument("--config", type=Path, default=None, help="YAML config (data: section); defaults if omitted")
    add_set_argument(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides).data
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    root = args.input.resolve()
    if not root.exists():
        print(f"error: input {args.input} does not exist", file=sys.stderr)
        return 2
    cache = args.output.resolve()
    cache.mkdir(parents=True, exist_ok=True)
    sources = discover_sources(root)
    fingerprint = prep_fingerprint(cfg)
    key = dataset_key(cache)
    done, failures, reused, table = [], [], 0, []
    bar = tqdm(sources, unit="case", desc="prepare", dynamic_ncols=True)
    for source in bar:
        case_id, rel, _ = case_names(source, root, cfg, key)
        table.append((case_id, str(source.relative_to(root)) if source != root else source.name))
        bar.set_postfix_str(case_id if len(case_id) <= 40 else "…" + case_id[-39:])
        try:
            meta, was_done = prepare_case(source, root, cache, cfg, fingerprint, key)
        except CaseError as e:
            failures.append((case_id, rel, str(e)))
            continue
        except Exception as e:  # one bad case never stops the run; the reason goes to the failures file
            first = (str(e).strip().splitlines() or [""])[0][:200]
            failures.append((case_id, rel, f"unexpected {type(e).__name__}: {first}"))
            continue
        reused += was_done
        split = assign_split(meta["patient"], cfg.split, meta.get("patient_label"), meta["case_id"])
        done.append({"case_id": meta["case_id"], "patient": meta["patient"], "split": split,
                     "source": meta["source"], "thick_kind": meta["thick_kind"],
                     "thin_shape": (meta["thin"] or {}).get("shape"), "thin_spacing": (meta["thin"] or {}).get("spacing"),
                     "thick_spacing": meta["thick"]["spacing"]})
    if cfg.case_names == "pseudonym":  # the only place that links a pseudonym to its source: local, owner-only
        write_case_names(cache, table)
    write_manifest(cache, done, cfg.model_dump(mode="json"))
    write_failures(cache, failures)
    counts = {s: sum(c["split"] == s for c in done) for s in ("train", "val", "test")}
    thick_only = sum(c["thick_kind"] == "thick-only" for c in done)
    print(f"prepared {len(done)} case(s) ({reused} already done), {len(failures)} failed; "
          f"split train/val/test = {counts['train']}/{counts['val']}/{counts['test']}"
          + (f"; {thick_only} thick-only (no thin truth: in-plane training pairs only, never scored)" if thick_only else ""))
    print(f"manifest: {cache / MANIFEST}")
    if failures:
        print(f"failures: {cache / FAILURES}")
        for case_id, _, reason in failures:
            print(f"  {case_id}: {reason}")
    return 0 if done or not sources else 1


if __name__ == "__main__":
    sys.exit(main())

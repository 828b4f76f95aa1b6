"""The latent dataset: every case of a prepared cache encoded once by the autoencoder.

Per case, `<case_id>.safetensors` holds `thin` (the target latent) and `cond` (the thick scan
resampled onto the thin grid with cubic B-splines, then encoded the same way), in float16, with
shape, spacings, split and the autoencoder checkpoint's fingerprint as metadata. Training cases also
hold `pair{k}.thin`, `pair{k}.cond`, `pair{k}.cond_image` (the cubic crop itself, unit scale) and
`pair{k}.thin_image` (the target crop, for validating on crops without the cache) for
the extra pairs of ddpm/pair_crops.py (several slab thicknesses and phases, in-plane pairs), each
described in the `pairs` metadata (kind, axis, slab, phase, origin); a thick-only case has only
those. `index.json` lists the cases and the latent scale factor (1 / std of the training split's
thin latents). A case done with the same fingerprint is skipped; a different fingerprint is
re-encoded. Under torchrun the cases are sharded across ranks.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from AutoEncoder.codec import Codec
from dataset.cache import has_thin, load_case, read_manifest
from dataset.volume import CTVolume
from ddpm.pair_crops import BODY_HU, adapted_condition, pair_crops
from thinslice.atomic import atomic_path, write_json
from thinslice.checkpoint import file_fingerprint
from thinslice.config import ConfigError, LatentsConfig, add_set_argument, load_config
from thinslice.distributed import cleanup, init_distributed


def thick_on_thin_grid(thick: CTVolume, thin: CTVolume) -> np.ndarray:
    """The condition: cubic B-spline resampling of the thick scan at the thin voxel centres."""
    return thick.sample_at(thin.affine, thin.shape, order=3)


def encode_hu(codec: Codec, hu: np.ndarray) -> torch.Tensor:
    """One volume's latent as stored: float16 on the CPU, encoded exactly as interpolation encodes."""
    return codec.encode(hu)[0].to(torch.float16).cpu().contiguous()


def encode_case(codec: Codec, case_dir: Path, pairs: LatentsConfig | None = None, progress: bool = False,
                body_threshold_hu: float = BODY_HU, adapt_steps: int = 0) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The case's own (thin, cond) latents when it has a thin series, plus its extra pair crops (centred on voxels
    above `body_threshold_hu`: data.patches.body_threshold_hu). `adapt_steps` > 0 (the cascade): the case's own
    condition is its cubic refined by an adapter fitted on its thick scan, stored beside it as `cond_image`."""
    case = load_case(case_dir)
    out, described = {}, []
    if case.thin is not None and (pairs is None or pairs.whole_train_cases):
        out["thin"] = encode_hu(codec, case.thin.array)
        cond = thick_on_thin_grid(case.thick, case.thin)
        if adapt_steps:
            thin_mm = case.thin.slice_spacing
            cond = adapted_condition(cond, case.thick, thin_mm, thin_mm, case.thick.thickness, adapt_steps,
                                     pairs.seed if pairs else 0, codec.precision, codec.device)
            out["cond_image"] = codec.to_unit(cond)[None].to(torch.float16).contiguous()
        out["cond"] = encode_hu(codec, cond)
    if pairs is not None and pairs.crops_per_pair > 0:
        crops = pair_crops(case, pairs, codec.compression, body_threshold_hu, codec.precision, codec.device)
        for k, crop in enumerate(tqdm(crops, desc=f"pairs {case.case_id}", unit="crop", leave=False, disable=not progress)):
            out[f"pair{k}.thin"] = encode_hu(codec, crop.thin_hu)
            out[f"pair{k}.cond"] = encode_hu(codec, crop.cond_hu)
            out[f"pair{k}.cond_image"] = codec.to_unit(crop.cond_hu)[None].to(torch.float16).contiguous()
            out[f"pair{k}.thin_image"] = codec.to_unit(crop.thin_hu)[None].to(torch.float16).contiguous()
            described.append(crop.describe)
    return out, described


def pairs_fingerprint(pairs: LatentsConfig | None, body_threshold_hu: float = BODY_HU) -> str:
    """What makes a case's pair crops: the latents section and the body threshold (once latents.body_threshold_hu,
    hashed under that name so latents made before the rename are still recognised as done)."""
    described = None if pairs is None else \
        {**pairs.model_dump(mode="json"), "body_threshold_hu": float(body_threshold_hu)}
    blob = json.dumps(described, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_metadata(path: Path) -> dict | None:
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata()
    except Exception:  # missing or unreadable: encode again
        return None


def generate(cache: Path, checkpoint: Path, out: Path, splits=("train", "val", "test"),
             pairs: LatentsConfig | None = None, body_threshold_hu: float = BODY_HU) -> dict:
    """`pairs`: extra training pairs per training case (ddpm/pair_crops.py); None: each case's own pair only.
    `body_threshold_hu`: data.patches.body_threshold_hu, where pair crops are centred."""
    ctx = init_distributed()
    out.mkdir(parents=True, exist_ok=True)
    codec, _ = Codec.load(checkpoint, ctx.device)
    fingerprint = file_fingerprint(checkpoint)
    manifest = [c for c in read_manifest(cache)["cases"] if c["split"] in splits]
    # a thick-only case only trains (in-plane pairs): in val or test it has nothing to score against
    manifest = [c for c in manifest if has_thin(c) or (c["split"] == "train" and pairs is not None)]
    mine = manifest[ctx.rank::ctx.world]
    adapt = pairs.cond_adapt_steps if pairs is not None else 0  # the cascade: val cases are conditioned alike
    failures = {}
    for c in tqdm(mine, desc=f"latents[{ctx.rank}]", unit="case", disable=not ctx.is_main):
        path = out / f"{c['case_id']}.safetensors"
        case_pairs = pairs if c["split"] == "train" else None
        want = pairs_fingerprint(case_pairs, body_threshold_hu) + (f"-adapt{adapt}" if adapt and case_pairs is None else "")
        meta = read_metadata(path)
        if meta and meta.get("ae_fingerprint") == fingerprint and meta.get("pairs_fingerprint") == want:
            continue
        try:
            tensors, described = encode_case(codec, Path(cache) / "cases" / c["case_id"], case_pairs,
                                             progress=ctx.is_main, body_threshold_hu=body_threshold_hu,
                                             adapt_steps=adapt)
            if not tensors:
                raise ValueError("no pair fits the crop (volume too small)")
        except Exception as e:  # one bad case never stops the run
            failures[c["case_id"]] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            continue
        meta = {"case_id": c["case_id"], "split": c["split"], "ae_fingerprint": fingerprint, "pairs_fingerprint": want,
                "thick_kind": c.get("thick_kind", ""), "thin_spacing": json.dumps(c["thin_spacing"]),
                "thick_spacing": json.dumps(c["thick_spacing"]), "image_shape": json.dumps(c["thin_shape"]),
                "latent_shape": json.dumps(list(tensors["thin"].shape) if "thin" in tensors else None),
                "pairs": json.dumps(described)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
    if ctx.distributed:
        gathered = [None] * ctx.world
        torch.distributed.all_gather_object(gathered, failures)
        failures = {k: v for part in gathered for k, v in part.items()}
    index = {}
    if ctx.is_main:
        index = write_index(out, manifest, checkpoint, fingerprint, failures, cache, codec.compression,
                            "adapted" if adapt else "cubic")
    ctx.barrier()
    cleanup()
    return index


def write_index(out: Path, manifest, checkpoint: Path, fingerprint: str, failures: dict, cache: Path,
                compression=None, condition: str = "cubic") -> dict:
    """index.json with the latent scale factor: 1 / std over the training split's thin latents."""
    total, sq, n, cases = 0.0, 0.0, 0, []
    for c in manifest:
        path = out / f"{c['case_id']}.safetensors"
        meta = read_metadata(path)
        if not meta or meta.get("ae_fingerprint") != fingerprint:
            continue
        pairs = json.loads(meta.get("pairs", "[]"))
        cases.append({"case_id": c["case_id"], "split": c["split"], "file": path.name,
                      "thick_kind": meta.get("thick_kind", ""), "latent_shape": json.loads(meta["latent_shape"]),
                      "thin_spacing": json.loads(meta["thin_spacing"]), "thick_spacing": json.loads(meta["thick_spacing"]),
                      "pairs": len(pairs), "pair_kinds": {k: sum(p["kind"] == k for p in pairs) for k in ("z", "inplane")}})
        if c["split"] == "train":
            with safe_open(str(path), "pt") as f:
                names = [k for k in f.keys() if k == "thin" or k.endswith(".thin")]
                for name in names:
                    z = f.get_tensor(name).double()
                    total, sq, n = total + float(z.sum()), sq + float(z.pow(2).sum()), n + z.numel()
    std = (sq / n - (total / n) ** 2) ** 0.5 if n else None
    index = {"ae_checkpoint": str(Path(checkpoint).resolve()), "ae_fingerprint": fingerprint, "cache": str(Path(cache).resolve()),
             "compression": list(compression) if compression else None,
             # what the conditions are: cubic, or cubic refined by a per-scan adapter (the cascade)
             "condition": condition,
             "scale_factor": (1.0 / std) if std else None, "cases": cases, "failures": failures}
    write_json(out / "index.json", index)
    return index


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Encode every case of a prepared cache into the latent dataset.")
    p.add_argument("--cache", required=True, type=Path, help="prepared dataset (dataset/prepare.py --output)")
    p.add_argument("--checkpoint", required=True, type=Path, help="autoencoder checkpoint (stage 2 best.pt)")
    p.add_argument("--output", required=True, type=Path, help="latent folder; reruns skip cases already done")
    p.add_argument("--splits", nargs="+", default=["train", "val", "test"], choices=["train", "val", "test"],
                   help="encode only these splits (the U-Net trains on train and validates on val)")
    p.add_argument("--config", type=Path, default=None,
                   help="YAML whose latents: section sets the extra training pairs (defaults if omitted)")
    add_set_argument(p)
    p.add_argument("--no-pairs", action="store_true", help="only each case's own (thin, cond) pair, as before")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        pairs = None if args.no_pairs else cfg.latents
        index = generate(args.cache, args.checkpoint, args.output, tuple(args.splits), pairs,
                         cfg.data.patches.body_threshold_hu)
    except (FileNotFoundError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if index:
        n_pairs = sum(c["pairs"] for c in index["cases"])
        print(f"{len(index['cases'])} case(s) and {n_pairs} extra pair crop(s) in {args.output / 'index.json'}, "
              f"scale factor {index['scale_factor']}, {len(index['failures'])} failed")
        for case_id, reason in index["failures"].items():
            print(f"  {case_id}: {reason}")
    return 0

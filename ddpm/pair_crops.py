"""Many (thin, cond) training pairs per case, cut into crops for the latent dataset.

One case used to give one pair: its thin series and its one thick scan. Here every case gives
- z pairs (cases with a thin series): the thin series re-thickened at several slab thicknesses and
  slab phases (dataset.inplane_pairs.slab_condition: slab means, resampled back with interpolation's
  own cubic), so the spacing embedding sees more than one thickness;
- in-plane pairs (every case, thick-only ones included): an in-plane axis of the thick scan made
  the slice axis and averaged into slabs (SMORE; dataset.inplane_pairs.inplane_pair).
Each pair volume gives a few random crops centred in the body; crops, not volumes, are encoded, so
the cost per case stays bounded whatever the scan size. A crop's draw depends only on (seed, case,
pair), so a rerun or another rank cuts the same crops.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from dataset.cache import CachedCase
from dataset.inplane_pairs import PairGeometry, inplane_pair, slab_condition
from dataset.thick import simulate_thick
from dataset.volume import CTVolume
from ddpm.adapt import AdaptSettings, check_adaptable, refine, train_adapter
from thinslice.config import LatentsConfig, PatchConfig
from thinslice.precision import Precision

BODY_HU = PatchConfig().body_threshold_hu  # the schema's default body threshold


@dataclass
class PairCrop:
    describe: dict  # kind (z | inplane), axis, slab_mm, thin_mm, phase, origin, shape
    cond_hu: np.ndarray  # float32 (X, Y, Z): cubic of the slab means, on the target's grid
    thin_hu: np.ndarray  # float32 (X, Y, Z): the target


def _phases(n_thin_per_slab: float, wanted: int) -> list[int]:
    """Up to `wanted` distinct slab offsets, spread over one slab."""
    n = max(1, int(round(n_thin_per_slab)))
    return sorted({int(k * n / wanted) for k in range(min(wanted, n))})


def pair_volumes(case: CachedCase, cfg: LatentsConfig) -> Iterator[tuple[dict, np.ndarray, np.ndarray]]:
    """(description, cond HU, thin HU) for every pair of a case, one volume at a time (bounded memory)."""
    if case.thin is not None:
        thin_mm = case.thin.slice_spacing
        for slab in cfg.z_slabs_mm:
            if slab <= 1.5 * thin_mm:
                continue  # not thicker than the thin series: nothing to interpolate
            for phase in _phases(slab / thin_mm, cfg.z_phases):
                target = case.thin.with_array(np.asarray(case.thin.array[..., phase:], dtype=np.float32))
                if target.shape[2] * thin_mm < 2 * slab:
                    continue
                cond, thin = slab_condition(target, slab)
                yield {"kind": "z", "axis": 2, "slab_mm": float(slab), "thin_mm": float(thin_mm), "phase": phase}, cond, thin
    if cfg.inplane:
        thick = case.thick
        array = np.asarray(thick.array, dtype=np.float32)
        for axis in (0, 1):
            geometry = PairGeometry.matching(thick.spacing[axis], cfg.output_spacing_mm, thick.thickness)
            if array.shape[axis] * float(thick.spacing[axis]) < 2 * geometry.slab_mm:
                continue
            for phase in _phases(geometry.slab_mm / geometry.thin_mm, cfg.inplane_phases):
                cond, thin = inplane_pair(array, thick.spacing, axis, geometry, phase)
                yield {"kind": "inplane", "axis": axis, "slab_mm": round(geometry.slab_mm, 4),
                       "thin_mm": round(geometry.thin_mm, 4), "phase": phase}, cond, thin


def crop_size_for(shape, crop, compression) -> tuple[int, ...] | None:
    """The crop clipped to the volume, in whole latent voxels; None when an axis has less than two."""
    size = tuple(min(c, s - s % f) for c, s, f in zip(crop, shape, compression))
    return None if any(k < 2 * f for k, f in zip(size, compression)) else size


def _generator(seed: int, case_id: str, k: int) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{case_id}:{k}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def body_crops(thin: np.ndarray, size, n: int, threshold: float, rng: np.random.Generator,
               tries: int = 50) -> list[tuple[int, ...]]:
    """Origins of `n` crops whose centre voxel is body (above `threshold` HU in the target), if found."""
    out = []
    for _ in range(n):
        for attempt in range(tries):
            start = tuple(int(rng.integers(0, s - k + 1)) for s, k in zip(thin.shape, size))
            centre = tuple(a + k // 2 for a, k in zip(start, size))
            if thin[centre] > threshold or attempt == tries - 1:
                out.append(start)
                break
    return out


def adapted_condition(cond: np.ndarray, thick: CTVolume, out_spacing_mm: float, thin_mm: float, slab_mm: float,
                      steps: int, seed: int, policy: Precision, device="cpu", directions=(1, 0)) -> np.ndarray:
    """The cascade's condition: `cond` (cubic of `thick` on a thin grid of `thin_mm`) refined by an adapter fitted
    on `thick`'s own in-plane pairs, as interpolation refines a scan; cubic itself when the scan is too small to
    adapt or the adapter's own check says it does not help (interpolation keeps cubic then too)."""
    try:
        check_adaptable(thick, out_spacing_mm, AdaptSettings().crop)
    except ValueError:
        return cond
    net, info = train_adapter(thick, out_spacing_mm, AdaptSettings(steps=steps, seed=seed), policy, progress=False,
                              device=device)
    if not info["use"]:
        return cond
    return refine(net, cond, thin_mm, slab_mm, policy, progress=False, directions=directions).astype(np.float32)


def pair_condition(case: CachedCase, describe: dict, cond: np.ndarray, cfg: LatentsConfig, policy: Precision,
                   device="cpu") -> np.ndarray:
    """`cond` as the cascade conditions on it (latents.cond_adapt_steps): a z pair's adapter learns from the
    simulated thick scan the pair was made of; an in-plane pair's from the case's thick scan (the scan it was cut
    from), applied along the one plane direction whose axes are both in-plane."""
    slab, thin_mm = describe["slab_mm"], describe["thin_mm"]
    if describe["kind"] == "z":
        target = case.thin.with_array(np.asarray(case.thin.array[..., describe["phase"]:], dtype=np.float32))
        thick, out_mm, directions = simulate_thick(target, slab, slab), thin_mm, (1, 0)
    else:
        thick, out_mm, directions = case.thick, cfg.output_spacing_mm, (1,)
    return adapted_condition(cond, thick, out_mm, thin_mm, slab, cfg.cond_adapt_steps, cfg.seed, policy, device,
                             directions)


def pair_crops(case: CachedCase, cfg: LatentsConfig, compression, body_threshold_hu: float = BODY_HU,
               policy: Precision | None = None, device="cpu") -> Iterator[PairCrop]:
    """`body_threshold_hu`: data.patches.body_threshold_hu, the one body threshold (autoencoder patches use it too);
    `policy`, `device`: where the cascade's adapters train (latents.cond_adapt_steps > 0)."""
    for k, (describe, cond, thin) in enumerate(pair_volumes(case, cfg)):
        size = crop_size_for(thin.shape, cfg.crop, compression)
        if size is None:
            continue
        if cfg.cond_adapt_steps:
            cond = pair_condition(case, describe, cond, cfg, policy or Precision(False, "fp32"), device)
        rng = _generator(cfg.seed, case.case_id, k)
        for start in body_crops(thin, size, cfg.crops_per_pair, body_threshold_hu, rng):
            sl = tuple(slice(a, a + s) for a, s in zip(start, size))
            yield PairCrop({**describe, "origin": list(start), "shape": list(size)},
                           np.ascontiguousarray(cond[sl]), np.ascontiguousarray(thin[sl]))

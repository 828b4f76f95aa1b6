"""Thick scan -> thin scan: the whole method behind evaluation/interpolate.py.

The output grid exactly tiles the thick scan's slabs (dataset.thick.thin_grid): in-plane geometry
unchanged, slices `spacing` apart, the first starting half a slice inside the first slab. The thick
scan is resampled onto that grid (cubic); inside the body's box the latent pipeline (ddpm.inferer: encode
patch-wise, sample with the U-Net over overlapping latent windows, decode chunk-wise) and the per-scan
adapter add their changes; finally every slab's average is projected onto the measured thick slice
(the consistency step).

With `decode: residual` (default) the sample and the condition are decoded as a pair and subtracted: the
output is cubic plus the image-space change the sampled latent makes, so a small CPU-trained
autoencoder's blur cancels instead of capping the result at its reconstruction quality.
"""
from __future__ import annotations

import dataclasses
import itertools
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from AutoEncoder.codec import Codec, load_autoencoder
from AutoEncoder.model import PatchVolumeAutoencoder
from dataset.intensity import to_int16_hu
from dataset.thick import enforce_slab_consistency, grid_slab_weights, slab_residual, thin_grid
from dataset.volume import CTVolume
from ddpm.generate import load_unet, sliding_window_denoiser
from ddpm.inferer import LatentInferer
from ddpm.samplers import make_sampler
from ddpm.build import build_diffusion
from ddpm.scan_tune import TuneSettings, tune_unet
from ddpm.adapt import AdaptSettings, check_adaptable, refine, train_adapter
from thinslice.checkpoint import file_fingerprint
from thinslice.config import DiffusionConfig, InterpolateConfig
from thinslice.precision import Precision, choose
from thinslice.weights import find_weights


@dataclass
class ThinGrid:
    affine: np.ndarray
    shape: tuple[int, int, int]
    spacing: float
    weights: np.ndarray  # (slabs, slices): each slab's average over the grid's slices


def output_grid(thick: CTVolume, spacing: float) -> ThinGrid:
    if spacing >= thick.slice_spacing:
        raise ValueError(f"output spacing {spacing:g} mm is not finer than the input's {thick.slice_spacing:g} mm")
    affine, n = thin_grid(thick, spacing)
    return ThinGrid(affine, thick.shape[:2] + (n,), spacing, grid_slab_weights(n, spacing, thick))


BODY_HU = -500.0  # above this a voxel is body (or table), not air


def body_box(cubic: np.ndarray, margin: int | None, threshold: float = BODY_HU) -> tuple[slice, slice, slice]:
    """The in-plane bounding box of every voxel above `threshold` in any slice, widened by `margin` voxels: where
    the latent model and the adapter run. The whole volume when `margin` is None or nothing is above it."""
    whole = tuple(slice(0, n) for n in cubic.shape)
    if margin is None:
        return whole
    columns = (cubic > threshold).any(axis=2)
    if not columns.any():
        return whole
    box = []
    for axis, n in ((0, cubic.shape[0]), (1, cubic.shape[1])):
        idx = np.flatnonzero(columns.any(axis=1 - axis))
        box.append(slice(max(0, int(idx[0]) - margin), min(n, int(idx[-1]) + 1 + margin)))
    return box[0], box[1], whole[2]


NO_UNET = "none"  # --unet none: the per-scan adapter and the consistency step only, no latent model


@dataclass
class Models:
    """The latent model; `unet` and `autoencoder` are None for --unet none (cubic + adapter + consistency)."""

    autoencoder: PatchVolumeAutoencoder | None
    unet: torch.nn.Module | None
    space: object
    diffusion: object
    window: tuple[float, float]  # HU window of the autoencoder
    unet_config: object
    device: torch.device
    precision: Precision = None  # thinslice.precision.choose(device) unless given
    # how to sample: the diffusion section of the config the interpolation runs with (its sampler, sample_steps and
    # eta; the defaults unless given), not the checkpoint's, so the config one runs with decides, as in training
    sampling: DiffusionConfig = None
    # what the U-Net was trained to be conditioned on (its checkpoint says): cubic, or cubic refined by the per-scan
    # adapter (the cascade, latents.cond_adapt_steps), whose change is then relative to the adapted volume
    condition: str = "cubic"

    def __post_init__(self):
        if self.precision is None:
            self.precision = choose(self.device)
        if self.sampling is None:
            self.sampling = DiffusionConfig()

    @property
    def codec(self) -> Codec:
        return Codec(self.autoencoder, self.window, self.device, self.precision)

    def inferer(self, cfg: InterpolateConfig) -> LatentInferer:
        """The latent pipeline as this config runs it: its sampler and steps, the U-Net over sliding windows."""
        s = self.sampling
        window = cfg.window or tuple(self.unet_config.unet_train.crop_size)
        return LatentInferer(self.codec, self.unet, self.space, make_sampler(s.sampler, self.diffusion, eta=s.eta),
                             s.sample_steps, sliding_window_denoiser(self.unet, window, cfg.overlap, cfg.sw_batch_size,
                                                                     self.precision), cfg.encode_overlap)

    @classmethod
    def load(cls, autoencoder: str | Path, unet: str | Path, device, policy: Precision | None = None,
             sampling: DiffusionConfig | None = None) -> "Models":
        if str(unet) == NO_UNET:
            return cls(None, None, None, None, None, None, torch.device(device), policy, sampling)
        autoencoder = find_weights(autoencoder, "autoencoder checkpoint")
        unet = find_weights(unet, "U-Net checkpoint")
        ae, ae_state = load_autoencoder(autoencoder, device)
        net, space, cfg, state = load_unet(unet, device)
        expected, actual = state.get("ae_fingerprint"), file_fingerprint(autoencoder)
        if expected and expected != actual:
            raise ValueError(f"{unet} was trained on latents of another autoencoder than {autoencoder} "
                             f"(fingerprint {expected} vs {actual})")
        return cls(ae, net, space, build_diffusion(cfg), tuple(ae_state["config"]["data"]["hu_window"]), cfg, device,
                   policy, sampling, state.get("condition") or "cubic")


@dataclass
class Interpolation:
    grid: ThinGrid
    cubic: np.ndarray  # HU on the grid; the condition
    mean: np.ndarray  # ours before the consistency step (mean over samples)
    std: np.ndarray | None
    output: np.ndarray  # what is written: consistent (if enabled), float HU
    cond: torch.Tensor | None  # the condition latent residual decoding subtracts (None: direct decoding, no latent)
    seconds: dict = field(default_factory=dict)
    adaptation: np.ndarray | None = None  # what per-scan adaptation added to cubic (base = cubic + this)
    adapt_info: dict | None = None
    box: tuple = (slice(None),) * 3  # where the latent model and the adapter ran (body_box); cubic outside
    tune_info: dict | None = None  # per-scan tuning of the U-Net (interpolate.unet_tune_steps), when it ran


# Peak of the decoder per output voxel of one chunk with its halo, measured on the shipped 4x4x2 autoencoder in
# channels-last memory as the codec runs it (benchmarks/decode_memory.py, latent 64^3): 200 bytes in bf16, 397 in
# fp32 (396..452 and 530 before channels-last); rounded up.
DECODER_BYTES_PER_VOXEL = {True: 240, False: 480}
RUNTIME_GB = 1.5  # python, torch, the models
# output-sized float32 arrays alive at the peak (cubic, adaptation, the base, the sample's copy of it, the decoded
# change, the running mean, the output, the consistency step's temporaries), with room: 512x512x300 peaked at
# 9.96 GiB with 7 here when the condition was still decoded whole; the whole 512x512x240 chest now peaks at 5.55 GiB
OUTPUT_ARRAYS = 12


def decode_halo(models: "Models", cfg: InterpolateConfig) -> int:
    """Latent context per side of a decoded chunk: the interpolation's (6: within 1 HU of unchunked decoding
    on the shipped autoencoder, benchmarks/decode_halo.py) unless the autoencoder's own is smaller."""
    if models.autoencoder is None:
        return 0
    own = models.autoencoder.cfg.decode_halo
    return own if cfg.decode_halo is None else min(own, cfg.decode_halo)


def decode_chunk_for(models: "Models", shape, max_memory_gb: float, halo: int, output_shape=None) -> tuple[int, int, int]:
    """The split of the latent of `shape` (image voxels) into chunks that decodes the fewest voxels (chunks and
    their halos) while one chunk fits the memory left once the output-sized arrays (`output_shape`, default
    `shape`) of this scan are counted."""
    f = models.autoencoder.compression
    latent = [int(np.ceil(s / k)) for s, k in zip(shape, f)]
    arrays = float(np.prod(output_shape or shape))
    left = max_memory_gb - RUNTIME_GB - OUTPUT_ARRAYS * 4 * arrays / 2**30
    fits = max(left, 0.25) * 2**30 / (DECODER_BYTES_PER_VOXEL[bool(models.precision.bf16)] * float(np.prod(f)))
    best = None
    for split in itertools.product(*(range(1, max(2, n // 4 + 1)) for n in latent)):
        chunk = [int(np.ceil(n / k)) for n, k in zip(latent, split)]
        context = [n if k == 1 else min(n, c + 2 * halo) for n, c, k in zip(latent, chunk, split)]
        work = (int(np.prod(split)) * int(np.prod(context)), int(np.prod(split)))
        if np.prod(context) <= fits and (best is None or work < best[0]):
            best = (work, tuple(chunk))
    if best is None:  # not even 4-voxel chunks fit: the smallest there are
        return tuple(min(4, n) for n in latent)
    return best[1]


class Stages:
    """One line per stage as it starts, with the time since the first, so a long run is never silent."""

    def __init__(self, enabled: bool = True):
        self.enabled, self.t0 = enabled, time.perf_counter()

    def __call__(self, what: str) -> None:
        if self.enabled:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            print(f"[{time.perf_counter() - self.t0:7.1f} s, peak {peak:5.2f} GB] {what}", flush=True)


def interpolate(thick: CTVolume, models: Models, cfg: InterpolateConfig, progress: bool = True,
                stage: Stages | None = None, adapter: tuple | None = None) -> Interpolation:
    """`adapter`: (network, info) of an adaptation already fitted to the whole scan (tiled runs fit it once)."""
    stage = stage or Stages(progress)
    t0 = time.perf_counter()
    adapt = cfg.adapt_steps > 0
    if adapt:
        try:
            check_adaptable(thick, cfg.spacing_mm, cfg.adapt_crop)
        except ValueError as e:
            print(f"{e}: adaptation skipped", flush=True)
            adapt = False
    grid = output_grid(thick, cfg.spacing_mm)
    stage(f"resample {thick.shape[0]}x{thick.shape[1]}x{thick.shape[2]} -> {'x'.join(map(str, grid.shape))} (cubic)")
    cubic = thick.sample_at(grid.affine, grid.shape, order=3)
    if models.unet is None:
        return adapted_only(thick, grid, cubic, models, cfg, progress, stage, adapter, adapt, t0)
    t_res = time.perf_counter()
    tune_info = None
    if cfg.unet_tune_steps > 0:
        stage(f"tune the U-Net to this scan ({cfg.unet_tune_steps} steps on its own in-plane pairs)")
        models, tune_info = tune_models(thick, models, cfg, progress)
    t_tune = time.perf_counter()
    box = body_box(cubic, cfg.body_margin)
    shape = tuple(len(range(*b.indices(n))) for b, n in zip(box, cubic.shape))
    inferer = models.inferer(cfg)
    adaptation, adapt_info = adapt_cubic(thick, cubic, models, cfg, progress, stage, adapter, adapt, box)
    t_adapt = time.perf_counter()
    base = cubic if adaptation is None else cubic + adaptation
    if models.condition == "adapted" and adaptation is None:
        print("this U-Net was trained on adapted conditions (a cascade): without adaptation it is conditioned "
              "on cubic, which it was not trained on", flush=True)
    # a cascade U-Net (trained on adapted conditions) is conditioned on what the adapter made and adds what it left
    source = base if models.condition == "adapted" else cubic
    stage(f"encode the condition (autoencoder, patch-wise; the body's box {'x'.join(map(str, shape))})")
    cond = inferer.condition(np.ascontiguousarray(source[box]), progress)
    del source
    t_enc = time.perf_counter()
    spacing = torch.tensor([[thick.slice_spacing, cfg.spacing_mm]])
    halo = decode_halo(models, cfg)
    chunk = decode_chunk_for(models, shape, cfg.max_memory_gb, halo, grid.shape)
    total = total_sq = None
    seconds = {"sample": 0.0, "decode": 0.0}
    for s in range(cfg.samples):
        t_s = time.perf_counter()
        gen = torch.Generator().manual_seed(cfg.seed + s)
        bar = (lambda it: tqdm(it, desc=f"sample {s + 1}/{cfg.samples}", unit="step", leave=False)) if progress else None
        stage(f"sample the thin latent ({inferer.steps} {models.sampling.sampler.upper()} steps" +
              (f", sample {s + 1} of {cfg.samples})" if cfg.samples > 1 else ")"))
        z = inferer.sample(cond, spacing, gen, bar)
        t_d = time.perf_counter()
        hu = base.copy()
        if cfg.decode == "residual":
            stage("decode what the sample changes: D(sample) - D(condition), chunk by chunk")
            hu[box] += inferer.residual(z, cond.latent, shape, progress, chunk, halo)[0, 0].numpy()
        else:
            stage("decode")
            hu[box] = inferer.decode(z, shape, progress, chunk, halo)[0, 0].numpy()
        seconds["sample"] += t_d - t_s
        seconds["decode"] += time.perf_counter() - t_d
        total = hu if total is None else total + hu
        if cfg.samples > 1:
            sq = hu.astype(np.float64) ** 2  # float64: E[x^2] - E[x]^2 cancels badly in float32
            total_sq = sq if total_sq is None else total_sq + sq
    del base
    mean = total / cfg.samples
    del total
    std = np.sqrt(np.clip(total_sq / cfg.samples - mean**2, 0, None)).astype(np.float32) if cfg.samples > 1 else None
    mean = mean.astype(np.float32)
    t_sample = time.perf_counter()
    if cfg.consistency:
        stage("slab consistency")
    output = enforce_slab_consistency(mean, thick.array, grid.weights) if cfg.consistency else mean
    t_end = time.perf_counter()
    seconds = {"resample": t_res - t0, "encode": t_enc - t_adapt, **seconds, "consistency": t_end - t_sample,
               "total": t_end - t0}
    if adapt_info:
        seconds = {"adapt": t_adapt - t_tune, **seconds}
    if tune_info:
        seconds = {"tune": t_tune - t_res, **seconds}
    return Interpolation(grid, cubic, mean, std, output, cond.latent if cfg.decode == "residual" else None, seconds,
                         adaptation, adapt_info, box, tune_info)


def tune_models(thick: CTVolume, models: Models, cfg: InterpolateConfig, progress: bool = True) -> tuple[Models, dict]:
    """The models with the U-Net tuned to this scan (ddpm.scan_tune), on the crop size it was trained on."""
    settings = TuneSettings(steps=cfg.unet_tune_steps, lr=cfg.unet_tune_lr, seed=cfg.seed)
    net, info = tune_unet(models.unet, models.space, models.diffusion, models.codec, thick, cfg.spacing_mm,
                          tuple(models.unet_config.unet_train.crop_size), settings, models.precision, progress)
    return dataclasses.replace(models, unet=net), info


def adapt_cubic(thick: CTVolume, cubic: np.ndarray, models: Models, cfg: InterpolateConfig, progress: bool,
                stage: Stages, adapter: tuple | None, adapt: bool, box) -> tuple[np.ndarray | None, dict | None]:
    """What the per-scan adapter adds to cubic (None when off) inside `box` (body_box; zero outside), fitted here
    unless `adapter` was given."""
    fitted_here = adapter is None
    if not fitted_here:
        adapt = cfg.adapt_steps > 0
    if not adapt:
        return None, None
    if fitted_here:
        stage(f"adapt to this scan ({cfg.adapt_steps} steps on its own in-plane pairs)")
        adapter = fit_adapter(thick, models, cfg, progress)
    net, adapt_info = adapter[0], dict(adapter[1])
    if not fitted_here:  # its fitting time is counted once, by whoever fitted it
        adapt_info["seconds"] = 0.0
    t_ref = time.perf_counter()
    if adapt_info["use"]:
        stage("refine coronal and sagittal planes with the adapted network")
        adaptation = np.zeros_like(cubic)
        inner = np.ascontiguousarray(cubic[box])
        adaptation[box] = refine(net, inner, cfg.spacing_mm, thick.thickness, models.precision, progress=progress) - inner
    else:
        adaptation = np.zeros_like(cubic)
        print(f"adaptation not used: on held-out in-plane pairs of this scan it gave L1 "
              f"{adapt_info['check_l1_hu_adapted']:.1f} HU against cubic's {adapt_info['check_l1_hu_cubic']:.1f}")
    adapt_info["refine_seconds"] = round(time.perf_counter() - t_ref, 2)
    return adaptation, adapt_info


def adapted_only(thick: CTVolume, grid: ThinGrid, cubic: np.ndarray, models: Models, cfg: InterpolateConfig,
                 progress: bool, stage: Stages, adapter: tuple | None, adapt: bool, t0: float) -> Interpolation:
    """--unet none: cubic + the per-scan adapter, then the consistency step; no autoencoder, no U-Net."""
    box = body_box(cubic, cfg.body_margin)
    adaptation, adapt_info = adapt_cubic(thick, cubic, models, cfg, progress, stage, adapter, adapt, box)
    mean = cubic if adaptation is None else (cubic + adaptation).astype(np.float32)
    t_mid = time.perf_counter()
    if cfg.consistency:
        stage("slab consistency")
    output = enforce_slab_consistency(mean, thick.array, grid.weights) if cfg.consistency else mean
    t_end = time.perf_counter()
    seconds = {"consistency": t_end - t_mid, "total": t_end - t0}
    if adapt_info:
        seconds = {"adapt": adapt_info["seconds"] + adapt_info["refine_seconds"], **seconds}
    return Interpolation(grid, cubic, mean, None, output, None, seconds, adaptation, adapt_info, box)


def fit_adapter(thick: CTVolume, models: Models, cfg: InterpolateConfig, progress: bool = True) -> tuple:
    settings = AdaptSettings(steps=cfg.adapt_steps, crop=cfg.adapt_crop, seed=cfg.seed)
    return train_adapter(thick, cfg.spacing_mm, settings, models.precision, progress, models.device)


# thin slices the adapter's 2D CNN sees on each side (8 layers of 3x3 convolutions)
ADAPTER_REACH = AdaptSettings().layers


# bytes per output voxel of one tile: the output-sized float32 arrays alive at the peak (OUTPUT_ARRAYS)
TILE_BYTES_PER_VOXEL = OUTPUT_ARRAYS * 4


@dataclass
class Tile:
    start: int  # thick slices computed: [start, stop)
    stop: int
    keep_start: int  # thick slices whose thin slices this tile writes: [keep_start, keep_stop)
    keep_stop: int


def plan_tiles(thick: CTVolume, models: Models, cfg: InterpolateConfig) -> list[Tile] | None:
    """Thick-slice tiles whose output-sized arrays take at most half of the memory plan, each with a halo of
    thick slices on both sides as deep as the decoder's receptive field; None when the whole scan fits (or when
    the output slices do not tile the slabs exactly: then the scan is done whole)."""
    ratio = thick.slice_spacing / cfg.spacing_mm
    if abs(ratio - round(ratio)) > 1e-6 or abs(thick.thickness - thick.slice_spacing) > 1e-6:
        return None
    r = int(round(ratio))
    per_thick_slice = thick.shape[0] * thick.shape[1] * r * TILE_BYTES_PER_VOXEL
    budget = (cfg.max_memory_gb - RUNTIME_GB) / 2 * 2**30
    n = thick.shape[2]
    if cfg.tile_slices is None and n * per_thick_slice <= budget:
        return None
    halo_mm = 0.0 if models.autoencoder is None else \
        decode_halo(models, cfg) * models.autoencoder.compression[2] * cfg.spacing_mm
    halo_mm = max(halo_mm, ADAPTER_REACH * cfg.spacing_mm) if cfg.adapt_steps else halo_mm
    halo = int(np.ceil(halo_mm / thick.slice_spacing)) + 1
    keep = cfg.tile_slices or int(budget // per_thick_slice) - 2 * halo
    if keep >= n:
        return None
    if keep < 1:
        raise ValueError(f"--max-memory-gb {cfg.max_memory_gb:g} is too small for one {thick.shape[0]}x{thick.shape[1]} "
                         f"tile with its {halo}-slice halo; raise it")
    return [Tile(max(0, a - halo), min(n, a + keep + halo), a, min(n, a + keep)) for a in range(0, n, keep)]


def sub_volume(thick: CTVolume, start: int, stop: int) -> CTVolume:
    shift = np.eye(4)
    shift[2, 3] = start
    return thick.with_array(np.asarray(thick.array[..., start:stop]), thick.affine @ shift)


@dataclass
class TiledInterpolation:
    grid: ThinGrid
    output: np.ndarray  # int16 HU, clipped to `limits`
    clipped: int
    seconds: dict
    adapt_info: dict | None
    tiles: int
    consistency: dict  # as consistency_residual, of the int16 output, gathered tile by tile
    tune_info: dict | None = None


def interpolate_tiled(thick: CTVolume, models: Models, cfg: InterpolateConfig, tiles: list[Tile], limits,
                      progress: bool = True, stage: Stages | None = None) -> TiledInterpolation:
    """The scan in thick-slice tiles: peak memory grows with the tile, not the scan. The adaptation is fitted
    once on the whole scan; each tile is interpolated with its halo and only its own slabs are kept (the
    consistency step is per slab, so it is exact per tile). The output is int16 HU (2 bytes a voxel)."""
    stage = stage or Stages(progress)
    t0 = time.perf_counter()
    grid = output_grid(thick, cfg.spacing_mm)
    r = int(round(thick.slice_spacing / cfg.spacing_mm))
    out = np.empty(grid.shape, np.int16)
    adapter, clipped, seconds, tune_info = None, 0, {}, None
    abs_sum, abs_max, count = 0.0, 0.0, 0
    if cfg.adapt_steps > 0:
        try:
            check_adaptable(thick, cfg.spacing_mm, cfg.adapt_crop)
            stage(f"adapt to this scan ({cfg.adapt_steps} steps on its own in-plane pairs, once for all tiles)")
            adapter = fit_adapter(thick, models, cfg, progress)
        except ValueError as e:
            print(f"{e}: adaptation skipped", flush=True)
    cfg_tile = cfg if adapter is not None else cfg.model_copy(update={"adapt_steps": 0})
    if cfg.unet_tune_steps > 0 and models.unet is not None:  # tuned once on the whole scan, like the adapter
        stage(f"tune the U-Net to this scan ({cfg.unet_tune_steps} steps on its own in-plane pairs, once for all tiles)")
        models, tune_info = tune_models(thick, models, cfg, progress)
        seconds["tune"] = tune_info["seconds"]
        cfg_tile = cfg_tile.model_copy(update={"unet_tune_steps": 0})
    for k, tile in enumerate(tiles):
        stage(f"tile {k + 1}/{len(tiles)}: thick slices {tile.keep_start}-{tile.keep_stop - 1} "
              f"(computed {tile.start}-{tile.stop - 1})")
        res = interpolate(sub_volume(thick, tile.start, tile.stop), models, cfg_tile, progress, stage, adapter)
        a, n = (tile.keep_start - tile.start) * r, (tile.keep_stop - tile.keep_start) * r
        part = res.output[..., a:a + n]
        clipped += int(np.count_nonzero((part < limits[0]) | (part > limits[1])))
        written = to_int16_hu(np.clip(part, *limits))
        out[..., tile.keep_start * r:tile.keep_start * r + n] = written
        slab_means = written.reshape(written.shape[:2] + (-1, r)).astype(np.float32).mean(-1)
        gap = np.abs(np.asarray(thick.array[..., tile.keep_start:tile.keep_stop], dtype=np.float32) - slab_means)
        abs_sum, abs_max, count = abs_sum + float(gap.sum(dtype=np.float64)), max(abs_max, float(gap.max())), count + gap.size
        for key, v in res.seconds.items():
            seconds[key] = seconds.get(key, 0.0) + v
        del res, part
    seconds["total"] = time.perf_counter() - t0
    info = dict(adapter[1]) if adapter is not None else None
    if info:
        seconds["adapt"] = seconds.get("adapt", 0.0) + info["seconds"]
    return TiledInterpolation(grid, out, clipped, seconds, info, len(tiles),
                              {"mean_abs_hu": abs_sum / max(count, 1), "max_abs_hu": abs_max}, tune_info)


def consistency_residual(thin_hu: np.ndarray, thick: CTVolume, grid: ThinGrid) -> dict:
    """How far the slab averages of a thin volume are from the thick scan, in HU."""
    r = np.abs(slab_residual(thin_hu, np.asarray(thick.array), grid.weights))
    return {"mean_abs_hu": float(r.mean()), "max_abs_hu": float(r.max())}


def latent_ceiling(truth_hu: np.ndarray, res: Interpolation, models: Models,
                   cfg: InterpolateConfig | None = None) -> np.ndarray | None:
    """What a perfect U-Net would give: the true thin scan's latent, decoded the way ours was (cubic plus what
    it changes against the condition).

    Scored next to ours, it tells whether the autoencoder or the U-Net limits the result: when this
    is no better than cubic, no amount of U-Net training can beat cubic with this autoencoder.
    """
    if models.autoencoder is None or res.cond is None:
        return None
    inferer = models.inferer(cfg or InterpolateConfig())  # the run's: the truth is encoded as its condition was
    truth = np.ascontiguousarray(truth_hu[res.box])
    ceiling = res.cubic.astype(np.float32)
    if models.condition == "adapted" and res.adaptation is not None:
        ceiling += res.adaptation  # the condition it subtracts was encoded from the adapted volume
    ceiling[res.box] += inferer.residual(inferer.encode(truth), res.cond, truth.shape)[0, 0].numpy()
    return ceiling

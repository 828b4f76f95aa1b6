"""Latent U-Net training for `python` and `torchrun`: the U-Net's step inside the shared run loop (thinslice.loop).

DistributedSampler + set_epoch over reproducible random latent crops, per-rank seeds, bf16 autocast,
gradient accumulation and clipping, warmup + cosine LR, EMA (torch.optim.swa_utils) used for
validation and sampling; the loop owns resume, checkpoints, logging, validation and SIGTERM.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader

from AutoEncoder.codec import Codec
from ddpm.build import build_diffusion, build_unet, diffusion_loss  # noqa: F401 (diffusion_loss: tests, benchmarks)
from ddpm.latent_data import (LatentSpace, RandomLatentCrops, ResumableDistributedSampler, load_latent_cases,
                              read_index)
from ddpm.generate import load_unet, whole_volume_denoiser
from ddpm.inferer import LatentInferer
from ddpm.samplers import make_sampler
from ddpm.validation import val_crops, validate
from thinslice import loop, precision
from thinslice.checkpoint import warmup_cosine
from thinslice.config import Config, ConfigError, add_set_argument, load_config
from thinslice.distributed import init_distributed, no_sync
from thinslice.run import add_run_arguments, use_bf16, with_overrides

BUCKETS = 10  # loss by timestep bucket: t in [0, 100), [100, 200), ...


def check_crop(cfg: Config, multiple: int) -> None:
    t = cfg.unet_train
    for name, size in (("crop_size", t.crop_size), ("val_crop", t.val_crop)):
        if size is not None and any(s % multiple for s in size):
            raise ConfigError(f"unet_train.{name} {tuple(size)} must be a multiple of {multiple} "
                              f"(down-sampling levels and attention windows) on every axis")


class UNetTask:
    """The latent U-Net's part of the shared run loop (thinslice.loop): models, data, one step, validation."""

    loss_key = "loss"
    panel_tag = "val/truth|ours|error"

    def __init__(self, cfg: Config, ctx, latents: Path | None, cache: Path | None = None,
                 autoencoder: Path | None = None, latent_channels: int | None = None, compression=(4, 4, 2)):
        """`latents` None (the benchmark): no data, a U-Net for `latent_channels` and `compression`."""
        self.cfg, self.ctx, tc = cfg, ctx, cfg.unet_train
        self.tc = tc
        torch.manual_seed(tc.seed * 1000 + ctx.rank)
        self.bf16 = use_bf16(ctx.device, tc)
        self.index, self.compression, self.train_cases, self.val_cases = {}, tuple(compression), [], []
        if latents is not None:
            self.index = read_index(latents)
            self.compression = tuple(self.index.get("compression") or ()) or None
            # cond_image needs the cubic crop next to every latent: only the extra pair crops store it
            self.train_cases = load_latent_cases(latents, "train", whole=not cfg.unet.cond_image)
            if not self.train_cases:
                raise FileNotFoundError(f"{latents}/index.json lists no training case" + (
                    " with extra pairs (unet.cond_image trains on those only)" if cfg.unet.cond_image else ""))
            self.val_cases = load_latent_cases(latents, "val")[: tc.val_max_cases]
            latent_channels = self.train_cases[0].thin.shape[0]
        self.model = build_unet(cfg, latent_channels, self.compression).to(ctx.device)
        check_crop(cfg, self.model.multiple)
        self.diffusion = build_diffusion(cfg)
        self.ema = AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, warmup_cosine(tc.warmup_steps, tc.max_steps))
        self.space = None
        if tc.init_from and latents is not None:
            self.space = self._init_from(Path(tc.init_from), latent_channels)
        self.net = self.model
        if ctx.distributed:
            self.net = DDP(self.model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
        self.codec, self.vcrops = None, []
        if self.val_cases:  # decoded exactly as latents were encoded: the autoencoder's window, the same precision
            self.codec, _ = Codec.load(autoencoder or self.index["ae_checkpoint"], ctx.device)
            self.vcrops = val_crops(self.val_cases, cache or self.index["cache"], tc.val_crop, self.codec.compression,
                                    self.codec.window)
        self.val_sampler = make_sampler(cfg.diffusion.sampler, self.diffusion, eta=cfg.diffusion.eta)
        self.buckets = torch.zeros(2, BUCKETS, dtype=torch.float64)  # per-bucket loss sums and counts since the last log
        self.batches = None

    def _init_from(self, path: Path, latent_channels: int) -> LatentSpace:
        """Weights and latent scaling of another U-Net, checked to fit these latents and this architecture."""
        if not path.is_file():
            raise FileNotFoundError(f"unet_train.init_from: {path} not found")
        net, space, _, state = load_unet(path)  # its own config builds it; the weights must then fit ours
        if state.get("ae_fingerprint") != self.index.get("ae_fingerprint"):
            raise ValueError(f"unet_train.init_from: {path} was trained on latents of another autoencoder than these "
                             f"latents (fingerprint {state.get('ae_fingerprint')} vs {self.index.get('ae_fingerprint')}); "
                             f"encode the latents with the autoencoder it was trained with")
        if (state["latent_channels"], tuple(state.get("compression") or ())) != (latent_channels, self.compression):
            raise ValueError(f"unet_train.init_from: {path} is for {state['latent_channels']} latent channels at "
                             f"{state.get('compression')}, these latents have {latent_channels} at {self.compression}")
        try:
            self.model.load_state_dict(net.state_dict())
        except RuntimeError as e:
            raise ValueError(f"unet_train.init_from: {path} does not fit the unet section of this config: "
                             f"{str(e).splitlines()[0]}") from None
        self.ema.module.load_state_dict(self.model.state_dict())
        return space

    def _saved(self) -> dict:
        return {"latent_space": self.space.state_dict(), "config": self.cfg.model_dump(mode="json"),
                "latent_channels": self.model.latent_channels, "ae_fingerprint": self.index["ae_fingerprint"],
                "compression": self.compression, "condition": self.index.get("condition", "cubic")}

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(), **self._saved()}

    def best_state(self) -> dict:
        return {"ema": self.ema.module.state_dict(), **self._saved()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.space = LatentSpace.from_state(state["latent_space"])

    def start(self, step: int) -> str:
        ctx, tc = self.ctx, self.tc
        if self.space is None:
            self.space = LatentSpace.fit(self.train_cases, self.cfg.diffusion.residual)
        self.crops = RandomLatentCrops(self.train_cases, tc.crop_size, tc.samples_per_case, tc.seed,
                                       min_length=ctx.world * tc.batch_size, cond_image=self.cfg.unet.cond_image)
        self.sampler = ResumableDistributedSampler(self.crops, num_replicas=ctx.world, rank=ctx.rank, shuffle=True,
                                                   seed=tc.seed)
        self.loader = DataLoader(self.crops, batch_size=tc.batch_size, sampler=self.sampler, drop_last=True,
                                 num_workers=tc.num_workers, pin_memory=ctx.device.type == "cuda",
                                 generator=torch.Generator().manual_seed(tc.seed))
        per_epoch = self.sampler.num_samples // tc.batch_size
        micro = step * tc.grad_accum
        self.epoch = micro // per_epoch
        self.sampler.set_position(self.epoch, (micro % per_epoch) * tc.batch_size)
        self.crops.set_epoch(self.epoch)
        self.batches = iter(self.loader)
        cases = self.crops.cases
        return (f"latent U-Net: {sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M parameters, "
                f"{len(cases)} training pair(s) ({sum(c.kind == 'case' for c in cases)} whole cases, "
                f"{sum(c.kind == 'z' for c in cases)} z and {sum(c.kind == 'inplane' for c in cases)} in-plane "
                f"pair crops; {len(self.crops.skipped)} smaller than the crop), {len(self.vcrops)} val crop(s), "
                f"precision {precision.for_loop(ctx.device, tc)}, {'residual' if self.space.residual else 'direct'} target")

    def _next_batch(self) -> dict:
        try:
            return next(self.batches)
        except StopIteration:
            self.epoch += 1
            self.sampler.set_position(self.epoch, 0)
            self.crops.set_epoch(self.epoch)
            self.batches = iter(self.loader)
            return next(self.batches)

    def train_step(self, batches: list[dict] | None = None) -> dict[str, float]:
        """`batches`: the micro-batches to use (the benchmark's); the loader's otherwise."""
        tc, ctx, n = self.tc, self.ctx, self.diffusion.num_steps
        self.opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for m in range(tc.grad_accum):
            batch = batches[m] if batches is not None else self._next_batch()
            batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
            b = batch["thin"].shape[0]
            t = torch.randint(0, n, (b,))
            t[: round(tc.final_step_fraction * b)] = n - 1
            t = t.to(ctx.device)
            noise = torch.randn(batch["thin"].shape).to(ctx.device)
            with no_sync(self.net, m < tc.grad_accum - 1):
                per_sample = diffusion_loss(self.net, self.diffusion, self.space, batch, t, noise, self.bf16,
                                            self.compression)
                (per_sample.mean() / tc.grad_accum).backward()
            loss_sum += float(per_sample.detach().mean()) / tc.grad_accum
            k = t.cpu() * BUCKETS // n
            self.buckets[0].index_add_(0, k, per_sample.detach().double().cpu())
            self.buckets[1].index_add_(0, k, torch.ones_like(k, dtype=torch.float64))
        self.voxels = batch["thin"][0, 0].numel()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip))
        self.opt.step()
        self.sched.step()
        self.ema.update_parameters(self.model)
        return {"loss": loss_sum, "grad_norm": grad_norm}

    def log(self, step: int, logs: dict, rate: float) -> dict[str, float]:
        totals = self.ctx.all_reduce_sum(self.buckets.clone()).cpu()
        self.buckets.zero_()
        n = self.diffusion.num_steps
        samples = rate * self.tc.batch_size * self.tc.grad_accum * self.ctx.world
        out = {"loss/train": logs["loss"], "lr": self.sched.get_last_lr()[0], "grad_norm": logs["grad_norm"],
               "perf/samples_per_s": samples, "perf/latent_voxels_per_s": samples * self.voxels}
        out |= {f"loss_by_t/{k * n // BUCKETS:04d}": float(totals[0, k] / totals[1, k])
                for k in range(BUCKETS) if totals[1, k] > 0}
        return out

    def images(self, step: int) -> dict:
        return {}

    def validate(self) -> tuple[dict, torch.Tensor | None]:
        self.ema.module.eval()
        net = self.ema.module
        policy = precision.Precision(self.bf16, "unet_train.bf16 by the precision policy")
        inferer = LatentInferer(self.codec, net, self.space, self.val_sampler, self.cfg.diffusion.sample_steps,
                                whole_volume_denoiser(net, policy))
        return validate(inferer, self.vcrops, self.ctx)

    def describe(self, m: dict) -> str:
        return (f"val PSNR {m['psnr']:.2f} dB (cubic {m['psnr_cubic']:.2f}, perfect U-Net {m['psnr_ceiling']:.2f}; "
                f"direct decoding {m['psnr_direct']:.2f}, its ceiling {m['psnr_ae_ceiling']:.2f})")


def train(cfg: Config, latents: Path, out_dir: Path, cache: Path | None = None, autoencoder: Path | None = None,
          stop_after: int | None = None, time_budget: float | None = None) -> dict:
    ctx = init_distributed()
    task = UNetTask(cfg, ctx, latents, cache, autoencoder)
    return loop.run(task, ctx, cfg, cfg.unet_train, out_dir, stop_after, has_val=bool(task.vcrops),
                    time_budget=time_budget)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the latent diffusion U-Net on pre-encoded latents "
                                            "(python or torchrun --nproc_per_node=N).")
    p.add_argument("--config", required=True, type=Path, help="YAML with unet/diffusion/unet_train sections")
    p.add_argument("--latents", required=True, type=Path, help="latent folder (train/generate_training_latent.py)")
    add_run_arguments(p, "unet_train")
    add_set_argument(p)
    p.add_argument("--cache", type=Path, default=None, help="prepared dataset for validation truth "
                                                            "(default: the one named in the latent index)")
    p.add_argument("--autoencoder", type=Path, default=None, help="autoencoder checkpoint for validation decoding "
                                                                  "(default: the one named in the latent index)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = with_overrides(load_config(args.config, args.overrides), "unet_train", max_steps=args.max_steps)
        train(cfg, args.latents, args.output, args.cache, args.autoencoder, stop_after=args.stop_after,
              time_budget=args.time_budget)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

"""Latent U-Net training: one readable loop for `python` and `torchrun` (as DiT's train.py).

DistributedSampler + set_epoch over reproducible random latent crops, per-rank seeds, bf16 autocast,
gradient accumulation and clipping, warmup + cosine LR, EMA (torch.optim.swa_utils) used for
validation and sampling, step-numbered atomic checkpoints with automatic resume, SIGTERM -> save
and exit. Rank 0 writes; the others wait at a barrier under the long process-group timeout.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from AutoEncoder.codec import Codec
from ddpm.build import build_diffusion, build_unet, condition_input
from ddpm.diffusion import GaussianDiffusion
from ddpm.latent_data import (LatentSpace, RandomLatentCrops, ResumableDistributedSampler, load_latent_cases,
                              read_index)
from ddpm.samplers import make_sampler
from ddpm.validation import val_crops, validate
from thinslice.atomic import write_json
from thinslice.checkpoint import Checkpoints, load_checkpoint, set_rng_state, warmup_cosine
from thinslice.config import Config, ConfigError, load_config
from thinslice.distributed import init_distributed, no_sync
from thinslice import precision
from thinslice.run import (add_run_arguments, finish_run, gather_rng, halt_reason, trim_history, use_bf16,
                           with_overrides)
from thinslice.signals import StopFlag

BUCKETS = 10  # loss by timestep bucket: t in [0, 100), [100, 200), ...


def diffusion_loss(net, diffusion: GaussianDiffusion, space: LatentSpace, batch: dict, t, noise, bf16: bool,
                   compression=None):
    """Per-sample weighted loss of one batch; the one function both DDP and single runs differentiate."""
    x0 = space.to_x0(batch["thin"], batch["cond"])

    def model(x, tt, **kw):
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            return net(x, tt, **kw)

    cond = condition_input(space, batch["cond"], batch.get("cond_image"), compression)
    return diffusion.training_losses(model, x0, t, noise, cond=cond, spacing=batch["spacing"])


def check_crop(cfg: Config, multiple: int) -> None:
    t = cfg.unet_train
    for name, size in (("crop_size", t.crop_size), ("val_crop", t.val_crop)):
        if size is not None and any(s % multiple for s in size):
            raise ConfigError(f"unet_train.{name} {tuple(size)} must be a multiple of {multiple} "
                              f"(down-sampling levels and attention windows) on every axis")


def train(cfg: Config, latents: Path, out_dir: Path, cache: Path | None = None, autoencoder: Path | None = None,
          stop_after: int | None = None) -> dict:
    ctx = init_distributed()
    tc = cfg.unet_train
    out_dir = Path(out_dir)
    torch.manual_seed(tc.seed * 1000 + ctx.rank)
    bf16 = use_bf16(ctx.device, tc)

    index = read_index(latents)
    compression = tuple(index.get("compression") or ()) or None
    # cond_image needs the cubic crop next to every latent: only the extra pair crops store it
    train_cases = load_latent_cases(latents, "train", whole=not cfg.unet.cond_image)
    if not train_cases:
        raise FileNotFoundError(f"{latents}/index.json lists no training case"
                                + (" with extra pairs (unet.cond_image trains on those only)" if cfg.unet.cond_image else ""))
    val_cases = load_latent_cases(latents, "val")[: tc.val_max_cases]
    model = build_unet(cfg, train_cases[0].thin.shape[0], compression).to(ctx.device)
    check_crop(cfg, model.multiple)
    diffusion = build_diffusion(cfg)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(tc.ema_decay), use_buffers=True)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(tc.warmup_steps, tc.max_steps))

    ckpts = Checkpoints(out_dir / "checkpoints", tc.keep_last)
    step, best = 0, float("-inf")
    latest, resume_rng = ckpts.latest(), None
    if latest is not None:
        state = load_checkpoint(latest)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        step, best = state["step"], state["best_psnr"]
        space = LatentSpace.from_state(state["latent_space"])
        resume_rng = state["rng"][ctx.rank] if ctx.rank < len(state["rng"]) else state["rng"][0]
    else:
        space = LatentSpace.fit(train_cases, cfg.diffusion.residual)

    net = DDP(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None) if ctx.distributed else model
    crops = RandomLatentCrops(train_cases, tc.crop_size, tc.samples_per_case, tc.seed,
                              min_length=ctx.world * tc.batch_size, cond_image=cfg.unet.cond_image)
    sampler = ResumableDistributedSampler(crops, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=tc.seed)
    loader = DataLoader(crops, batch_size=tc.batch_size, sampler=sampler, drop_last=True, num_workers=tc.num_workers,
                        pin_memory=ctx.device.type == "cuda", generator=torch.Generator().manual_seed(tc.seed))
    per_epoch = sampler.num_samples // tc.batch_size
    micro = step * tc.grad_accum
    epoch = micro // per_epoch
    sampler.set_position(epoch, (micro % per_epoch) * tc.batch_size)
    crops.set_epoch(epoch)
    batches = iter(loader)

    codec, vcrops = None, []
    if val_cases:  # decoded exactly as latents were encoded: the autoencoder's window, the same precision policy
        codec, _ = Codec.load(autoencoder or index["ae_checkpoint"], ctx.device)
        vcrops = val_crops(val_cases, cache or index["cache"], tc.val_crop, codec.compression, codec.window)
    val_sampler = make_sampler(cfg.diffusion.sampler, diffusion, eta=cfg.diffusion.eta)

    writer = SummaryWriter(out_dir / "tensorboard") if ctx.is_main else None
    history_path = out_dir / "history.jsonl"
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "config.json", cfg.model_dump(mode="json"))
        print(f"latent U-Net: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
              f"{len(crops.cases)} training pair(s) ({sum(c.kind == 'case' for c in crops.cases)} whole cases, "
              f"{sum(c.kind == 'z' for c in crops.cases)} z and {sum(c.kind == 'inplane' for c in crops.cases)} in-plane "
              f"pair crops; {len(crops.skipped)} smaller than the crop), "
              f"{len(vcrops)} val crop(s), world {ctx.world}, device {ctx.device}, precision {precision.for_loop(ctx.device, tc)}, "
              f"{'residual' if space.residual else 'direct'} target, starting at step {step}", flush=True)
        if not vcrops:
            print("no val case in the latent index: validation and best-checkpoint selection are skipped", flush=True)
        trim_history(history_path, step)
    first_step = step
    stop = StopFlag()
    bar = tqdm(total=tc.max_steps, initial=step, disable=not ctx.is_main, unit="step", dynamic_ncols=True)
    t_last, steps_since = time.time(), 0
    buckets = torch.zeros(2, BUCKETS, dtype=torch.float64)  # per-bucket loss sums and counts since the last log
    losses = []
    if resume_rng is not None:  # last: building the autoencoder and the loader above draws random numbers
        set_rng_state(resume_rng)

    def save():
        rngs = gather_rng(ctx)
        if ctx.is_main:
            ckpts.save(step, {"step": step, "model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                              "sched": sched.state_dict(), "best_psnr": best, "rng": rngs,
                              "latent_space": space.state_dict(), "config": cfg.model_dump(mode="json"),
                              "latent_channels": model.latent_channels, "ae_fingerprint": index["ae_fingerprint"],
                              "compression": compression})
        ctx.barrier()

    while step < tc.max_steps:
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for m in range(tc.grad_accum):
            try:
                batch = next(batches)
            except StopIteration:
                epoch += 1
                sampler.set_position(epoch, 0)
                crops.set_epoch(epoch)
                batches = iter(loader)
                batch = next(batches)
            batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
            t = torch.randint(0, diffusion.num_steps, (tc.batch_size,))
            t[: round(tc.final_step_fraction * tc.batch_size)] = diffusion.num_steps - 1
            t = t.to(ctx.device)
            noise = torch.randn(batch["thin"].shape).to(ctx.device)
            with no_sync(net, m < tc.grad_accum - 1):
                per_sample = diffusion_loss(net, diffusion, space, batch, t, noise, bf16, compression)
                (per_sample.mean() / tc.grad_accum).backward()
            loss_sum += float(per_sample.detach().mean()) / tc.grad_accum
            b = (t.cpu() * BUCKETS // diffusion.num_steps)
            buckets[0].index_add_(0, b, per_sample.detach().double().cpu())
            buckets[1].index_add_(0, b, torch.ones_like(b, dtype=torch.float64))
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip))
        opt.step()
        sched.step()
        ema.update_parameters(model)
        step += 1
        steps_since += 1
        losses.append(loss_sum)
        if ctx.is_main:
            with open(history_path, "a") as f:
                f.write(json.dumps({"step": step, "loss": round(loss_sum, 7), "grad_norm": round(grad_norm, 5)}) + "\n")
        bar.update(1)

        if step % tc.log_every == 0 or step == tc.max_steps:
            totals = ctx.all_reduce_sum(buckets.clone()).cpu()
            buckets.zero_()
            if ctx.is_main:
                now = time.time()
                rate = steps_since / max(1e-9, now - t_last)
                t_last, steps_since = now, 0
                writer.add_scalar("loss/train", loss_sum, step)
                for k in range(BUCKETS):
                    if totals[1, k] > 0:
                        writer.add_scalar(f"loss_by_t/{k * diffusion.num_steps // BUCKETS:04d}",
                                          float(totals[0, k] / totals[1, k]), step)
                writer.add_scalar("lr", sched.get_last_lr()[0], step)
                writer.add_scalar("grad_norm", grad_norm, step)
                writer.add_scalar("perf/steps_per_s", rate, step)
                samples = rate * tc.batch_size * tc.grad_accum * ctx.world
                writer.add_scalar("perf/samples_per_s", samples, step)
                writer.add_scalar("perf/latent_voxels_per_s", samples * batch["thin"][0, 0].numel(), step)
                bar.set_postfix(loss=f"{loss_sum:.4f}", it_s=f"{rate:.2f}")
        if vcrops and (step % tc.val_every == 0 or step == tc.max_steps):
            ema.module.eval()
            metrics, panel = validate(ema.module, codec, space, val_sampler, vcrops, tc.val_sample_steps,
                                      ctx, bf16, compression if cfg.unet.cond_image else None)
            if ctx.is_main:
                for k, v in metrics.items():
                    writer.add_scalar(f"val/{k}", v, step)
                if panel is not None:
                    writer.add_image("val/truth|ours|error", panel, step)
                with open(out_dir / "val.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\n")
                tqdm.write(f"step {step}: val PSNR {metrics['psnr']:.2f} dB (cubic {metrics['psnr_cubic']:.2f}, "
                           f"perfect U-Net {metrics['psnr_ceiling']:.2f}; direct decoding {metrics['psnr_direct']:.2f}, "
                           f"its ceiling {metrics['psnr_ae_ceiling']:.2f})")
            if metrics["psnr"] > best:
                best = metrics["psnr"]
                if ctx.is_main:
                    ckpts.save_as("best.pt", {"step": step, "ema": ema.module.state_dict(), "val": metrics,
                                              "latent_space": space.state_dict(), "config": cfg.model_dump(mode="json"),
                                              "latent_channels": model.latent_channels,
                                              "ae_fingerprint": index["ae_fingerprint"], "compression": compression})
        why = halt_reason(ctx, stop.stop, stop_after, step - first_step)
        if step % tc.checkpoint_every == 0 or step == tc.max_steps or why:
            save()
        if why:
            if ctx.is_main:
                tqdm.write(f"stopped {why} at step {step}; checkpoint saved, rerun the same command to resume")
            break
    bar.close()
    return finish_run(ctx, model, writer, out_dir, {"step": step, "best_psnr": best, "last_losses": losses[-5:]})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the latent diffusion U-Net on pre-encoded latents "
                                            "(python or torchrun --nproc_per_node=N).")
    p.add_argument("--config", required=True, type=Path, help="YAML with unet/diffusion/unet_train sections")
    p.add_argument("--latents", required=True, type=Path, help="latent folder (train/generate_training_latent.py)")
    add_run_arguments(p, "unet_train")
    p.add_argument("--cache", type=Path, default=None, help="prepared dataset for validation truth "
                                                            "(default: the one named in the latent index)")
    p.add_argument("--autoencoder", type=Path, default=None, help="autoencoder checkpoint for validation decoding "
                                                                  "(default: the one named in the latent index)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = with_overrides(load_config(args.config), "unet_train", max_steps=args.max_steps)
        train(cfg, args.latents, args.output, args.cache, args.autoencoder, stop_after=args.stop_after)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

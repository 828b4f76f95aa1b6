"""Two-stage autoencoder training, one readable loop for one process or torchrun DDP.

Stage 1 trains encoder, codebook and decoder on random patches. Stage 2 loads the stage-1
checkpoint, freezes encoder and codebook (excluded from the optimiser, kept in eval mode) and
fine-tunes the decoder on whole volumes or large crops encoded patch-wise, GAN on from the start.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from AutoEncoder.evaluate import reconstruct_case
from AutoEncoder.losses import Adversary, MedicalNetPerceptualLoss
from AutoEncoder.model import PatchVolumeAutoencoder
from dataset.cache import cases_in_split
from dataset.patches import PatchStream, patch_loader
from thinslice.atomic import write_json
from thinslice.checkpoint import Checkpoints, load_checkpoint, set_rng_state, warmup_cosine
from thinslice.config import AutoencoderConfig, Config, ConfigError, load_config
from thinslice.distributed import DistContext, init_distributed, no_sync
from thinslice.images import midplane_panel
from thinslice import precision
from thinslice.run import (add_run_arguments, finish_run, gather_rng, halt_reason, trim_history, use_bf16,
                           with_overrides)
from thinslice.signals import StopFlag


class AutoencoderStep(torch.nn.Module):
    """What DDP wraps: stage 1 runs the whole model on patches; stage 2 encodes patch-wise without
    gradients and decodes the whole latent volume with them."""

    def __init__(self, model: PatchVolumeAutoencoder, frozen_encoder: bool):
        super().__init__()
        self.model = model
        self.frozen_encoder = frozen_encoder

    def forward(self, x):
        if not self.frozen_encoder:
            return self.model(x)
        z = self.model.encode_volume(x)
        return self.model.decode_volume(z, shape=x.shape[2:]), x.new_zeros(()), {}


def build_model(cfg: Config, device) -> tuple[PatchVolumeAutoencoder, Config]:
    """Stage 2 takes its architecture from the stage-1 checkpoint (or checks that the config's matches)."""
    init = None
    if cfg.ae_train.stage == 2:
        init = load_checkpoint(cfg.ae_train.init_from)
        ckpt_ae = AutoencoderConfig.model_validate(init["config"]["autoencoder"])
        if "autoencoder" not in cfg.model_fields_set:
            cfg = cfg.model_copy(update={"autoencoder": ckpt_ae})
        elif ckpt_ae != cfg.autoencoder:
            raise ConfigError(f"{cfg.ae_train.init_from}: its autoencoder settings differ from this config's")
    model = PatchVolumeAutoencoder(cfg.autoencoder).to(device)
    if init is not None:
        model.load_state_dict(init["model"])
        model.encoder.requires_grad_(False)
        model.bottleneck.requires_grad_(False)
    return model, cfg


def set_train_mode(model: PatchVolumeAutoencoder, stage: int) -> None:
    model.train()
    if stage == 2:  # frozen parts: no codebook EMA updates, no KL sampling
        model.encoder.eval()
        model.bottleneck.eval()


def autocast(device, cfg):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(device, cfg.ae_train))


def validate(model: PatchVolumeAutoencoder, case_dirs: list[Path], cfg: Config, ctx: DistContext):
    """Whole val volumes, patch-encoded and volume-decoded; cases sharded over ranks."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)
    panel = None
    for d in case_dirs[ctx.rank::ctx.world]:
        m, case_panel = reconstruct_case(model, d, cfg.data.hu_window, ctx.device, use_bf16(ctx.device, cfg.ae_train))
        sums += torch.tensor([m["psnr"], m["psnr_lung"], m["ssim"], 1.0], dtype=torch.float64)
        panel = case_panel if panel is None else panel
    sums = ctx.all_reduce_sum(sums).cpu()
    model.train(was_training)
    n = max(1.0, float(sums[3]))
    return {"psnr": float(sums[0]) / n, "psnr_lung": float(sums[1]) / n, "ssim": float(sums[2]) / n,
            "cases": int(sums[3])}, panel


def train(cfg: Config, cache: Path, out_dir: Path, stop_after: int | None = None) -> dict:
    ctx = init_distributed()
    tc, lc = cfg.ae_train, cfg.loss
    stage2 = tc.stage == 2
    torch.manual_seed(tc.seed * 1000 + ctx.rank)
    out_dir = Path(out_dir)
    model, cfg = build_model(cfg, ctx.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    perceptual = MedicalNetPerceptualLoss(lc.perceptual_weights).to(ctx.device) if lc.perceptual_weight > 0 else None
    adversary = Adversary(lc.disc_channels, lc.disc_layers, lc.adv_criterion).to(ctx.device) if lc.adv_weight > 0 else None
    opt_g = torch.optim.AdamW(trainable, lr=tc.lr, betas=(0.5, 0.9), weight_decay=0.0)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, warmup_cosine(tc.warmup_steps, tc.max_steps))
    opt_d = sched_d = None
    if adversary is not None:
        opt_d = torch.optim.AdamW(adversary.parameters(), lr=tc.disc_lr, betas=(0.5, 0.9), weight_decay=0.0)
        sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, warmup_cosine(tc.warmup_steps, tc.max_steps))

    ckpts = Checkpoints(out_dir / "checkpoints", tc.keep_last)
    step, best = 0, float("-inf")
    latest = ckpts.latest()
    resume_rng = None
    if latest is not None:
        state = load_checkpoint(latest)
        model.load_state_dict(state["model"])
        opt_g.load_state_dict(state["opt_g"])
        sched_g.load_state_dict(state["sched_g"])
        if adversary is not None:
            adversary.disc.load_state_dict(state["adversary"])
            opt_d.load_state_dict(state["opt_d"])
            sched_d.load_state_dict(state["sched_d"])
        step, best = state["step"], state["best_psnr"]
        resume_rng = state["rng"][ctx.rank] if ctx.rank < len(state["rng"]) else state["rng"][0]
    set_train_mode(model, tc.stage)

    step_module = AutoencoderStep(model, stage2)
    net = DDP(step_module, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None) if ctx.distributed else step_module
    disc_module = adversary.disc if adversary is not None else None
    if adversary is not None and ctx.distributed:
        adversary.disc = DDP(adversary.disc, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)

    train_dirs = cases_in_split(cache, "train")
    val_dirs = cases_in_split(cache, "val")[: tc.val_max_cases]
    size = tc.crop_size if stage2 else cfg.autoencoder.patch_size
    batch = 1 if (stage2 and size is None) else tc.batch_size
    stream = PatchStream(train_dirs, cfg.data, size=size, seed=tc.seed)
    batches = iter(patch_loader(stream, batch, ctx.rank, ctx.world, start=step * tc.grad_accum, num_workers=tc.num_workers))
    if resume_rng is not None:  # after the loader's iterator, which draws its base seed from the global RNG
        set_rng_state(resume_rng)

    writer = SummaryWriter(out_dir / "tensorboard") if ctx.is_main else None
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "config.json", cfg.model_dump(mode="json"))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"autoencoder stage {tc.stage}: {n_params / 1e6:.2f} M parameters ({sum(p.numel() for p in trainable) / 1e6:.2f} M "
              f"trained), {len(train_dirs)} train / {len(val_dirs)} val cases, world {ctx.world}, device {ctx.device}, "
              f"precision {precision.for_loop(ctx.device, tc)}, starting at step {step}", flush=True)
        if not val_dirs:
            print("no val cases in the manifest: validation and best-checkpoint selection are skipped", flush=True)
    first_step = step
    history_path = out_dir / "history.jsonl"
    if ctx.is_main:
        trim_history(history_path, step)
    stop = StopFlag()
    history = []
    bar = tqdm(total=tc.max_steps, initial=step, disable=not ctx.is_main, unit="step", dynamic_ncols=True)
    t_last, steps_since = time.time(), 0

    def save(rngs):
        if ctx.is_main:
            state = {"step": step, "model": model.state_dict(), "opt_g": opt_g.state_dict(), "sched_g": sched_g.state_dict(),
                     "best_psnr": best, "rng": rngs, "config": cfg.model_dump(mode="json"), "stage": tc.stage}
            if adversary is not None:
                state |= {"adversary": disc_module.state_dict(), "opt_d": opt_d.state_dict(), "sched_d": sched_d.state_dict()}
            ckpts.save(step, state)
        ctx.barrier()

    while step < tc.max_steps:
        adv_on = adversary is not None and (stage2 or step >= lc.adv_start_step)
        logs: dict[str, float] = defaultdict(float)
        opt_g.zero_grad(set_to_none=True)
        kept = []
        for micro in range(tc.grad_accum):
            x = next(batches)["image"].to(ctx.device, non_blocking=True)
            with no_sync(net, micro < tc.grad_accum - 1), autocast(ctx.device, cfg):
                recon, reg, stats = net(x)
                recon = recon.float()
                l1 = F.l1_loss(recon, x)
                loss = lc.l1_weight * l1 + reg
                if perceptual is not None:
                    p_loss = perceptual(recon, x)
                    loss = loss + lc.perceptual_weight * p_loss
                    logs["loss/perceptual"] += p_loss.item() / tc.grad_accum
                if adv_on:
                    g_loss = adversary.generator_loss(recon, x, lc.feature_matching_weight)
                    loss = loss + lc.adv_weight * g_loss
                    logs["loss/adv_g"] += g_loss.item() / tc.grad_accum
                (loss / tc.grad_accum).backward()
            logs["loss/total"] += loss.item() / tc.grad_accum
            logs["loss/l1"] += l1.item() / tc.grad_accum
            logs["loss/reg"] += reg.item() / tc.grad_accum
            for k, v in stats.items():
                logs[f"latent/{k}"] += float(v) / tc.grad_accum
            if adv_on:
                kept.append((recon.detach(), x))
        logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(trainable, tc.grad_clip))
        opt_g.step()
        sched_g.step()
        if adversary is not None:
            opt_d.zero_grad(set_to_none=True)  # drop what the generator's backward left on the discriminator
            for micro, (recon, x) in enumerate(kept):
                with no_sync(adversary.disc, micro < len(kept) - 1), autocast(ctx.device, cfg):
                    d_loss = adversary.discriminator_loss(recon, x)
                    (d_loss / len(kept)).backward()
                logs["loss/disc"] += d_loss.item() / len(kept)
            torch.nn.utils.clip_grad_norm_(adversary.parameters(), tc.grad_clip)
            opt_d.step()  # a no-op before the GAN starts (no gradients)
            sched_d.step()
        step += 1
        steps_since += 1
        history.append(logs["loss/total"])
        if ctx.is_main:
            with open(history_path, "a") as f:
                f.write(json.dumps({"step": step, **{k: round(v, 7) for k, v in logs.items()}}) + "\n")
        bar.update(1)

        if ctx.is_main and (step % tc.log_every == 0 or step == tc.max_steps):
            now = time.time()
            rate = steps_since / max(1e-9, now - t_last)
            t_last, steps_since = now, 0
            logs["lr"] = sched_g.get_last_lr()[0]
            logs["perf/steps_per_s"] = rate
            logs["perf/voxels_per_s"] = rate * x.numel() * tc.grad_accum * ctx.world
            for k, v in logs.items():
                writer.add_scalar(k, v, step)
            bar.set_postfix(loss=f"{logs['loss/total']:.4f}", l1=f"{logs['loss/l1']:.4f}", it_s=f"{rate:.2f}")
        if ctx.is_main and step % tc.image_every == 0:
            with torch.no_grad():
                writer.add_image("train/input|recon|error", midplane_panel(x[0, 0].cpu(), recon[0, 0].cpu()), step)
        if val_dirs and (step % tc.val_every == 0 or step == tc.max_steps):
            metrics, panel = validate(model, val_dirs, cfg, ctx)
            set_train_mode(model, tc.stage)
            if ctx.is_main:
                for k, v in metrics.items():
                    writer.add_scalar(f"val/{k}", v, step)
                if panel is not None:
                    writer.add_image("val/input|recon|error", panel, step)
                tqdm.write(f"step {step}: val PSNR {metrics['psnr']:.2f} dB, lung {metrics['psnr_lung']:.2f} dB, "
                           f"SSIM {metrics['ssim']:.4f}")
            if metrics["psnr"] > best:  # best = highest whole-volume val PSNR on [-1024, 2048] HU
                best = metrics["psnr"]
                if ctx.is_main:
                    ckpts.save_as("best.pt", {"step": step, "model": model.state_dict(), "val": metrics,
                                              "config": cfg.model_dump(mode="json"), "stage": tc.stage})
        why = halt_reason(ctx, stop.stop, stop_after, step - first_step)
        if step % tc.checkpoint_every == 0 or step == tc.max_steps or why:
            save(gather_rng(ctx))
        if why:
            if ctx.is_main:
                tqdm.write(f"stopped {why} at step {step}; checkpoint saved, rerun the same command to resume")
            break
    bar.close()
    return finish_run(ctx, model, writer, out_dir, {"step": step, "best_psnr": best, "last_losses": history[-5:]})


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the patch-volume autoencoder (stage 1 or 2, set in the config).")
    p.add_argument("--config", required=True, type=Path, help="YAML with data/autoencoder/loss/ae_train sections")
    p.add_argument("--cache", required=True, type=Path, help="prepared dataset (dataset/prepare.py --output)")
    add_run_arguments(p, "ae_train")
    p.add_argument("--init-from", type=Path, default=None, help="stage 2: override ae_train.init_from (stage-1 checkpoint)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = with_overrides(load_config(args.config), "ae_train", max_steps=args.max_steps,
                             init_from=args.init_from and str(args.init_from))
        train(cfg, args.cache, args.output, stop_after=args.stop_after)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

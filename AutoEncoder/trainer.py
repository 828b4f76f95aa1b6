"""Two-stage autoencoder training: the autoencoder's step inside the shared run loop (thinslice.loop), one process or DDP.

Stage 1 trains encoder, codebook and decoder on random patches. Stage 2 loads the stage-1
checkpoint, freezes encoder and codebook (excluded from the optimiser, kept in eval mode) and
fine-tunes the decoder on whole volumes or large crops encoded patch-wise, GAN on from the start.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from AutoEncoder.reconstruction import reconstruct_case
from AutoEncoder.losses import Adversary, MedicalNetPerceptualLoss, perceptual_weights_file
from AutoEncoder.model import PatchVolumeAutoencoder
from dataset.cache import cases_in_split
from dataset.patches import PatchStream, patch_loader
from thinslice import loop, precision
from thinslice.checkpoint import load_checkpoint, warmup_cosine
from thinslice.config import AutoencoderConfig, Config, ConfigError, add_set_argument, load_config
from thinslice.distributed import DistContext, init_distributed, no_sync
from thinslice.images import midplane_panel
from thinslice.run import add_run_arguments, use_bf16, with_overrides


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


class AutoencoderTask:
    """The autoencoder's part of the shared run loop (thinslice.loop): models, losses, data, one G + D step."""

    loss_key = "loss/total"
    panel_tag = "val/input|recon|error"

    def __init__(self, cfg: Config, ctx: DistContext, cache: Path | None):
        self.ctx, tc, lc = ctx, cfg.ae_train, cfg.loss
        self.tc, self.lc, self.stage2 = tc, lc, tc.stage == 2
        torch.manual_seed(tc.seed * 1000 + ctx.rank)
        self.model, self.cfg = build_model(cfg, ctx.device)
        self.bf16 = use_bf16(ctx.device, tc)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.perceptual = MedicalNetPerceptualLoss(lc.perceptual_weights).to(ctx.device) if lc.perceptual_weight > 0 else None
        self.adversary = Adversary(lc.disc_channels, lc.disc_layers, lc.adv_criterion).to(ctx.device) if lc.adv_weight > 0 else None
        self.opt_g = torch.optim.AdamW(self.trainable, lr=tc.lr, betas=(0.5, 0.9), weight_decay=0.0)
        self.sched_g = torch.optim.lr_scheduler.LambdaLR(self.opt_g, warmup_cosine(tc.warmup_steps, tc.max_steps))
        self.opt_d = self.sched_d = self.disc = None
        if self.adversary is not None:
            self.disc = self.adversary.disc
            self.opt_d = torch.optim.AdamW(self.adversary.parameters(), lr=tc.disc_lr, betas=(0.5, 0.9), weight_decay=0.0)
            self.sched_d = torch.optim.lr_scheduler.LambdaLR(self.opt_d, warmup_cosine(tc.warmup_steps, tc.max_steps))
        self.train_dirs = [d for split in tc.train_splits for d in cases_in_split(cache, split)] if cache is not None else []
        self.val_dirs = cases_in_split(cache, "val")[: tc.val_max_cases] if cache is not None else []
        self.step_count, self.batches, self.x, self.recon = 0, None, None, None

    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "opt_g": self.opt_g.state_dict(), "sched_g": self.sched_g.state_dict(),
                 "config": self.cfg.model_dump(mode="json"), "stage": self.tc.stage}
        if self.adversary is not None:
            state |= {"adversary": self.disc.state_dict(), "opt_d": self.opt_d.state_dict(),
                      "sched_d": self.sched_d.state_dict()}
        return state

    def best_state(self) -> dict:
        return {"model": self.model.state_dict(), "config": self.cfg.model_dump(mode="json"), "stage": self.tc.stage}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.sched_g.load_state_dict(state["sched_g"])
        if self.adversary is not None:
            self.disc.load_state_dict(state["adversary"])
            self.opt_d.load_state_dict(state["opt_d"])
            self.sched_d.load_state_dict(state["sched_d"])
        self.step_count = state["step"]

    def wrap(self) -> None:
        """DDP around the step module and the discriminator (the benchmark runs without)."""
        ctx = self.ctx
        set_train_mode(self.model, self.tc.stage)
        self.net = AutoencoderStep(self.model, self.stage2)
        if ctx.distributed:
            ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
            self.net = DDP(self.net, device_ids=ids)
            if self.adversary is not None:
                self.adversary.disc = DDP(self.disc, device_ids=ids)

    def start(self, step: int) -> str:
        ctx, tc, cfg = self.ctx, self.tc, self.cfg
        self.wrap()
        size = tc.crop_size if self.stage2 else cfg.autoencoder.patch_size
        batch = 1 if (self.stage2 and size is None) else tc.batch_size
        stream = PatchStream(self.train_dirs, cfg.data, size=size, seed=tc.seed)
        self.batches = iter(patch_loader(stream, batch, ctx.rank, ctx.world, start=step * tc.grad_accum,
                                         num_workers=tc.num_workers))
        self.step_count = step
        n_params = sum(p.numel() for p in self.model.parameters())
        return (f"autoencoder stage {tc.stage}: {n_params / 1e6:.2f} M parameters "
                f"({sum(p.numel() for p in self.trainable) / 1e6:.2f} M trained), {len(self.train_dirs)} train / "
                f"{len(self.val_dirs)} val cases, precision {precision.for_loop(ctx.device, tc)}")

    def train_step(self, batches: list[torch.Tensor] | None = None) -> dict[str, float]:
        """`batches`: the micro-batches to use (the benchmark's); the loader's otherwise."""
        tc, lc, ctx, adversary = self.tc, self.lc, self.ctx, self.adversary
        adv_on = adversary is not None and (self.stage2 or self.step_count >= lc.adv_start_step)
        logs: dict[str, float] = defaultdict(float)
        self.opt_g.zero_grad(set_to_none=True)
        kept = []
        for micro in range(tc.grad_accum):
            x = batches[micro] if batches is not None else next(self.batches)["image"]
            x = x.to(ctx.device, non_blocking=True)
            with no_sync(self.net, micro < tc.grad_accum - 1), autocast(ctx.device, self.cfg):
                recon, reg, stats = self.net(x)
                recon = recon.float()
                l1 = F.l1_loss(recon, x)
                loss = lc.l1_weight * l1 + reg
                if self.perceptual is not None:
                    p_loss = self.perceptual(recon, x)
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
        logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.trainable, tc.grad_clip))
        self.opt_g.step()
        self.sched_g.step()
        if adversary is not None:
            self.opt_d.zero_grad(set_to_none=True)  # drop what the generator's backward left on the discriminator
            for micro, (r, xx) in enumerate(kept):
                with no_sync(adversary.disc, micro < len(kept) - 1), autocast(ctx.device, self.cfg):
                    d_loss = adversary.discriminator_loss(r, xx)
                    (d_loss / len(kept)).backward()
                logs["loss/disc"] += d_loss.item() / len(kept)
            torch.nn.utils.clip_grad_norm_(adversary.parameters(), tc.grad_clip)
            self.opt_d.step()  # a no-op before the GAN starts (no gradients)
            self.sched_d.step()
        self.step_count += 1
        self.x, self.recon = x, recon
        return dict(logs)

    def log(self, step: int, logs: dict, rate: float) -> dict[str, float]:
        return {**logs, "lr": self.sched_g.get_last_lr()[0],
                "perf/voxels_per_s": rate * self.x.numel() * self.tc.grad_accum * self.ctx.world}

    def images(self, step: int) -> dict:
        if step % self.tc.image_every:
            return {}
        with torch.no_grad():
            return {"train/input|recon|error": midplane_panel(self.x[0, 0].cpu(), self.recon[0, 0].detach().cpu())}

    def validate(self) -> tuple[dict, torch.Tensor | None]:
        out = validate(self.model, self.val_dirs, self.cfg, self.ctx)
        set_train_mode(self.model, self.tc.stage)
        return out

    def describe(self, m: dict) -> str:
        # best = highest whole-volume val PSNR on [-1024, 2048] HU
        return f"val PSNR {m['psnr']:.2f} dB, lung {m['psnr_lung']:.2f} dB, SSIM {m['ssim']:.4f}"


def train(cfg: Config, cache: Path, out_dir: Path, stop_after: int | None = None,
          time_budget: float | None = None) -> dict:
    ctx = init_distributed()
    task = AutoencoderTask(cfg, ctx, cache)
    return loop.run(task, ctx, task.cfg, cfg.ae_train, out_dir, stop_after, has_val=bool(task.val_dirs),
                    time_budget=time_budget)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train the patch-volume autoencoder (stage 1 or 2, set in the config).")
    p.add_argument("--config", required=True, type=Path, help="YAML with data/autoencoder/loss/ae_train sections")
    p.add_argument("--cache", required=True, type=Path, help="prepared dataset (dataset/prepare.py --output)")
    add_run_arguments(p, "ae_train")
    add_set_argument(p)
    p.add_argument("--init-from", type=Path, default=None, help="stage 2: override ae_train.init_from (stage-1 checkpoint)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = with_overrides(load_config(args.config, args.overrides), "ae_train", max_steps=args.max_steps,
                             init_from=args.init_from and str(args.init_from))
        if cfg.loss.perceptual_weight > 0:  # before the process group, a checkpoint or the run folder is touched
            perceptual_weights_file(cfg.loss.perceptual_weights)
        train(cfg, args.cache, args.output, stop_after=args.stop_after, time_budget=args.time_budget)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0

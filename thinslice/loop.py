"""The run loop both trainers share (DiT's train.py, written once): resume from the latest checkpoint with every
rank's RNG, history.jsonl trimmed to it, TensorBoard, step-numbered atomic checkpoints, validation with val.jsonl
and best.pt, SIGTERM or --stop-after -> save and exit, the DDP check and result.json at the end.

A trainer supplies a `Task`: its models, its step, its validation and its state. The loop never looks inside.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Protocol

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from thinslice.atomic import write_json
from thinslice.checkpoint import Checkpoints, load_checkpoint, set_rng_state
from thinslice.distributed import DistContext
from thinslice.run import finish_run, gather_rng, halt_reason, trim_history
from thinslice.signals import StopFlag


class Task(Protocol):
    model: torch.nn.Module  # the trained module (compared across ranks at the end)
    loss_key: str  # the history entry the progress bar and result.json show
    panel_tag: str  # TensorBoard tag of the validation panel, naming its columns

    def state_dict(self) -> dict:
        """What a checkpoint holds besides step, best and the RNG states."""

    def load_state_dict(self, state: dict) -> None: ...

    def start(self, step: int) -> str:
        """Position the data at `step` (before the RNG is restored); return the start line's description."""

    def train_step(self) -> dict[str, float]:
        """One optimiser step (all micro-batches); what history.jsonl records for it."""

    def log(self, step: int, logs: dict[str, float], rate: float) -> dict[str, float]:
        """On every rank at a log step (collectives allowed): the scalars rank 0 writes to TensorBoard."""

    def images(self, step: int) -> dict[str, torch.Tensor]:
        """Rank 0, every step: TensorBoard images due at this step (usually none)."""

    def validate(self) -> tuple[dict, torch.Tensor | None]:
        """On every rank: metrics (with "psnr", higher is better) and an image panel or None."""

    def describe(self, metrics: dict) -> str: ...

    def best_state(self) -> dict:
        """What best.pt holds besides step and the metrics."""


def run(task: Task, ctx: DistContext, cfg, loop, out_dir: Path, stop_after: int | None = None,
        has_val: bool = True, time_budget: float | None = None) -> dict:
    """`cfg`: the whole validated config (config.json); `loop`: its trainer section (max_steps, log_every,
    val_every, checkpoint_every, keep_last)."""
    out_dir = Path(out_dir)
    ckpts = Checkpoints(out_dir / "checkpoints", loop.keep_last)
    step, best, resume_rng = 0, float("-inf"), None
    latest = ckpts.latest()
    if latest is not None:
        state = load_checkpoint(latest)
        task.load_state_dict(state)
        step, best = state["step"], state["best_psnr"]
        resume_rng = state["rng"][ctx.rank] if ctx.rank < len(state["rng"]) else state["rng"][0]
    what = task.start(step)

    writer = SummaryWriter(out_dir / "tensorboard") if ctx.is_main else None
    history_path = out_dir / "history.jsonl"
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "config.json", cfg.model_dump(mode="json"))
        print(f"{what}, world {ctx.world}, device {ctx.device}, starting at step {step}", flush=True)
        if not has_val:
            print("no val case: validation and best-checkpoint selection are skipped", flush=True)
        trim_history(history_path, step)
        trim_history(out_dir / "val.jsonl", step)
    if resume_rng is not None:  # last: building models, loaders and validation data above draws random numbers
        set_rng_state(resume_rng)

    def save():
        rngs = gather_rng(ctx)
        if ctx.is_main:
            ckpts.save(step, {"step": step, "best_psnr": best, "rng": rngs, **task.state_dict()})
        ctx.barrier()

    first_step, stop, losses = step, StopFlag(), []
    bar = tqdm(total=loop.max_steps, initial=step, disable=not ctx.is_main, unit="step", dynamic_ncols=True)
    t_last, steps_since, t_start = time.time(), 0, time.perf_counter()
    why = None
    while step < loop.max_steps:
        logs = task.train_step()
        step += 1
        steps_since += 1
        losses.append(logs[task.loss_key])
        bar.update(1)
        if ctx.is_main:
            with open(history_path, "a") as f:
                f.write(json.dumps({"step": step, **{k: round(v, 7) for k, v in logs.items()}}) + "\n")
            for tag, image in task.images(step).items():
                writer.add_image(tag, image, step)

        if step % loop.log_every == 0 or step == loop.max_steps:
            now = time.time()
            rate = steps_since / max(1e-9, now - t_last)
            t_last, steps_since = now, 0
            scalars = task.log(step, logs, rate)
            if ctx.is_main:
                for k, v in {**scalars, "perf/steps_per_s": rate}.items():
                    writer.add_scalar(k, v, step)
                bar.set_postfix(loss=f"{logs[task.loss_key]:.4f}", it_s=f"{rate:.2f}")
        if has_val and (step % loop.val_every == 0 or step == loop.max_steps):
            metrics, panel = task.validate()
            if ctx.is_main:
                for k, v in metrics.items():
                    writer.add_scalar(f"val/{k}", v, step)
                if panel is not None:
                    writer.add_image(task.panel_tag, panel, step)
                with open(out_dir / "val.jsonl", "a") as f:
                    f.write(json.dumps({"step": step, **metrics}) + "\n")
                tqdm.write(f"step {step}: {task.describe(metrics)}")
            if metrics["psnr"] > best:
                best = metrics["psnr"]
                if ctx.is_main:
                    ckpts.save_as("best.pt", {"step": step, "val": metrics, **task.best_state()})
        why = halt_reason(ctx, stop.stop, stop_after, step - first_step, (time.perf_counter() - t_start) / 60,
                          time_budget)
        if step % loop.checkpoint_every == 0 or step == loop.max_steps or why:
            save()
        if why:
            if ctx.is_main:
                tqdm.write(f"stopped {why} at step {step}; checkpoint saved, rerun the same command to resume")
            break
    bar.close()
    return finish_run(ctx, task.model, writer, out_dir, {"step": step, "max_steps": loop.max_steps, "stopped": why,
                                                         "best_psnr": best, "last_losses": losses[-5:]})

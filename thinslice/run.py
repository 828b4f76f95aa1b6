"""What the autoencoder and U-Net trainers share around their loops: command-line overrides, the bf16
rule, RNG states for resume, the history trim, when to stop, and the DDP sanity check at the end."""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

from thinslice import precision
from thinslice.checkpoint import rng_state
from thinslice.config import Config
from thinslice.atomic import write_json
from thinslice.distributed import DistContext, cleanup


def add_run_arguments(p: argparse.ArgumentParser, section: str) -> None:
    p.add_argument("--output", required=True, type=Path, help="run folder; rerunning resumes from its latest checkpoint")
    p.add_argument("--max-steps", type=int, default=None, help=f"override {section}.max_steps")
    p.add_argument("--stop-after", type=int, default=None,
                   help="save and stop after this many steps of this invocation (time-boxed jobs); rerun to resume")
    p.add_argument("--time-budget", type=float, default=None, metavar="MINUTES",
                   help="save and stop once this invocation has trained this long (a demo sized to the machine, a "
                        "job's wall-clock slot); the schedule stays the one of max_steps; rerun to resume")


def with_overrides(cfg: Config, section: str, **values) -> Config:
    """cfg with the non-None values replacing keys of one section (command-line flags over the YAML)."""
    values = {k: v for k, v in values.items() if v is not None}
    if not values:
        return cfg
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=values)})


def use_bf16(device: torch.device, loop) -> bool:
    """bf16 autocast by the one precision policy (thinslice.precision): CUDA, or a CPU with bf16 instructions."""
    return precision.for_loop(device, loop).bf16


def gather_rng(ctx: DistContext) -> list:
    """Every rank's RNG state, so a resumed run continues each rank's random stream."""
    if not ctx.distributed:
        return [rng_state()]
    states = [None] * ctx.world
    dist.all_gather_object(states, rng_state())
    return states


def trim_history(path: Path, step: int) -> None:
    """Drop what a killed run logged after its last checkpoint, so history.jsonl matches the resumed run."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in kept))


def halt_reason(ctx: DistContext, signalled: bool, stop_after: int | None, steps_done: int,
                minutes: float = 0.0, time_budget: float | None = None) -> str | None:
    """Why every rank stops now (a signal on any rank, --stop-after, or --time-budget spent on any rank), or None
    to go on. Ranks agree through one all-reduce, so none waits in a collective another has left."""
    over_time = time_budget is not None and minutes >= time_budget
    flag = ctx.all_reduce_max(2.0 * float(signalled) + float(over_time))
    if flag >= 2:
        return "by signal"
    if stop_after is not None and steps_done >= stop_after:
        return f"after {stop_after} steps (--stop-after)"
    if flag >= 1:
        return f"after {time_budget:g} min (--time-budget)"
    return None


def params_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def ranks_identical(ctx: DistContext, module: torch.nn.Module) -> bool:
    digests = [None] * ctx.world
    dist.all_gather_object(digests, params_digest(module))
    return len(set(digests)) == 1


def finish_run(ctx: DistContext, model: torch.nn.Module, writer, out_dir: Path, result: dict) -> dict:
    """End of a trainer: the DDP rank check, result.json (rank 0, atomic), process group torn down."""
    if ctx.distributed:
        result["ranks_identical"] = ranks_identical(ctx, model)
    if ctx.is_main:
        writer.close()
        write_json(Path(out_dir) / "result.json", result)
    if ctx.distributed:  # leave together: a rank that tore gloo down while rank 0 still wrote once aborted (SIGABRT)
        ctx.barrier()
    cleanup()
    return result

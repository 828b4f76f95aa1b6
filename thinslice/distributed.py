"""torchrun-aware process setup: device from LOCAL_RANK, nccl on GPU, gloo on CPU."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_max(self, value: float) -> float:
        if not self.distributed:
            return value
        t = torch.tensor([float(value)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t


def init_distributed(timeout_minutes: float = 120.0, device: str | None = None) -> DistContext:
    """Under torchrun (WORLD_SIZE > 1) join the process group; otherwise run as one process.

    The long timeout lets ranks wait at a barrier while rank 0 writes a checkpoint or validates.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world > 1 and "LOCAL_RANK" not in os.environ:
        # A Kubeflow pod without torchrun: WORLD_SIZE/RANK count pods, so this runs one process per pod.
        print(f"warning: WORLD_SIZE={world} without torchrun: one process per pod, on GPU 0 only; "
              "start the script with torchrun to use every GPU of the pod", flush=True)
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
    rank = dist.get_rank() if world > 1 else 0
    return DistContext(rank, world, local_rank, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def no_sync(module, enabled: bool):
    """DDP's no_sync for gradient-accumulation micro-steps; a no-op for a plain module."""
    if enabled and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()

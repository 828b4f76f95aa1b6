"""One precision policy for training, latent generation, benchmarks and interpolation.

bf16 autocast pays on CUDA and on CPUs with bf16 instructions (AMX or AVX-512-BF16: about 1.5-3x
faster 3D convolutions), but on an AVX2-only CPU one bf16 Conv3d runs about 100x slower than fp32
(50 s vs 0.11 s measured), so the choice is made from the hardware, never from a config default.
A config may still force either way (`bf16: false` forbids it; `cpu_bf16: true/false` forces it on
CPU).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    bf16: bool
    reason: str

    def autocast(self, device: torch.device | str):
        device_type = torch.device(device).type
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=torch.bfloat16)

    def __str__(self) -> str:
        return f"{'bf16 autocast' if self.bf16 else 'fp32'} ({self.reason})"


def cpu_bf16_instructions() -> tuple[bool, str]:
    """Whether this CPU has bf16 instructions, and what torch reports about it."""
    capability = torch.backends.cpu.get_cpu_capability()
    amx = _probe("_is_amx_tile_supported")
    avx512_bf16 = _probe("_is_avx512_bf16_supported")
    return capability_has_bf16(capability, amx=amx, avx512_bf16=avx512_bf16)


def capability_has_bf16(capability: str, amx: bool = False, avx512_bf16: bool = False) -> tuple[bool, str]:
    """The rule itself, separate from the probe so a test can pin it (AVX2-only gives False)."""
    if capability in ("AVX512", "AMX") and (amx or avx512_bf16):
        what = "AMX" if amx else "AVX-512-BF16"
        return True, f"CPU {capability} with {what}"
    return False, f"CPU {capability} without bf16 instructions: bf16 convolutions would be far slower than fp32"


def _probe(name: str) -> bool:
    fn = getattr(torch.cpu, name, None)
    try:
        return bool(fn()) if fn else False
    except Exception:  # an older torch or an unusual platform: assume no
        return False


def choose(device: torch.device | str, allowed: bool = True, cpu_bf16: bool | None = None) -> Precision:
    """bf16 on CUDA; on CPU when it has bf16 instructions (or `cpu_bf16` forces it); fp32 otherwise."""
    device = torch.device(device)
    if not allowed:
        return Precision(False, "bf16 disabled by config")
    if device.type == "cuda":
        return Precision(True, "CUDA")
    if device.type != "cpu":
        return Precision(False, f"{device.type}: fp32")
    if cpu_bf16 is not None:
        return Precision(bool(cpu_bf16), f"cpu_bf16: {str(bool(cpu_bf16)).lower()} in the config")
    ok, why = cpu_bf16_instructions()
    return Precision(ok, why)


def for_loop(device: torch.device | str, loop) -> Precision:
    """The policy for a trainer's loop config (`bf16`, `cpu_bf16`)."""
    return choose(device, loop.bf16, loop.cpu_bf16)


def cpu_model() -> str:
    """The CPU's name and logical cores, for timings that must say what they ran on."""
    import os
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"

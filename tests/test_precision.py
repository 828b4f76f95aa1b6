"""The one precision policy: bf16 only where the hardware has it, or where a config forces it."""
import os
from pathlib import Path

import pytest
import torch

from thinslice import precision
from thinslice.config import TrainingLoop


def test_avx2_only_cpu_gives_fp32(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: precision.capability_has_bf16("AVX2"))
    p = precision.choose("cpu")
    assert not p.bf16 and "AVX2" in p.reason
    assert not precision.for_loop("cpu", TrainingLoop()).bf16  # a config default never turns it on


def test_rule_on_capabilities():
    assert not precision.capability_has_bf16("AVX2")[0]
    assert not precision.capability_has_bf16("AVX512")[0]  # AVX-512 without BF16 / AMX
    assert precision.capability_has_bf16("AVX512", avx512_bf16=True)[0]
    assert precision.capability_has_bf16("AVX512", amx=True)[0]
    assert not precision.capability_has_bf16("DEFAULT", amx=True)[0]


def test_bf16_cpu_and_overrides(monkeypatch):
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: precision.capability_has_bf16("AVX512", amx=True))
    assert precision.choose("cpu").bf16
    assert not precision.choose("cpu", allowed=False).bf16
    assert not precision.for_loop("cpu", TrainingLoop(cpu_bf16=False)).bf16
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: precision.capability_has_bf16("AVX2"))
    assert precision.for_loop("cpu", TrainingLoop(cpu_bf16=True)).bf16  # forced, said so
    assert "config" in precision.for_loop("cpu", TrainingLoop(cpu_bf16=True)).reason
    assert precision.choose(torch.device("cuda")).bf16


def test_autocast_context_matches_choice():
    x = torch.randn(2, 4)
    lin = torch.nn.Linear(4, 4)
    with precision.Precision(False, "t").autocast("cpu"):
        assert lin(x).dtype == torch.float32
    with precision.Precision(True, "t").autocast("cpu"):
        assert lin(x).dtype == torch.bfloat16


def test_the_real_probe_agrees_with_this_machines_cpu_flags():
    """Not a monkeypatched rule: the probe itself, on this CPU. bf16 instructions are AMX or AVX-512-BF16
    (the module's documented rule) on top of the AVX-512 that torch's AVX512/AMX kernels need."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        pytest.skip("no /proc/cpuinfo on this platform")
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    # each sub-probe reads the hardware (a probe that silently answers a constant would agree with an AVX2 CPU only)
    assert precision._probe("_is_avx512_bf16_supported") == ("avx512_bf16" in flags)
    assert precision._probe("_is_amx_tile_supported") == ("amx_tile" in flags)
    capability = torch.backends.cpu.get_cpu_capability()
    if "ATEN_CPU_CAPABILITY" not in os.environ:  # torch dispatches AVX-512 kernels only where the CPU has them
        assert (capability in ("AVX512", "AMX")) == ({"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags)
    expected = capability in ("AVX512", "AMX") and bool({"avx512_bf16", "amx_tile"} & flags)
    ok, why = precision.cpu_bf16_instructions()
    assert ok == expected and capability in why
    policy = precision.choose("cpu")
    assert policy.bf16 == expected and policy.reason == why
    if not {"avx512_bf16", "amx_tile", "amx_bf16"} & flags:  # e.g. this project's AVX2-only CI machine
        assert not policy.bf16 and not precision.for_loop("cpu", TrainingLoop()).bf16

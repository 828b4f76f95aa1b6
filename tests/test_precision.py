"""The one precision policy: bf16 only where the hardware has it, or where a config forces it."""
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

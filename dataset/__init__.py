"""Real CT in, cached thin/thick pairs out: readers, thick-slab simulation, intensity, split, patches."""
from dataset.errors import CaseError
from dataset.volume import CTVolume

__all__ = ["CaseError", "CTVolume"]

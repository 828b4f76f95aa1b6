"""Step-numbered checkpoints: atomic writes, the last K kept, a `latest` pointer, safe loading."""
from __future__ import annotations

import hashlib

import math
import re
from pathlib import Path

import torch

from thinslice.atomic import atomic_path, write_text

_STEP = re.compile(r"step_(\d+)\.pt$")


class Checkpoints:
    def __init__(self, folder: str | Path, keep_last: int = 3):
        self.folder = Path(folder)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}.pt"

    def save(self, step: int, state: dict) -> Path:
        path = self.path_for(step)
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        write_text(self.folder / "latest", path.name + "\n")
        for old in self.steps()[: -self.keep_last]:
            self.path_for(old).unlink(missing_ok=True)
        return path

    def save_as(self, name: str, state: dict) -> Path:
        path = self.folder / name
        with atomic_path(path) as tmp:
            torch.save(state, tmp)
        return path

    def steps(self) -> list[int]:
        if not self.folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _STEP.search(p.name)))

    def latest(self) -> Path | None:
        pointer = self.folder / "latest"
        if pointer.is_file():
            path = self.folder / pointer.read_text().strip()
            if path.is_file():
                return path
        steps = self.steps()
        return self.path_for(steps[-1]) if steps else None


def load_checkpoint(path: str | Path) -> dict:
    """Tensors and plain containers only (weights_only): a checkpoint cannot run code on load."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def warmup_cosine(warmup: int, total: int, floor: float = 0.1):
    """LR multiplier: linear warmup, then cosine decay to `floor`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def file_fingerprint(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]

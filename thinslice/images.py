"""Mid-plane panels for TensorBoard: rows axial / coronal / sagittal, columns input | output | error."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _planes(v: torch.Tensor) -> list[torch.Tensor]:
    x, y, z = v.shape
    return [v[:, :, z // 2], v[:, y // 2, :], v[x // 2, :, :]]


def midplane_panel(target: torch.Tensor, output: torch.Tensor, size: int = 128) -> torch.Tensor:
    """(X, Y, Z) volumes in [-1, 1] -> (1, H, W) image in [0, 1] for SummaryWriter.add_image."""
    rows = []
    for t, o in zip(_planes(target.float()), _planes(output.float())):
        err = (o - t).abs().clamp(0, 1) * 2 - 1
        tiles = [F.interpolate(p.T[None, None], size=(size, size), mode="nearest")[0, 0] for p in (t, o, err)]
        rows.append(torch.cat(tiles, dim=1))
    return ((torch.cat(rows, dim=0).clamp(-1, 1) + 1) / 2)[None]

"""A latent view for the learnability check: one case is the whole training set and its own z-pair crops
at one slab thickness the validation set (benchmarks/learnability.py is its command line)."""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from thinslice.atomic import atomic_path, write_json


def make_view(latents: Path, case_id: str, out: Path, slab: float, n_val: int) -> dict:
    index = json.loads((latents / "index.json").read_text())
    (entry,) = [c for c in index["cases"] if c["case_id"] == case_id]
    out.mkdir(parents=True, exist_ok=True)
    src = (latents / entry["file"]).resolve()
    link = out / entry["file"]
    if not link.exists():
        link.symlink_to(src)
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        pairs = json.loads(meta["pairs"])
        chosen = [k for k, d in enumerate(pairs) if d["kind"] == "z" and abs(d["slab_mm"] - slab) < 1e-6][:n_val]
        if not chosen:
            raise SystemExit(f"{case_id} has no z pair at {slab:g} mm")
        tensors = {f"pair{j}.{part}": f.get_tensor(f"pair{k}.{part}")
                   for j, k in enumerate(chosen) for part in ("thin", "cond", "cond_image", "thin_image")}
    val_file = f"{case_id}.val.safetensors"
    with atomic_path(out / val_file) as tmp:
        save_file(tensors, str(tmp), metadata={**meta, "split": "val", "pairs": json.dumps([pairs[k] for k in chosen])})
    view = {**index, "cases": [{**entry, "split": "train"}, {**entry, "split": "val", "file": val_file, "pairs": len(chosen)}]}
    write_json(out / "index.json", view)
    return view

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dataset.volume import CTVolume
from ddpm.latents import main, thick_on_thin_grid


@pytest.fixture
def checkpoint(tiny_ae_checkpoint):
    return tiny_ae_checkpoint


def test_cubic_resampling_onto_the_thin_grid_keeps_slab_centres():
    thick = CTVolume(np.arange(4 * 4 * 6, dtype=np.float32).reshape(4, 4, 6), np.diag([1.0, 1.0, 5.0, 1.0]))
    thin = CTVolume(np.zeros((4, 4, 26), np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))
    up = thick_on_thin_grid(thick, thin)
    assert np.allclose(up[..., 0::5], thick.array, atol=1e-4)  # thin slice 5k sits on thick slice k
    mid = thick.array[..., 2] + 0.4 * (thick.array[..., 3] - thick.array[..., 2])  # a ramp stays a ramp inside
    assert np.allclose(up[..., 12], mid, atol=2e-2)


def files(folder):
    """Content of every latent file (safetensors writes metadata keys in no fixed order, so not bytes)."""
    out = {}
    for p in sorted(folder.glob("*.safetensors")):
        with safe_open(str(p), "pt") as f:
            out[p.name] = (f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()})
    return out


def test_generation_resumes_to_the_same_files_and_reencodes_a_new_autoencoder(bundled_cache, checkpoint, tmp_path):
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    assert main(["--cache", str(bundled_cache), "--checkpoint", str(checkpoint), "--output", str(clean), "--no-pairs"]) == 0
    index = json.loads((clean / "index.json").read_text())
    assert len(index["cases"]) == 3 and index["scale_factor"] > 0
    with safe_open(str(clean / "dicom__totalseg-s3_abdomen_2mm.safetensors"), "pt") as f:
        thin, cond, meta = f.get_tensor("thin"), f.get_tensor("cond"), f.metadata()
    assert thin.dtype == torch.float16 and thin.shape == cond.shape == (8, 128, 128, 5)
    assert meta["split"] == "train" and json.loads(meta["image_shape"]) == [512, 512, 20]
    # a killed run: one case written, one missing, a temp file left behind
    assert main(["--cache", str(bundled_cache), "--checkpoint", str(checkpoint), "--output", str(resumed), "--no-pairs"]) == 0
    (resumed / "thin__lidc-idri-0314_chest_1.0mm_crop-z88-168_inplane2x.safetensors").unlink()
    (resumed / "index.json").unlink()
    (resumed / ".x.safetensors.tmp").write_bytes(b"half")
    stamp = (resumed / "dicom__totalseg-s3_abdomen_2mm.safetensors").stat().st_mtime_ns
    assert main(["--cache", str(bundled_cache), "--checkpoint", str(checkpoint), "--output", str(resumed), "--no-pairs"]) == 0
    assert files(resumed) == files(clean)
    assert (resumed / "dicom__totalseg-s3_abdomen_2mm.safetensors").stat().st_mtime_ns == stamp  # skipped
    assert json.loads((resumed / "index.json").read_text()) == index
    # another autoencoder: every case is encoded again
    state = torch.load(checkpoint, weights_only=True)
    state["step"] = 1
    other = tmp_path / "other.pt"
    torch.save(state, other)
    assert main(["--cache", str(bundled_cache), "--checkpoint", str(other), "--output", str(resumed), "--no-pairs"]) == 0
    assert (resumed / "dicom__totalseg-s3_abdomen_2mm.safetensors").stat().st_mtime_ns != stamp

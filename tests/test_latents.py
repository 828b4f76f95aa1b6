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


@pytest.mark.parametrize("capability", ["AVX2", "AVX512_BF16"])
def test_training_and_inference_encode_a_volume_alike(weights, chest_block, capability, monkeypatch):
    """Latent generation (the U-Net's training data) and interpolation (its input at inference) each load the
    autoencoder their own way; both must pick the same precision and window, so the latents agree up to
    the float16 that latents are stored in. Checked for an AVX2-only CPU (fp32) and a bf16 one. (Interpolation
    encodes with patches that do not overlap, `interpolate.encode_overlap: 0`, a measured speed trade; here both
    use the autoencoder's own overlap so that only precision and window are compared.)"""
    from AutoEncoder.codec import Codec
    from ddpm.latents import encode_hu as training_encode
    from evaluation.interpolation import Models
    from thinslice import precision
    from thinslice.config import InterpolateConfig

    has = precision.capability_has_bf16("AVX512", avx512_bf16=True) if capability != "AVX2" else \
        precision.capability_has_bf16("AVX2")
    monkeypatch.setattr(precision, "cpu_bf16_instructions", lambda: has)
    ae, unet = weights
    hu = chest_block.array[:64, :64, :32]
    codec, _ = Codec.load(ae)
    models = Models.load(ae, unet, torch.device("cpu"))
    assert codec.precision.bf16 == models.precision.bf16 == (capability != "AVX2")
    assert codec.window == models.window
    train_z = training_encode(codec, hu).float()
    infer_z = models.inferer(InterpolateConfig(encode_overlap=None)).encode(hu)[0].float()
    torch.testing.assert_close(train_z, infer_z, rtol=2e-3, atol=2e-3)  # float16 storage

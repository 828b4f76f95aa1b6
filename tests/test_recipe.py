"""One recipe, several sizes: every shipped config is config/recipe.yaml plus size keys and declared differences,
and the cluster's jobs (kub_files/) run that recipe end to end."""
import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from thinslice.config import (DATA_KEYS, SIZE_KEYS, STAGE_KEYS, _known_path, _leaves, load_config,
                              recipe_differences)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "config").glob("*.yaml"))
RECIPE = ROOT / "config" / "recipe.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_is_the_recipe_at_a_size(path):
    assert recipe_differences(path, RECIPE) == []


def test_the_recipe_sets_no_size_and_the_allowed_keys_exist():
    """Sizes live in size files only, so a size never silently becomes part of what 'works'."""
    assert all(_known_path(k) for k in SIZE_KEYS | STAGE_KEYS | DATA_KEYS)
    raw = yaml.safe_load(RECIPE.read_text())
    assert "recipe" not in raw and "differs" not in raw
    allowed = SIZE_KEYS | STAGE_KEYS | DATA_KEYS
    assert [k for k in _leaves(raw) if any(k == a or k.startswith(a + ".") for a in allowed)] == ["ae_train.stage"]


def test_a_recipe_key_changed_in_a_size_file_is_caught(tmp_path):
    """The check itself: a size file that changes what works (here the final-step training of the U-Net) is red
    until it declares why; a declaration that no longer differs is red too."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    cluster, recipe = tmp_path / "config" / "cluster.yaml", tmp_path / "config" / "recipe.yaml"
    text = cluster.read_text()
    cluster.write_text(text + "diffusion:\n  min_snr_gamma: 5.0\n")
    assert recipe_differences(cluster, recipe) == [
        f"{cluster}: diffusion.min_snr_gamma is 5.0, the recipe's is None: not a size key; declare it under differs: "
        "with the reason, or drop it"]
    cluster.write_text(text + "diffusion:\n  min_snr_gamma: 5.0\ndiffers:\n  diffusion.min_snr_gamma: a reason\n")
    assert recipe_differences(cluster, recipe) == []
    cluster.write_text(text + "differs:\n  diffusion.min_snr_gamma: a reason\n")
    assert "is declared but equals the recipe" in recipe_differences(cluster, recipe)[0]
    # a file of its own (not descending from the recipe) is not a shipped size
    (tmp_path / "config" / "own.yaml").write_text("unet: {cond_image: true}\n")
    assert "does not descend from" in recipe_differences(tmp_path / "config" / "own.yaml", recipe)[0]


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster_autoencoder_stage2.yaml"])
def test_missing_medicalnet_weights_stop_the_autoencoder_before_it_starts(name, tmp_path, monkeypatch, capsys):
    from AutoEncoder.trainer import main as train_main
    from thinslice.weights import find_weights

    cfg = load_config(ROOT / "config" / name)
    monkeypatch.delenv("THINSLICE_PRETRAINED", raising=False)
    monkeypatch.chdir(tmp_path)
    try:
        find_weights(cfg.loss.perceptual_weights)
        pytest.skip("MedicalNet weights are installed here")
    except FileNotFoundError:
        pass
    assert train_main(["--config", str(ROOT / "config" / name), "--cache", str(tmp_path / "cache"),
                       "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "perceptual loss: missing pretrained/medicalnet_resnet10_23datasets.pth" in err
    assert "THINSLICE_PRETRAINED" in err and "perceptual_weight: 0" in err
    assert not (tmp_path / "run").exists()  # nothing started


def test_interpolation_samples_as_its_config_says(tmp_path, monkeypatch):
    """One name for the sampler and its steps: the interpolation reads diffusion.sampler / sample_steps of the config
    it is given (the recipe's 1 step; the defaults without one), and --steps overrides the steps."""
    import evaluation.interpolate_cli as cli

    seen = []

    def load(autoencoder, unet, device, policy=None, sampling=None):
        seen.append((sampling.sampler, sampling.sample_steps))
        raise FileNotFoundError("stop here")

    monkeypatch.setattr(cli.Models, "load", load)
    (tmp_path / "ddpm.yaml").write_text(f"recipe: {ROOT / 'config' / 'cluster.yaml'}\n"
                                        "diffusion: {sampler: ddpm, sample_steps: 25}\n"
                                        "differs: {diffusion.sampler: a test, diffusion.sample_steps: a test}\n")
    base = ["--input", str(tmp_path / "x.nii.gz"), "--output", str(tmp_path / "out")]
    for extra in ([], ["--config", str(ROOT / "config" / "cluster.yaml")], ["--config", str(tmp_path / "ddpm.yaml")],
                  ["--config", str(tmp_path / "ddpm.yaml"), "--steps", "3"]):
        assert cli.main(base + extra) == 2
    assert seen == [("ddim", 1), ("ddim", 1), ("ddpm", 25), ("ddpm", 3)]


# The cluster config shrunk by size keys only (the test asserts it): tiny networks, a few steps, every job's
# command otherwise as the manifest has it. Data keys pin the bundled CT: the LIDC chest is the test case, the
# DICOM abdomen validates (best.pt is what the next job reads), the thin chest and the thick-only chest train.
SHRINK = {
    "data": {"patient_regex": r"(lidc-idri-\d+|totalseg-s\d+|elastix-3dct-lung)",
             "split": {"fixed": {"lidc-idri-0314": "test", "totalseg-s1": "val", "totalseg-s3": "train",
                                 "elastix-3dct-lung": "train"}}},
    "autoencoder": {"channels": [8, 8, 8], "encoder_attention": False, "patch_size": [32, 32, 32],
                    "decode_chunk": [32, 32, 32]},
    "loss": {"disc_channels": 8, "disc_layers": 2},
    "ae_train": {"batch_size": 1, "max_steps": 1, "warmup_steps": 1, "num_workers": 0, "log_every": 1,
                 "image_every": 1, "val_every": 1, "val_max_cases": 1, "checkpoint_every": 1, "keep_last": 1},
    "latents": {"crop": [32, 32, 16], "crops_per_pair": 1},
    "unet": {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1], "window": 2,
             "dit_depth": 1, "heads": 2, "global_depth": 1},
    "unet_train": {"crop_size": [8, 8, 8], "samples_per_case": 2, "batch_size": 2, "max_steps": 1, "warmup_steps": 1,
                   "ema_decay": 0.9, "num_workers": 0, "log_every": 1, "val_every": 1, "val_crop": [8, 8, 8],
                   "val_max_cases": 1, "checkpoint_every": 1, "keep_last": 1},
    "interpolate": {"adapt_steps": 2},
    "differs": {"interpolate.adapt_steps": "the test runs the job, it does not measure the adapter's gain"},
}
PER_FILE = {"cluster.yaml": {"loss": {"adv_start_step": 0}},  # the GAN's step runs in stage 1 too
            "cluster_autoencoder_stage2.yaml": {"ae_train": {"crop_size": [32, 32, 16]}}}
ORDER = ["prepare-job.yaml", "ae-stage1-pytorchjob.yaml", "ae-stage2-pytorchjob.yaml", "latents-job.yaml",
         "unet-pytorchjob.yaml", "export-job.yaml", "interpolate-job.yaml"]
# Blocks of the bundled CT (index ranges per axis), so every step's real work stays small: the LIDC chest is the
# test case, the TotalSegmentator chest validates (best.pt is what the next job reads), the DICOM abdomen (thin)
# and the thick-only chest (whole) train
BUNDLED = {"thin/lidc-idri-0314_chest.nii.gz": ("thin/lidc-idri-0314_chest_1.0mm_crop-z88-168_inplane2x.nii.gz",
                                                 (slice(80, 176), slice(80, 176), slice(20, 60))),
           "thin/totalseg-s1_chest.nii.gz": ("thin/totalseg-s1_chest_1.5mm-resampled_crop-z64-144.nii.gz",
                                             (slice(60, 156), slice(40, 136), slice(16, 64))),
           "thin/totalseg-s3_abdomen.nii.gz": ("dicom/totalseg-s3_abdomen_2mm",
                                               (slice(192, 320), slice(192, 320), slice(None))),
           "thick/elastix-3dct-lung_chest_5mm.nii.gz": ("thick/elastix-3dct-lung_chest_5mm-downsampled.nii.gz",
                                                        (slice(None),) * 3)}


def shrunk_config(name: str, folder: Path) -> Path:
    path = folder / name
    body = {**SHRINK, **{k: {**SHRINK.get(k, {}), **v} for k, v in PER_FILE.get(name, {}).items()}}
    path.write_text(yaml.safe_dump({"recipe": str(ROOT / "config" / name), **body}, sort_keys=False))
    return path


# The entry point of each plain-python job's script or module (the scripts in train/ and evaluation/ call these)
IN_PROCESS = {"dataset/prepare.py": "dataset.prepare", "ddpm.export": "ddpm.export",
              "evaluation/interpolate.py": "evaluation.interpolate_cli"}


def job_command(manifest: str, data: Path, configs: Path) -> tuple[list[str], dict]:
    """The manifest's own command and environment, with /data in a temporary folder, its config shrunk, and
    torchrun as 2 CPU processes (the operator's PET_* variables are what a real pod adds)."""
    doc = yaml.safe_load((ROOT / "kub_files" / manifest).read_text())
    spec = (doc["spec"]["pytorchReplicaSpecs"]["Master"] if doc["kind"] == "PyTorchJob" else doc["spec"])["template"]
    c = spec["spec"]["containers"][0]
    argv = [a.replace("/data", str(data)) if a.startswith("/data") else a for a in c["command"] + c.get("args", [])]
    argv = [str(shrunk_config(Path(a).name, configs)) if a.startswith("config/") else a for a in argv]
    env = {e["name"]: e["value"].replace("/data", str(data)) for e in c.get("env", [])}
    if argv[0] == "torchrun":
        script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *argv[script:]]
    else:
        assert argv[0] == "python"
        argv = [sys.executable, *argv[1:]]
    return argv, env


@pytest.mark.slow
def test_every_job_runs_the_recipe_in_order_under_torchrun(tmp_path, monkeypatch):
    """prepare -> autoencoder stage 1 and 2 -> latents with pairs -> U-Net -> export -> interpolate, each the
    command its manifest runs, on blocks of the bundled CT; the trainers and the latents under torchrun as 2 gloo
    processes, the python jobs' main called with their arguments."""
    import nibabel as nib
    import numpy as np
    import torch

    from AutoEncoder.losses import medicalnet_resnet10
    from dataset.readers import read_volume
    from dataset.volume import CTVolume

    data, configs = tmp_path / "data", tmp_path / "configs"
    configs.mkdir()
    for name, (source, block) in BUNDLED.items():
        vol = read_volume(ROOT / "data" / "ct" / source)
        start = [sl.start or 0 for sl in block]
        affine = vol.affine.copy()
        affine[:3, 3] = (vol.affine @ np.array([*start, 1.0]))[:3]
        (data / "raw" / name).parent.mkdir(parents=True, exist_ok=True)
        nib.save(CTVolume(np.ascontiguousarray(vol.array[block]), affine).to_nifti(), data / "raw" / name)
    # stand-in MedicalNet weights (random, the released file's layout) where the jobs look (THINSLICE_PRETRAINED)
    (data / "pretrained").mkdir()
    torch.manual_seed(0)
    torch.save({"state_dict": {f"module.{k}": v for k, v in medicalnet_resnet10().state_dict().items()}},
               data / "pretrained" / "medicalnet_resnet10_23datasets.pth")
    assert sorted(p.name for p in (ROOT / "kub_files").glob("*.yaml")) == sorted(ORDER + ["pvc.yaml"])
    for name in ("cluster.yaml", "cluster_autoencoder_stage2.yaml"):
        shrunk_config(name, configs)
    # the shrink changes sizes (and the one declared difference) only: the jobs run the cluster's recipe
    for path in configs.glob("*.yaml"):
        assert recipe_differences(path, RECIPE) == []
        ours = _leaves(load_config(path).model_dump(mode="json"))
        cluster = _leaves(load_config(ROOT / "config" / path.name).model_dump(mode="json"))
        allowed = SIZE_KEYS | STAGE_KEYS | DATA_KEYS | set(SHRINK["differs"])
        changed = [k for k in set(ours) | set(cluster) if ours.get(k) != cluster.get(k)]
        assert [k for k in changed if not any(k == a or k.startswith(a + ".") for a in allowed)] == []
    seconds = {}
    for manifest in ORDER:
        argv, env = job_command(manifest, data, configs)
        t0 = time.perf_counter()
        if "torch.distributed.run" in argv:
            out = subprocess.run(argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                                 capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, f"{manifest}: {' '.join(argv)}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
            if "train/train_autoencoder.py" in argv or "train/train_unet_latent.py" in argv:
                assert "world 2" in out.stdout, manifest
        else:  # a plain python job: its own main with its own arguments, here, which saves a start (~10 s of imports)
            entry = argv[2] if argv[1] == "-m" else argv[1]
            assert not env, manifest
            monkeypatch.chdir(ROOT)  # the image's working directory
            assert importlib.import_module(IN_PROCESS[entry]).main(argv[3 if argv[1] == "-m" else 2:]) == 0, manifest
        seconds[manifest] = round(time.perf_counter() - t0, 1)
    print(seconds)

    check_outputs(data)


def check_outputs(data: Path) -> None:
    """What the jobs left: trained on 2 ranks that agree, best.pt for the next job, both losses on, pairs of both
    kinds, the recipe's U-Net, exported weights and a scored test case."""
    runs = data / "runs"
    for run in ("ae_stage1", "ae_stage2", "unet"):
        result = json.loads((runs / run / "result.json").read_text())
        assert result["step"] == 1 and result["ranks_identical"] is True, run
        assert (runs / run / "checkpoints" / "best.pt").is_file(), run
    ae = json.loads((runs / "ae_stage2" / "config.json").read_text())
    assert ae["ae_train"]["stage"] == 2 and ae["loss"]["perceptual_weight"] > 0
    assert ae["autoencoder"]["compression"] == [4, 4, 2]
    (step,) = [json.loads(line) for line in (runs / "ae_stage1" / "history.jsonl").read_text().splitlines()]
    assert "loss/perceptual" in step and "loss/adv_g" in step and "loss/disc" in step  # on at cluster size
    index = json.loads((data / "latents" / "index.json").read_text())
    kinds = {k for c in index["cases"] for k, n in c["pair_kinds"].items() if n}
    assert kinds == {"z", "inplane"} and not index["failures"]
    unet = json.loads((runs / "unet" / "config.json").read_text())
    assert unet["unet"]["cond_image"] and unet["unet_train"]["final_step_fraction"] == 0.5
    assert (data / "export" / "autoencoder.pt").is_file() and (data / "export" / "unet.pt").is_file()
    summary = json.loads((data / "interpolated" / "summary.json").read_text())
    assert "ours + consistency" in summary["methods"]
    (case,) = json.loads((data / "interpolated" / "cases.json").read_text())
    assert case["case"].startswith("thin__lidc-idri-0314")

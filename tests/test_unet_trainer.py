"""Latent U-Net trainer: resume equals uninterrupted, DDP equals single process, torchrun on CPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ddpm.latent_data import LatentCase, LatentSpace, RandomLatentCrops, ResumableDistributedSampler
from ddpm.generate import export_unet, load_unet
from ddpm.latents import main as latents_main
from ddpm.trainer import diffusion_loss
from ddpm.trainer import main as train_main
from thinslice.checkpoint import load_checkpoint

from ddp_grad_probe import global_batch, model_and_loss  # tests/ is on pytest's import path, like conftest

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "unet": {"model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [0], "window": 2,
             "heads": 2, "global_depth": 1},
    "diffusion": {"sample_steps": 3},
    "unet_train": {"crop_size": [16, 16, 4], "samples_per_case": 4, "batch_size": 2, "max_steps": 6, "warmup_steps": 2,
                   "lr": 1e-3, "ema_decay": 0.9, "num_workers": 0, "log_every": 1, "val_every": 3, "val_crop": [8, 8, 4],
                   "checkpoint_every": 3, "keep_last": 2},
}


def write_config(path: Path, **train) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["unet_train"].update(train)
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def latents(bundled_cache, tiny_ae_checkpoint, tmp_path_factory) -> Path:
    """Latents of the bundled CT: the DICOM abdomen trains, the LIDC chest crop validates, the other chest waits."""
    out = tmp_path_factory.mktemp("latents")
    assert latents_main(["--cache", str(bundled_cache), "--checkpoint", str(tiny_ae_checkpoint), "--output", str(out),
                         "--no-pairs"]) == 0
    index = json.loads((out / "index.json").read_text())
    for c in index["cases"]:
        c["split"] = "train" if c["case_id"].startswith("dicom__") else "val" if "lidc" in c["case_id"] else "test"
    (out / "index.json").write_text(json.dumps(index))
    return out


def losses(run: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (run / "history.jsonl").read_text().splitlines()]


def test_resume_reproduces_the_uninterrupted_run(latents, tmp_path):
    cfg = write_config(tmp_path / "unet.yaml")
    args = ["--config", str(cfg), "--latents", str(latents)]
    assert train_main(args + ["--output", str(tmp_path / "straight")]) == 0
    resumed = tmp_path / "resumed"
    assert train_main(args + ["--output", str(resumed), "--stop-after", "4"]) == 0  # mid-epoch, off the save grid
    with open(resumed / "history.jsonl", "a") as f:  # a killed run may log past its last checkpoint
        f.write(json.dumps({"step": 5, "loss": 123.0}) + "\n")
    assert train_main(args + ["--output", str(resumed)]) == 0
    assert losses(resumed) == pytest.approx(losses(tmp_path / "straight"), rel=1e-5)
    assert len(losses(resumed)) == 6
    budget = tmp_path / "budget"  # --time-budget 0: spent after the first step; saved there, and resumable
    assert train_main(args + ["--output", str(budget), "--time-budget", "0"]) == 0
    first = json.loads((budget / "result.json").read_text())
    assert first["step"] == 1 and "--time-budget" in first["stopped"] and first["max_steps"] == 6
    assert train_main(args + ["--output", str(budget)]) == 0
    assert losses(budget) == pytest.approx(losses(tmp_path / "straight"), rel=1e-5)
    assert json.loads((budget / "result.json").read_text())["stopped"] is None
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "step_00000006.pt")
    b = load_checkpoint(resumed / "checkpoints" / "step_00000006.pt")
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=1e-5, atol=1e-6)
    slim = tmp_path / "unet.pt"  # what pretrained/unet.pt is made with: the EMA weights alone, same values
    export_unet(tmp_path / "straight" / "checkpoints" / "step_00000006.pt", slim)
    net, _, _, state = load_unet(slim)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, a["ema"]["module." + k], rtol=0, atol=0)
    assert "opt" not in state and slim.stat().st_size < (tmp_path / "straight" / "checkpoints" / "step_00000006.pt").stat().st_size / 2
    val = [json.loads(l) for l in (tmp_path / "straight" / "val.jsonl").read_text().splitlines()]
    assert [v["step"] for v in val] == [3, 6] and all(v["cases"] == 1 for v in val)
    assert val[0]["psnr_cubic"] > 10 and val[0]["psnr_ae_ceiling"] > 0 and val[0]["psnr_direct"] > 0
    assert (tmp_path / "straight" / "checkpoints" / "best.pt").is_file()
    assert list((tmp_path / "straight" / "tensorboard").glob("events.out.tfevents.*"))


def test_ddp_gradient_equals_single_process_gradient(tmp_path):
    cfg = write_config(tmp_path / "unet.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(ROOT / "tests" / "ddp_grad_probe.py"), str(tmp_path / "grads.pt"), str(cfg)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ddp = torch.load(tmp_path / "grads.pt", weights_only=True)
    model, diffusion, space = model_and_loss(cfg)
    batch, t, noise = global_batch()
    diffusion_loss(model, diffusion, space, batch, t, noise, bf16=False).mean().backward()
    assert len(ddp) == len(list(model.parameters()))
    for name, p in model.named_parameters():
        assert float(p.grad.abs().max()) > 0, name
        torch.testing.assert_close(ddp[name], p.grad, rtol=1e-4, atol=1e-7)


def test_two_process_torchrun_trains_checkpoints_and_resumes(latents, tmp_path):
    cfg = write_config(tmp_path / "unet.yaml", max_steps=4, checkpoint_every=2, val_every=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train" / "train_unet_latent.py"), "--config", str(cfg), "--latents", str(latents),
           "--output", str(tmp_path / "run")]
    first = subprocess.run(cmd + ["--stop-after", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "result.json").read_text())["step"] == 2
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "starting at step 2" in second.stdout
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    assert result["step"] == 4 and result["ranks_identical"] is True
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*.pt")) == \
        ["step_00000002.pt", "step_00000004.pt"]


def test_crop_size_must_fit_the_unet_and_the_latents(latents, tmp_path, capsys):
    bad = write_config(tmp_path / "bad.yaml", crop_size=[16, 16, 3])
    assert train_main(["--config", str(bad), "--latents", str(latents), "--output", str(tmp_path / "r")]) == 2
    assert "unet_train.crop_size (16, 16, 3) must be a multiple of 2" in capsys.readouterr().err
    big = write_config(tmp_path / "big.yaml", crop_size=[16, 16, 8])  # the abdomen latent has 5 slices
    assert train_main(["--config", str(big), "--latents", str(latents), "--output", str(tmp_path / "r2")]) == 2
    assert "no training latent is at least crop_size (16, 16, 8)" in capsys.readouterr().err


def test_residual_space_round_trips_and_crops_do_not_depend_on_who_draws_them():
    g = torch.Generator().manual_seed(0)
    case = LatentCase("a", "train", torch.randn(4, 20, 20, 9, generator=g), torch.randn(4, 20, 20, 9, generator=g),
                      torch.tensor([5.0, 1.0]))
    space = LatentSpace.fit([case], residual=True)
    torch.testing.assert_close(space.to_thin(space.to_x0(case.thin, case.cond), case.cond), case.thin)
    assert float(space.to_x0(case.thin, case.cond).std()) == pytest.approx(1.0, rel=1e-3)
    crops = RandomLatentCrops([case], (8, 8, 4), samples_per_case=8, seed=3)
    crops.set_epoch(2)
    first = [crops[k]["thin"] for k in range(8)]
    assert all(torch.equal(a, crops[k]["thin"]) for k, a in enumerate(first))  # index-deterministic
    # two ranks together see every index of the epoch once; a resumed sampler skips what was seen
    seen = []
    for rank in range(2):
        s = ResumableDistributedSampler(crops, num_replicas=2, rank=rank, seed=0)
        s.set_epoch(2)
        seen += list(s)
    assert sorted(seen) == list(range(8))
    s = ResumableDistributedSampler(crops, num_replicas=2, rank=0, seed=0)
    s.set_position(2, 3)
    full = ResumableDistributedSampler(crops, num_replicas=2, rank=0, seed=0)
    full.set_epoch(2)
    assert list(s) == list(full)[3:]


def test_validation_decodes_with_the_autoencoders_window_not_the_unet_yaml(latents, tiny_ae_checkpoint):
    """The U-Net's YAML carries a data.hu_window of its own (default or not); latents were encoded in the
    autoencoder checkpoint's window, so validation must decode in that one."""
    from ddpm.trainer import UNetTask
    from thinslice.config import Config
    from thinslice.distributed import DistContext

    cfg = Config.model_validate({**TINY, "data": {"hu_window": [-500.0, 500.0]}})
    task = UNetTask(cfg, DistContext(0, 1, 0, torch.device("cpu")), latents)
    ae_window = tuple(load_checkpoint(tiny_ae_checkpoint)["config"]["data"]["hu_window"])
    assert ae_window != (-500.0, 500.0)
    assert task.codec.window == ae_window and task.vcrops


def test_fine_tuning_starts_from_the_exported_weights_and_checks_they_fit(latents, tmp_path, capsys):
    """unet_train.init_from: a fresh run starts from another U-Net's EMA weights and latent scaling (exported
    file or run checkpoint); weights for another autoencoder or another architecture are refused by name."""
    from ddpm.trainer import UNetTask
    from thinslice.config import Config
    from thinslice.distributed import DistContext

    base = tmp_path / "base"
    assert train_main(["--config", str(write_config(tmp_path / "a.yaml", max_steps=3, val_every=100)),
                       "--latents", str(latents), "--output", str(base)]) == 0
    slim = tmp_path / "unet.pt"
    export_unet(base / "checkpoints" / "step_00000003.pt", slim)
    net, space, _, _ = load_unet(slim)
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    task = UNetTask(Config.model_validate({**TINY, "unet_train": {**TINY["unet_train"], "init_from": str(slim)}}), ctx,
                    latents)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(task.model.state_dict()[k], v, rtol=0, atol=0)
        torch.testing.assert_close(task.ema.module.state_dict()[k], v, rtol=0, atol=0)
    assert task.space.state_dict() == space.state_dict()

    state = torch.load(slim, weights_only=True)
    state["ae_fingerprint"] = "0" * 16
    torch.save(state, tmp_path / "other_ae.pt")
    wider = {**TINY, "unet": {**TINY["unet"], "model_channels": 16}}
    for bad, cfg, says in ((tmp_path / "other_ae.pt", TINY, "another autoencoder"),
                           (slim, wider, "does not fit the unet section")):
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**cfg, "unet_train": {**cfg["unet_train"], "init_from": str(bad)}}))
        assert train_main(["--config", str(path), "--latents", str(latents), "--output", str(tmp_path / "x")]) == 2
        assert says in capsys.readouterr().err

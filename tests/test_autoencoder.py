"""Autoencoder: geometry of patch encoding / volume decoding, and the two-stage trainer on real CT."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from AutoEncoder.losses import MedicalNetPerceptualLoss, medicalnet_resnet10
from AutoEncoder.model import PatchVolumeAutoencoder, latent_shape
from AutoEncoder.trainer import main as train_main
from thinslice.checkpoint import load_checkpoint
from thinslice.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
TINY_AE = {"channels": [8, 16, 16], "codebook_size": 64, "patch_size": [32, 32, 32], "restart_every": 2}


def tiny_model(**kw) -> PatchVolumeAutoencoder:
    torch.manual_seed(0)
    return PatchVolumeAutoencoder(parse_config({"autoencoder": {**TINY_AE, **kw}}).autoencoder).eval()


@pytest.mark.parametrize("compression", [(4, 4, 4), (8, 8, 4)])
def test_odd_sizes_round_trip_in_shape(compression):
    channels = [8, 16, 16] if max(compression) == 4 else [8, 8, 16, 16]
    m = tiny_model(compression=list(compression), channels=channels)
    x = torch.rand(1, 1, 37, 45, 29) * 2 - 1
    z = m.encode_volume(x)
    assert tuple(z.shape[2:]) == latent_shape(x.shape[2:], compression)
    assert m.reconstruct_volume(x).shape == x.shape


def test_padding_is_air_at_the_far_end_and_crops_back_exactly():
    m = tiny_model()
    x = torch.rand(1, 1, 37, 45, 29) * 2 - 1
    padded = m.pad_to_grid(x)
    assert padded.shape[2:] == (40, 48, 32)
    assert torch.equal(padded[..., :37, :45, :29], x)
    assert torch.all(padded[..., 37:, :, :] == -1) and torch.all(padded[..., :, :, 29:] == -1)


@pytest.mark.slow
def test_chunked_decoding_equals_one_shot_without_seams(chest_block):
    m = tiny_model()
    from dataset.intensity import hu_to_unit

    x = hu_to_unit(torch.from_numpy(chest_block.array.astype("float32")))[None, None]
    with torch.no_grad():
        z = m.encode_volume(x)  # (24, 24, 10) latent
        one_shot = m.decode_volume(z, chunk=(64, 64, 64))
        chunked = m.decode_volume(z, chunk=(7, 9, 4))  # with the autoencoder's own halo (cfg.decode_halo)
        seamy = m.decode_volume(z, chunk=(7, 9, 4), halo=2)
    # no seam where chunks meet: this decoder sees 10 latent voxels each way (measured: halo 9 still leaves
    # 2e-3 on the [-1, 1] scale, halo 10 and up ~3e-6), so the halo decode_volume uses unless told must cover that
    assert float((one_shot - chunked).abs().max()) < 1e-5  # float rounding only
    # too little context does leave seams, which is what the halo is for
    assert float((one_shot - seamy).abs().max()) > 1e-3


def test_perceptual_loss_names_the_missing_file_and_loads_real_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing .*medicalnet.pth.*perceptual_weight: 0"):
        MedicalNetPerceptualLoss(tmp_path / "medicalnet.pth")
    torch.manual_seed(0)
    state = {"state_dict": {f"module.{k}": v for k, v in medicalnet_resnet10().state_dict().items()}}
    torch.save(state, tmp_path / "medicalnet.pth")  # the layout of the released MedicalNet file
    loss = MedicalNetPerceptualLoss(tmp_path / "medicalnet.pth")
    a = torch.rand(1, 1, 32, 32, 32)
    assert float(loss(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(a, torch.rand(1, 1, 32, 32, 32))) > 0
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match="not MedicalNet"):
        MedicalNetPerceptualLoss(tmp_path / "wrong.pth")


def write_config(path: Path, stage: int = 1, **train) -> Path:
    cfg = {
        "autoencoder": TINY_AE,
        "loss": {"perceptual_weight": 0.0, "adv_weight": 0.1, "adv_start_step": 2, "disc_channels": 8, "disc_layers": 2},
        "ae_train": {"stage": stage, "batch_size": 2, "max_steps": 6, "warmup_steps": 2, "num_workers": 0, "log_every": 1,
                     "image_every": 3, "val_every": 1000, "checkpoint_every": 3, "keep_last": 2, **train},
    }
    if stage == 2:
        del cfg["autoencoder"]  # taken from the stage-1 checkpoint
    path.write_text(yaml.safe_dump(cfg))
    return path


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stage1_run(bundled_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ae")
    cfg = write_config(tmp / "stage1.yaml")
    assert train_main(["--config", str(cfg), "--cache", str(bundled_cache), "--output", str(tmp / "run")]) == 0
    return tmp, cfg


def test_stage1_trains_checkpoints_and_logs(stage1_run):
    tmp, _ = stage1_run
    run = tmp / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step_00000003.pt", "step_00000006.pt"]
    state = load_checkpoint(run / "checkpoints" / "step_00000006.pt")
    assert state["step"] == 6 and "opt_g" in state and "adversary" in state
    steps = history(run)
    assert [h["step"] for h in steps] == [1, 2, 3, 4, 5, 6]
    assert "loss/adv_g" not in steps[1] and "loss/adv_g" in steps[2]  # GAN starts at adv_start_step
    assert "latent/perplexity" in steps[0]
    assert any((run / "tensorboard").iterdir())


def test_resume_continues_the_same_run(stage1_run, bundled_cache):
    tmp, cfg = stage1_run
    run = tmp / "resumed"
    args = ["--config", str(cfg), "--cache", str(bundled_cache), "--output", str(run)]
    assert train_main(args + ["--stop-after", "3"]) == 0  # a run that stops at step 3 ...
    # ... killed later without a checkpoint: its extra log lines must not survive the resume
    with open(run / "history.jsonl", "a") as f:
        f.write(json.dumps({"step": 4, "loss/total": 123.0}) + "\n")
    assert train_main(args) == 0
    straight, resumed = history(tmp / "run"), history(run)
    assert [h["step"] for h in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, resumed):
        assert a["loss/total"] == pytest.approx(b["loss/total"], rel=1e-5, abs=1e-6)
    wa = load_checkpoint(tmp / "run" / "checkpoints" / "step_00000006.pt")["model"]
    wb = load_checkpoint(run / "checkpoints" / "step_00000006.pt")["model"]
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6) for k in wa)


def test_sigterm_saves_a_checkpoint_and_exits(bundled_cache, tmp_path):
    cfg = write_config(tmp_path / "long.yaml", max_steps=10000, checkpoint_every=10000)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(ROOT / "train" / "train_autoencoder.py"), "--config", str(cfg),
                             "--cache", str(bundled_cache), "--output", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    import time

    deadline = time.time() + 300
    while not (run / "history.jsonl").exists() or not (run / "history.jsonl").read_text().strip():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(__import__("signal").SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-2000:]
    assert "stopped by signal" in out
    state = load_checkpoint(run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip())
    assert 1 <= state["step"] < 10000


def test_stage2_freezes_encoder_and_codebook_bit_for_bit(stage1_run, bundled_cache):
    tmp, _ = stage1_run
    init = tmp / "run" / "checkpoints" / "step_00000006.pt"
    cfg = write_config(tmp / "stage2.yaml", stage=2, init_from=str(init), crop_size=[48, 48, 32], batch_size=1,
                       max_steps=2, checkpoint_every=2)
    assert train_main(["--config", str(cfg), "--cache", str(bundled_cache), "--output", str(tmp / "stage2")]) == 0
    before = load_checkpoint(init)["model"]
    after = load_checkpoint(tmp / "stage2" / "checkpoints" / "step_00000002.pt")["model"]
    frozen = [k for k in before if k.startswith(("encoder.", "bottleneck."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert "loss/adv_g" in history(tmp / "stage2")[0]  # GAN on from the first stage-2 step


def test_stage2_rejects_a_different_architecture(stage1_run, bundled_cache, capsys):
    tmp, _ = stage1_run
    cfg = write_config(tmp / "bad2.yaml", stage=2, init_from=str(tmp / "run" / "checkpoints" / "step_00000006.pt"))
    raw = yaml.safe_load(cfg.read_text())
    raw["autoencoder"] = {**TINY_AE, "latent_channels": 4}
    cfg.write_text(yaml.safe_dump(raw))
    assert train_main(["--config", str(cfg), "--cache", str(bundled_cache), "--output", str(tmp / "bad")]) == 2
    assert "autoencoder settings differ" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_torchrun_trains_what_one_process_does_on_the_same_global_batch(bundled_cache, tmp_path):
    """2 ranks x batch 1 under torchrun against 1 process x batch 2: the patch stream deals each global step's
    items to the ranks in order, DDP averages the gradients and MONAI's EMA codebook all-reduces its statistics,
    so the weights after step 2 must be one process's. Steps 1-2 run before the GAN (its discriminator's
    BatchNorm takes per-rank batch statistics: DDP on CPU cannot sync them) and before the first dead-code
    restart (rank 0 draws the new codes from its own half of the batch); steps 3-4 run both, where the ranks
    must still agree with each other."""
    cfg = write_config(tmp_path / "ddp.yaml", batch_size=1, max_steps=4, checkpoint_every=2)
    raw = yaml.safe_load(cfg.read_text())
    raw["autoencoder"]["restart_every"] = 3  # first restart at step 3, like the GAN (adv_start_step 2: from step 3)
    # fp32 on every CPU: with bf16 autocast (AVX-512-BF16 machines) a batch of 1 and a batch of 2 round apart and
    # flip a code assignment; this test is about DDP, not precision
    raw["ae_train"]["cpu_bf16"] = False
    cfg.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                          str(ROOT / "train" / "train_autoencoder.py"), "--config", str(cfg), "--cache", str(bundled_cache),
                          "--output", str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert result["step"] == 4 and result["ranks_identical"] is True
    assert "loss/adv_g" in history(tmp_path / "ddp")[2] and "latent/restarted" in history(tmp_path / "ddp")[2]
    raw["ae_train"]["batch_size"] = 2  # the same global batch in one process; same max_steps, so the same schedule
    (tmp_path / "one.yaml").write_text(yaml.safe_dump(raw))
    assert train_main(["--config", str(tmp_path / "one.yaml"), "--cache", str(bundled_cache),
                       "--output", str(tmp_path / "one"), "--stop-after", "2"]) == 0
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "step_00000002.pt")["model"]
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "step_00000002.pt")["model"]
    assert ddp.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(ddp[k].float(), one[k].float(), rtol=1e-4, atol=1e-6, msg=k)


def test_validation_and_evaluation_score_whole_held_out_volumes(stage1_run, bundled_cache, tmp_path):
    from AutoEncoder.codec import load_autoencoder
    from AutoEncoder.evaluate import main as eval_main
    from AutoEncoder.trainer import validate
    from thinslice.distributed import DistContext

    tmp, _ = stage1_run
    ckpt = tmp / "run" / "checkpoints" / "step_00000006.pt"
    model, state = load_autoencoder(ckpt)
    from thinslice.config import Config

    cfg = Config.model_validate(state["config"])
    test_case = bundled_cache / "cases" / "thin__lidc-idri-0314_chest_1.0mm_crop-z88-168_inplane2x"
    metrics, panel = validate(model, [test_case], cfg, DistContext(0, 1, 0, torch.device("cpu")))
    assert metrics["cases"] == 1 and 0 < metrics["psnr"] < 60 and 0 < metrics["ssim"] <= 1
    assert panel.shape[0] == 1 and panel.min() >= 0 and panel.max() <= 1
    assert eval_main(["--checkpoint", str(ckpt), "--cache", str(bundled_cache), "--output", str(tmp_path / "m.json")]) == 0
    scored = json.loads((tmp_path / "m.json").read_text())["cases"][test_case.name]
    assert scored["psnr"] == pytest.approx(metrics["psnr"], abs=1e-4)


def test_kl_resume_draws_what_the_uninterrupted_run_draws(bundled_cache, tmp_path):
    """The KL bottleneck samples z with the global RNG: a resumed run must restore it after building its loader."""
    cfg = write_config(tmp_path / "kl.yaml")
    raw = yaml.safe_load(cfg.read_text())
    raw["autoencoder"] = {**raw["autoencoder"], "regularizer": "kl", "kl_weight": 1e-3}
    raw["loss"]["adv_start_step"] = 100
    cfg.write_text(yaml.safe_dump(raw))
    args = ["--config", str(cfg), "--cache", str(bundled_cache)]
    assert train_main(args + ["--output", str(tmp_path / "straight")]) == 0
    assert train_main(args + ["--output", str(tmp_path / "resumed"), "--stop-after", "3"]) == 0
    assert train_main(args + ["--output", str(tmp_path / "resumed")]) == 0
    straight, resumed = history(tmp_path / "straight"), history(tmp_path / "resumed")
    assert [h["step"] for h in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(straight, resumed):
        assert a["loss/total"] == pytest.approx(b["loss/total"], rel=1e-5, abs=1e-7)


def test_difference_decoding_equals_two_decodes_and_skips_only_untouched_chunks(chest_block, monkeypatch):
    """Residual decoding's pair pass: T(D(z)) - T(D(cond)) chunk by chunk equals the two whole decodes, and a
    chunk is skipped (no decoder call) exactly when its latent context is the same in both."""
    from dataset.intensity import hu_to_unit, unit_to_hu

    m = tiny_model()
    x = hu_to_unit(torch.from_numpy(chest_block.array.astype("float32")))[None, None]
    to_hu = lambda y: unit_to_hu(y.float())
    with torch.no_grad():
        cond = m.encode_volume(x)  # (24, 24, 10) latent
        z = cond.clone()
        z[..., 2:4, 2:4, 1:3] += 0.5  # the sample changed one corner only
        whole = to_hu(m.decode_volume(z, chunk=(64,) * 3)) - to_hu(m.decode_volume(cond, chunk=(64,) * 3))
        calls = []
        real = m.decoder.forward
        monkeypatch.setattr(m.decoder, "forward", lambda t: calls.append(t.shape) or real(t))
        pair = m.decode_volume(z, chunk=(8, 8, 5), minus=cond, transform=to_hu)  # the model's halo, 12
    assert pair.shape == whole.shape
    torch.testing.assert_close(pair, whole, atol=1e-2, rtol=0)  # HU: float rounding only
    assert float(whole.abs().max()) > 1.0  # the change reaches the image
    # of 3 x 3 x 2 chunks, those whose context (core +- 12 latent voxels) holds the change: x and y in
    # chunks 0 and 8, z in both; each is decoded twice (z and cond), the other 10 not at all
    assert len(calls) == 2 * (2 * 2 * 2)


def test_train_splits_add_the_val_cases_to_training_and_validation_stays_on_them(tmp_path):
    from AutoEncoder.trainer import AutoencoderTask
    from dataset.cache import cases_in_split
    from dataset.prepare import main as prepare
    from thinslice.config import load_config
    from thinslice.distributed import init_distributed

    cache = tmp_path / "cache"  # the bundled CT split as config/cpu.yaml splits it: the chest crop of s1 is val
    assert prepare(["--input", str(ROOT / "data" / "ct"), "--output", str(cache), "--config",
                    str(ROOT / "config" / "cpu.yaml")]) == 0
    train, val = cases_in_split(cache, "train"), cases_in_split(cache, "val")
    assert train and val
    ctx = init_distributed()
    plain = AutoencoderTask(load_config(write_config(tmp_path / "a.yaml")), ctx, cache)
    both = AutoencoderTask(load_config(write_config(tmp_path / "b.yaml", train_splits=["train", "val"])), ctx, cache)
    assert plain.train_dirs == train and both.train_dirs == train + val
    assert plain.val_dirs == both.val_dirs == val[: plain.cfg.ae_train.val_max_cases]

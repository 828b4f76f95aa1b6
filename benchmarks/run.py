"""Speed and memory of every heavy step, written as JSON: the figures behind docs/benchmarks.md.

  python benchmarks/run.py --out benchmarks/results/cpu.json              # 2-core CPU: CPU configs, 256x256x150
  python benchmarks/run.py --device cuda --out benchmarks/results/h100.json   # adds 512x512x300, MFU, compile

Each measurement runs in a fresh subprocess, so peak memory belongs to that measurement alone (GPU:
torch.cuda.max_memory_allocated; CPU: the process's peak RSS, Python and torch included, about 0.4 GiB). Timed regions exclude warm-up iterations.
Interpolation uses pretrained/ weights when present (their architecture), else untrained models built
from the configs: the time and memory of sampling do not depend on the weights' values.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from thinslice import precision
from thinslice.run import use_bf16

ROOT = Path(__file__).resolve().parents[1]
# dense bf16 tensor-core peaks (TFLOP/s) for model FLOPs utilisation
PEAK_BF16 = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "L40S": 362.0, "A10": 125.0}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Peak:
    """Peak memory up to the end of the block, in GiB: GPU allocations since the block began, or the
    process's peak RSS on CPU (RSS cannot be reset, hence one measurement per process)."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            self.gib = torch.cuda.max_memory_allocated() / 2**30
        else:
            self.gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn, device: str, warmup: int, iters: int) -> tuple[float, float]:
    """(seconds per call, peak GiB) over `iters` calls after `warmup` untimed ones."""
    with Peak(device) as peak:
        for _ in range(warmup):
            fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync(device)
        dt = (time.perf_counter() - t0) / iters
    return dt, peak.gib


def load(path):
    from thinslice.config import load_config

    return load_config(ROOT / path)


def single_process(device: str):
    from thinslice.distributed import DistContext

    return DistContext(rank=0, world=1, local_rank=0, device=torch.device(device))


def bench_ae_step(a) -> dict:
    """The autoencoder trainer's own step (AutoEncoder.trainer.AutoencoderTask.train_step: L1 + reg, perceptual and
    GAN as the config sets them, G and D) on random patches. Missing MedicalNet weights are replaced by random
    ones (the same FLOPs)."""
    import tempfile

    from AutoEncoder.losses import medicalnet_resnet10
    from AutoEncoder.trainer import AutoencoderTask

    cfg = load(a.ae_config)
    perceptual = "off"
    if cfg.loss.perceptual_weight > 0:
        perceptual = cfg.loss.perceptual_weights
        if not Path(perceptual).is_file():
            stand_in = Path(tempfile.mkdtemp()) / "medicalnet_random.pth"
            torch.save(medicalnet_resnet10().state_dict(), stand_in)
            perceptual = "random MedicalNet weights (the file is not shipped)"
            cfg = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"perceptual_weights": str(stand_in)})})
    # the GAN on from the first step, one micro-batch: the most expensive step the trainer runs
    cfg = cfg.model_copy(update={"loss": cfg.loss.model_copy(update={"adv_start_step": 0}),
                                 "ae_train": cfg.ae_train.model_copy(update={"grad_accum": 1})})
    task = AutoencoderTask(cfg, single_process(a.device), cache=None)
    task.wrap()
    x = torch.rand(a.ae_batch, 1, *cfg.autoencoder.patch_size, device=a.device) * 2 - 1
    dt, gib = timed(lambda: task.train_step([x]), a.device, a.warmup, a.iters)
    return {"what": "autoencoder stage-1 training step (AutoencoderTask.train_step: G and D)", "config": a.ae_config,
            "bf16": task.bf16, "perceptual": perceptual, "gan": task.adversary is not None,
            "batch": a.ae_batch, "patch": list(cfg.autoencoder.patch_size),
            "params_m": round(sum(p.numel() for p in task.model.parameters()) / 1e6, 2),
            "seconds_per_step": round(dt, 4), "samples_per_s": round(a.ae_batch / dt, 2),
            "voxels_per_s": round(x.numel() / dt), "peak_gib": round(gib, 2)}


def bench_unet_step(a) -> dict:
    """The U-Net trainer's own step (ddpm.trainer.UNetTask.train_step: loss, backward, clip, AdamW, EMA) on random
    latents; FLOPs of its forward + backward counted for utilisation."""
    from torch.utils.flop_counter import FlopCounterMode

    from ddpm.latent_data import LatentSpace
    from ddpm.trainer import UNetTask, diffusion_loss

    cfg = load(a.unet_config)
    c = a.latent_channels
    b = cfg.unet_train.batch_size if a.unet_batch is None else a.unet_batch
    cfg = cfg.model_copy(update={"unet_train": cfg.unet_train.model_copy(update={"batch_size": b, "grad_accum": 1})})
    task = UNetTask(cfg, single_process(a.device), latents=None, latent_channels=c)
    task.space = LatentSpace(1.0, cfg.diffusion.residual, 1.0)
    dev, net, crop = a.device, task.model, cfg.unet_train.crop_size
    if a.channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    task.net = torch.compile(net) if a.compile else net
    g = torch.Generator(device="cpu").manual_seed(0)
    batch = {"thin": torch.randn(b, c, *crop, generator=g), "cond": torch.randn(b, c, *crop, generator=g),
             "spacing": torch.tensor([[5.0, 1.0]] * b)}
    if cfg.unet.cond_image:
        image = [n * f for n, f in zip(crop, task.compression)]  # the cubic crop at image resolution
        batch["cond_image"] = torch.randn(b, 1, *image, generator=g)
    counter = FlopCounterMode(display=False)
    with counter:
        moved = {k: v.to(dev) for k, v in batch.items()}
        t = torch.randint(0, task.diffusion.num_steps, (b,), generator=g).to(dev)
        diffusion_loss(net, task.diffusion, task.space, moved, t, torch.randn_like(moved["thin"]), task.bf16,
                       task.compression).mean().backward()
    flops = counter.get_total_flops()
    dt, gib = timed(lambda: task.train_step([batch]), dev, a.warmup + (3 if a.compile else 0), a.iters)
    out = {"what": "latent U-Net training step (UNetTask.train_step)", "config": a.unet_config, "bf16": task.bf16,
           "batch": b, "crop": list(crop), "latent_channels": c, "compile": a.compile, "channels_last_3d": a.channels_last,
           "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 2),
           "seconds_per_step": round(dt, 4), "samples_per_s": round(b / dt, 2),
           "latent_voxels_per_s": round(b * int(np.prod(crop)) / dt), "peak_gib": round(gib, 2),
           "tflop_per_step": round(flops / 1e12, 4), "achieved_tflops": round(flops / dt / 1e12, 3)}
    if dev == "cuda":
        peak = next((v for k, v in PEAK_BF16.items() if k in torch.cuda.get_device_name()), None)
        out["mfu_bf16"] = round(flops / dt / 1e12 / peak, 3) if peak else None
    return out


def models_for_benchmark(a):
    from AutoEncoder.model import PatchVolumeAutoencoder
    from ddpm.latent_data import LatentSpace
    from ddpm.build import build_diffusion, build_unet
    from evaluation.interpolation import Models

    dev = torch.device(a.device)
    ae_w, unet_w = ROOT / "pretrained" / "autoencoder.pt", ROOT / "pretrained" / "unet.pt"
    if ae_w.exists() and unet_w.exists() and not a.untrained:
        return Models.load(ae_w, unet_w, dev), "pretrained/"
    ae_cfg, unet_cfg = load(a.ae_config), load(a.unet_config)
    torch.manual_seed(0)
    ae = PatchVolumeAutoencoder(ae_cfg.autoencoder).to(dev).eval()
    net = build_unet(unet_cfg, ae_cfg.autoencoder.latent_channels, ae_cfg.autoencoder.compression).to(dev).eval()
    space = LatentSpace(1.0, unet_cfg.diffusion.residual, 1.0)
    return Models(ae, net, space, build_diffusion(unet_cfg), tuple(ae_cfg.data.hu_window), unet_cfg, dev), \
        f"untrained {a.ae_config} + {a.unet_config}"


def bench_interpolate(a) -> dict:
    """The command line's own path (reader, planner, tiles, writer) on a whole real scan, through
    benchmarks/whole_scan.py: what a user's `thinslice-interpolate --input SCAN` costs, stage by stage."""
    import tempfile

    from whole_scan import DEFAULT_INPUT, record, run_cli

    scan = Path(a.scan) if a.scan else DEFAULT_INPUT
    if not scan.exists():
        return {"what": "interpolate a whole real scan", "skipped": f"{scan} not found"}
    extra = ["--device", a.device] + (["--adapt", str(a.adapt)] if a.adapt is not None else []) + \
        (["--steps", str(a.sample_steps)] if a.sample_steps else [])
    with tempfile.TemporaryDirectory() as tmp:
        wall, first = run_cli(scan, Path(tmp) / "out", extra)
        row = record(Path(tmp) / "out", wall, first, scan, extra)
    row.pop("stages")
    return {"what": "interpolate a whole real scan through the command line (defaults, shipped weights)", **row}


def bench_latents(a) -> dict:
    """What train/generate_training_latent.py does per case: encode the thin volume and the cubic condition."""
    models, weights = models_for_benchmark(a)
    x = torch.rand(1, 1, *a.shape, device=a.device) * 2 - 1
    policy = precision.choose(a.device)  # what latent generation itself uses

    def encode_case():
        with torch.no_grad(), policy.autocast(a.device):
            models.autoencoder.encode_volume(x)
            models.autoencoder.encode_volume(x)

    dt, gib = timed(encode_case, a.device, 0, 1)
    return {"what": "latent generation per case (encode thin + condition)", "weights": weights, "shape": list(a.shape),
            "seconds_per_case": round(dt, 2), "peak_gib": round(gib, 2)}


BENCHES = {"ae_step": bench_ae_step, "unet_step": bench_unet_step, "latents": bench_latents,
           "interpolate": bench_interpolate}


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return precision.cpu_model()


def plan(a) -> list[list[str]]:
    """The measurements for this device: (bench, extra arguments)."""
    cpu = a.device == "cpu"
    jobs = [["ae_step"], ["unet_step"], ["latents", "--shape", "256", "256", "150"],
            ["interpolate"]]
    if not cpu:
        jobs += [["unet_step", "--compile"], ["unet_step", "--channels-last"], ["unet_step", "--compile", "--channels-last"],
                 ["latents", "--shape", "512", "512", "300"]]
    return jobs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: print only)")
    p.add_argument("--only", nargs="+", choices=list(BENCHES), help="run only these")
    p.add_argument("--ae-config", default=None, help="default: config/cpu.yaml on CPU, config/cluster.yaml on GPU")
    p.add_argument("--unet-config", default=None, help="default: config/cpu.yaml on CPU, config/cluster.yaml on GPU")
    p.add_argument("--ae-batch", type=int, default=2)
    p.add_argument("--unet-batch", type=int, default=None, help="default: the config's unet_train.batch_size")
    p.add_argument("--latent-channels", type=int, default=8)
    p.add_argument("--sample-steps", type=int, default=None, help="default: interpolation's (diffusion.sample_steps, 1)")
    p.add_argument("--adapt", type=int, default=None, help="adaptation steps (default: interpolation's, 600)")
    p.add_argument("--scan", default=None, help="the interpolate row's real scan (default: benchmarks/whole_scan.py's)")
    p.add_argument("--untrained", action="store_true", help="ignore pretrained/ (benchmark the configs' models)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--bench", choices=list(BENCHES), help=argparse.SUPPRESS)  # one measurement, in a child
    p.add_argument("--shape", type=int, nargs=3, default=[256, 256, 150], help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--channels-last", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    gpu = a.device == "cuda"
    a.ae_config = a.ae_config or ("config/cluster.yaml" if gpu else "config/cpu.yaml")  # the recipe at each size
    a.unet_config = a.unet_config or ("config/cluster.yaml" if gpu else "config/cpu.yaml")
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.bench:
        print(json.dumps(BENCHES[a.bench](a)))
        return 0
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is visible", file=sys.stderr)
        return 2
    shared = ["--device", a.device, "--ae-config", a.ae_config, "--unet-config", a.unet_config,
              "--ae-batch", str(a.ae_batch), "--latent-channels", str(a.latent_channels),
              "--warmup", str(a.warmup), "--iters", str(a.iters)]
    shared += ["--unet-batch", str(a.unet_batch)] if a.unet_batch else []
    shared += ["--sample-steps", str(a.sample_steps)] if a.sample_steps else []
    shared += ["--adapt", str(a.adapt)] if a.adapt is not None else []
    shared += ["--untrained"] if a.untrained else []
    shared += ["--scan", a.scan] if a.scan else []
    rows = []
    for bench, *extra in plan(a):
        if a.only and bench not in a.only:
            continue
        cmd = [sys.executable, __file__, "--bench", bench, *shared, *extra]
        r = subprocess.run(cmd, capture_output=True, text=True)
        row = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else \
            {"bench": bench, "error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
        row = {"bench": bench, "args": extra, **row}
        rows.append(row)
        print(json.dumps(row), flush=True)
    report = {"device": a.device, "device_name": device_name(a.device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
              "rows": rows}
    if a.out:
        from thinslice.atomic import write_json

        a.out.parent.mkdir(parents=True, exist_ok=True)
        write_json(a.out, report)
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

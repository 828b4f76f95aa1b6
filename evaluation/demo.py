"""The whole pipeline on the bundled real CT (data/ct), one step after another, as a newcomer's first run.

  python -m evaluation.demo                 prepare -> autoencoder stage 1 and 2 -> latents -> U-Net ->
                                           interpolate the held-out chest -> report (~10 min, 2-core CPU)
  python -m evaluation.demo --train-minutes 7    the three trainings share 7 minutes (the default), so the
                                           demo takes about as long on any CPU; the steps reached are printed
  python -m evaluation.demo --pretrained    prepare -> interpolate with pretrained/ weights -> report

Every step is the project's own command line, printed before it runs, so the demo doubles as a
worked example; every step resumes, so a rerun after an interruption continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from thinslice.atomic import write_json
from thinslice.checkpoint import Checkpoints

ROOT = Path(__file__).resolve().parents[1]
PRETRAINED = ROOT / "pretrained"


class StepFailed(RuntimeError):
    pass


def run_step(name: str, script: str, args: list, timings: dict) -> None:
    cmd = [sys.executable, str(ROOT / script), *map(str, args)]
    print(f"\n=== {name}\n$ {shlex.join(['python', script, *map(str, args)])}", flush=True)
    t0 = time.perf_counter()
    if subprocess.run(cmd, cwd=ROOT).returncode != 0:
        raise StepFailed(f"step '{name}' failed (its error is printed above); rerun the demo to resume")
    timings[name] = round(time.perf_counter() - t0, 1)


# the per-scan adapter's steps in the demo: a quarter of the default 600, which alone takes about 4 min on a 2-core
# AVX2-only CPU in fp32 (a quarter of the demo's 15 min); the shipped default is what users run
DEMO_ADAPT_STEPS = 150
# shares of --train-minutes: stage 1 learns the codec, stage 2 only sharpens its decoder, the U-Net learns the task
TRAIN_SHARES = {"ae_stage1": 0.4, "ae_stage2": 0.15, "unet": 0.45}


def trained(run: Path) -> dict | None:
    """result.json of a training an earlier demo run finished (by its steps or its time budget): not trained again."""
    result = run / "result.json"
    return json.loads(result.read_text()) if result.exists() else None


def train_step(name: str, script: str, args: list, run: Path, minutes: float | None, timings: dict,
               steps: dict) -> None:
    done = trained(run)
    if done is None:
        run_step(name, script, [*args, "--output", run, *(["--time-budget", f"{minutes:.2f}"] if minutes else [])],
                 timings)
        done = trained(run) or {}
    else:
        print(f"\n=== {name}: done in an earlier demo run ({run / 'result.json'})", flush=True)
    steps[run.name] = {"step": done.get("step"), "max_steps": done.get("max_steps"), "stopped": done.get("stopped")}


def final_checkpoint(run: Path) -> Path:
    """best.pt when the run validated, else its last step checkpoint (the demo data has no val split)."""
    best = run / "checkpoints" / "best.pt"
    latest = best if best.exists() else Checkpoints(run / "checkpoints").latest()
    if latest is None:
        raise StepFailed(f"{run}: no checkpoint was written")
    return latest


def explain(report_dir: Path, out: Path, pretrained: bool, minutes: float) -> None:
    summary = json.loads((report_dir / "summary.json").read_text())["methods"]
    psnr = {m: v["psnr"] for m, v in summary.items()}
    ours, cubic, cubic_c = psnr["ours + consistency"], psnr["cubic"], psnr["cubic + consistency"]
    ceiling = psnr["ceiling + consistency"]
    plain = psnr.get("ours without adaptation + consistency", ours)
    case = json.loads((report_dir / "cases.json").read_text())[0]["case"]
    weights = "the shipped weights in pretrained/ (pretrained/MODEL_CARD.md)" if pretrained else \
        "an autoencoder and U-Net trained just now, for a few minutes on the bundled CT"
    print(f"""
What the numbers mean (the table above is {report_dir / 'report.md'})
  The held-out case is a real 1 mm chest CT (LIDC-IDRI-0314, never trained on). Its 5 mm slab
  averages are the input; the 1 mm truth is the answer key. PSNR is on [-1024, 2048] HU (higher is
  better, +1 dB is a clear difference); 'lung' is the lung window; MAE in HU; 'lung bias' is the mean
  HU error inside the lungs. '+ consistency' means each output slab averages exactly to the input
  slice; 'ours + consistency' is what was written.
  This run used {weights}.
  ours {ours:.2f} dB vs cubic {cubic:.2f} dB ({ours - cubic:+.2f} dB); vs cubic + consistency {cubic_c:.2f} dB
  ({ours - cubic_c:+.2f} dB), which is what the projection alone gives without any network.
  Of that, per-scan adaptation (a small CNN fitted to this scan's own in-plane detail, --adapt) gives
  {ours - plain:+.2f} dB: 'ours without adaptation + consistency' is {plain:.2f} dB.
  ceiling + consistency {ceiling:.2f} dB: the true 1 mm scan's latent decoded the same way, i.e. a perfect
  U-Net. {"It does not beat cubic + consistency: this autoencoder, not the U-Net, is what limits the result."
          if ceiling <= cubic_c else "The gap between ours and it is what a better U-Net could still gain."}
  {"A model trained for minutes on a CPU is not expected to beat cubic; it shows every step runs." if not pretrained
   else "See pretrained/MODEL_CARD.md for how these weights were trained and what they do on other held-out CT."}

Outputs ({minutes:.1f} min)
  thin CT (int16 HU, opens in 3D Slicer):  {report_dir / (case + '.nii.gz')}
  report and metrics:                       {report_dir / 'report.md'}, {report_dir / 'metrics.csv'}
  axial/coronal/sagittal panel:            {report_dir / (case + '.png')}""")
    if not pretrained:
        print(f"  training curves and images:               tensorboard --logdir {out / 'runs'}")


def machine() -> dict:
    """What the demo's time depends on: the CPU, its precision policy, the threads."""
    import torch

    from thinslice.precision import choose, cpu_model

    return {"cpu": cpu_model(), "threads": torch.get_num_threads(), "precision": str(choose(torch.device("cpu"))),
            "torch": torch.__version__}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", type=Path, default=ROOT / "outputs" / "demo", help="demo folder (default outputs/demo)")
    p.add_argument("--pretrained", action="store_true", help="skip training; interpolate with pretrained/ weights")
    p.add_argument("--smoke", action="store_true", help="2 steps of each training and sampling: checks the install")
    p.add_argument("--train-minutes", type=float, default=7.0,
                   help="wall-clock minutes the three trainings share (default 7; 0: no budget, train every configured "
                        "step); each stops at its share, saves and goes on with what it has")
    args = p.parse_args(argv)
    out, cfg = args.output.resolve(), ROOT / "config"
    cache, latents, runs, report = out / "cache", out / "latents", out / "runs", out / "interpolated"
    short = ["--max-steps", 2] if args.smoke else []
    budget = {k: v * args.train_minutes for k, v in TRAIN_SHARES.items()} if args.train_minutes and not args.smoke \
        else dict.fromkeys(TRAIN_SHARES)
    timings: dict = {}
    steps: dict = {}
    t0 = time.perf_counter()
    try:
        run_step("prepare the bundled CT", "dataset/prepare.py",
                 ["--input", ROOT / "data" / "ct", "--output", cache, "--config", cfg / "demo_data.yaml"], timings)
        if args.pretrained:
            ae, unet = PRETRAINED / "autoencoder.pt", PRETRAINED / "unet.pt"
            missing = [str(f) for f in (ae, unet) if not f.is_file()]
            if missing:
                raise StepFailed(f"--pretrained needs {' and '.join(missing)} (see pretrained/README.md)")
        else:
            train_step("autoencoder stage 1 (patches)", "train/train_autoencoder.py",
                       ["--config", cfg / "demo_autoencoder_stage1.yaml", "--cache", cache, *short],
                       runs / "ae_stage1", budget["ae_stage1"], timings, steps)
            train_step("autoencoder stage 2 (decoder on whole crops)", "train/train_autoencoder.py",
                       ["--config", cfg / "demo_autoencoder_stage2.yaml", "--cache", cache,
                        "--init-from", final_checkpoint(runs / "ae_stage1"), *short],
                       runs / "ae_stage2", budget["ae_stage2"], timings, steps)
            ae = final_checkpoint(runs / "ae_stage2")
            run_step("latents", "train/generate_training_latent.py",
                     # one pair per case: the demo U-Net's 128x128x32 crops are larger than the extra pair crops
                     ["--cache", cache, "--checkpoint", ae, "--output", latents, "--splits", "train", "--no-pairs"], timings)
            train_step("latent U-Net", "train/train_unet_latent.py",
                       ["--config", cfg / "demo_unet.yaml", "--latents", latents, *short],
                       runs / "unet", budget["unet"], timings, steps)
            unet = final_checkpoint(runs / "unet")
        run_step("interpolate the held-out chest and score it", "evaluation/interpolate.py",
                 ["--split", "test", "--cache", cache, "--output", report, "--autoencoder", ae, "--unet", unet,
                  *(["--steps", 2, "--adapt", 2] if args.smoke else ["--adapt", DEMO_ADAPT_STEPS])], timings)
    except StepFailed as e:
        print(f"\ndemo stopped: {e}", file=sys.stderr)
        return 1
    minutes = (time.perf_counter() - t0) / 60
    write_json(out / "demo.json", {"pretrained": args.pretrained, "smoke": args.smoke, "seconds": timings,
                                   "minutes": round(minutes, 2), "train_minutes": args.train_minutes,
                                   "steps": steps, "machine": machine(), "autoencoder": str(ae), "unet": str(unet)})
    for run, s in steps.items():
        print(f"{run}: {s['step']} of {s['max_steps']} steps" + (f" (stopped {s['stopped']})" if s["stopped"] else ""))
    explain(report, out, args.pretrained, minutes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Peak memory and time of whole-scan autoencoder decoding, chunked vs one-shot.

  python benchmarks/decode_memory.py --shape 256 256 128 --chunk 64 64 64 [--bf16] [--device cuda] [--out FILE.json]

The autoencoder is pretrained/autoencoder.pt (--autoencoder; "default" for an untrained default
AutoencoderConfig). peak_bytes_per_voxel (peak over output voxels) sets evaluation/interpolation.py's
DECODER_BYTES_PER_VOXEL: 200 bf16, 397 fp32 for the shipped 4x4x2 autoencoder in channels-last memory (as the
codec runs it), one pass at latent 64^3 (396..452 and 530 before channels-last).

Peak memory: torch.cuda.max_memory_allocated on GPU; on CPU the process's peak RSS growth
(ru_maxrss), measured in a fresh subprocess per setting so runs do not mask each other.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch

from AutoEncoder.codec import load_autoencoder
from AutoEncoder.model import PatchVolumeAutoencoder
from thinslice.config import AutoencoderConfig


def one(shape, chunk, device, bf16, autoencoder):
    torch.manual_seed(0)
    if autoencoder == "default":
        model = PatchVolumeAutoencoder(AutoencoderConfig()).to(device).eval()
    else:
        model = load_autoencoder(autoencoder, device)[0]
    model.to(memory_format=torch.channels_last_3d)  # as AutoEncoder.codec.Codec runs it
    z = torch.randn(1, model.cfg.latent_channels, *[s // k for s, k in zip(shape, model.compression)], device=device)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.time()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        out = model.decode_volume(z, chunk=chunk)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 2**20
    return {"shape": list(shape), "chunk": list(chunk), "device": device, "bf16": bf16, "seconds": round(time.time() - t, 2),
            "peak_gib": round(peak, 2), "output_shape": list(out.shape[2:]),
            "peak_bytes_per_voxel": round(peak * 2**30 / out[0, 0].numel(), 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=int, nargs=3, default=[256, 256, 148])
    p.add_argument("--chunk", type=int, nargs=3, action="append", help="latent chunk; repeat for several")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--autoencoder", default="pretrained/autoencoder.pt")
    p.add_argument("--out", default=None)
    p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    chunks = args.chunk or [[16, 16, 16], [32, 32, 32], [9999, 9999, 9999]]
    if args.single:
        print(json.dumps(one(args.shape, chunks[0], args.device, args.bf16, args.autoencoder)))
        return
    rows = []
    for c in chunks:
        cmd = [sys.executable, __file__, "--single", "--shape", *map(str, args.shape), "--chunk", *map(str, c),
               "--device", args.device, "--autoencoder", args.autoencoder] + (["--bf16"] if args.bf16 else [])
        rows.append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout))
        print(rows[-1], flush=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    report = {"device_name": name, "torch": torch.__version__, "model": args.autoencoder, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()

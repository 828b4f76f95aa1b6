"""Does torch.compile pay for the decoder on this CPU? One pair-pass chunk of the shipped autoencoder (a latent
chunk of 16 with the default halo of 3, batch 2 as residual decoding runs it), bf16 channels-last as the codec runs
it: eager against torch.compile with and without inductor's freezing (weight prepacking).

  python benchmarks/compile_probe.py --out benchmarks/results/compile_probe.json
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from AutoEncoder.codec import Codec, load_autoencoder
from thinslice.atomic import write_json
from thinslice.precision import choose, cpu_model


def timed(f, z, policy, n):
    out, seconds = None, []
    for _ in range(n):
        t = time.perf_counter()
        with torch.no_grad(), policy.autocast("cpu"):
            out = f(z)
        seconds.append(round(time.perf_counter() - t, 3))
    return seconds, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    import torch._inductor.config as inductor

    ae, state = load_autoencoder("pretrained/autoencoder.pt", "cpu")
    policy = choose("cpu")
    decoder = Codec(ae, tuple(state["config"]["data"]["hu_window"]), torch.device("cpu"), policy).model.decoder
    z = torch.randn(2, 8, 22, 22, 22, generator=torch.Generator().manual_seed(0)).contiguous(
        memory_format=torch.channels_last_3d)
    eager, ref = timed(decoder, z, policy, 3)
    rows = {"eager": {"seconds": eager}}
    for freezing in (False, True):
        inductor.freezing = freezing
        torch._dynamo.reset()
        seconds, out = timed(torch.compile(decoder), z, policy, 4)
        rows[f"compile, freezing={freezing}"] = {"first_call_seconds": seconds[0], "seconds": seconds[1:],
                                                 "max_abs_diff_unit": round(float((out.float() - ref.float()).abs().max()), 4)}
        print(f"freezing={freezing}: {rows[f'compile, freezing={freezing}']}", flush=True)
    write_json(a.out, {"source": "python benchmarks/compile_probe.py --out " + str(a.out), "cpu": cpu_model(),
                       "threads": torch.get_num_threads(), "precision": str(policy), "torch": torch.__version__,
                       "chunk": "latent 22^3 (16 + halo 3 each side), batch 2, output 88x88x44 voxels", "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

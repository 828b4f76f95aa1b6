"""How much latent context a decoded chunk needs: chunked decoding with halo h against one unchunked pass.

  python benchmarks/decode_halo.py [--autoencoder pretrained/autoencoder.pt] [--fp32] [--chunk 16]

Encodes a bundled CT volume, decodes it whole and in `--chunk`-voxel latent chunks with each halo, and prints
the HU difference (mean, 99th percentile, max). In fp32 the difference is the chunking's alone; under bf16 the
rounding adds a floor of a few HU. Picks `interpolate.decode_halo`.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from AutoEncoder.codec import Codec
from dataset.readers import read_volume
from thinslice.precision import choose

DEFAULT_VOLUME = "data/ct/small/totalseg-s2_abdomen_3mm-resampled.nii.gz"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--autoencoder", default="pretrained/autoencoder.pt")
    p.add_argument("--volume", default=DEFAULT_VOLUME)
    p.add_argument("--fp32", action="store_true", help="decode in fp32 (default: the precision policy)")
    p.add_argument("--chunk", type=int, default=16, help="latent voxels per chunk edge")
    p.add_argument("--halos", type=int, nargs="+", default=[0, 2, 4, 6, 8, 12])
    args = p.parse_args(argv)
    codec, _ = Codec.load(args.autoencoder)
    if args.fp32:
        codec.precision = choose(codec.device, allowed=False)
    hu = np.asarray(read_volume(args.volume).array, dtype=np.float32)[:, :, :96]
    z = codec.encode(hu)
    print(f"{args.volume} {hu.shape} -> latent {tuple(z.shape[2:])}, {codec.precision}")
    whole = codec.decode(z, hu.shape, chunk=(9999,) * 3)[0, 0].numpy()
    for h in args.halos:
        t = time.perf_counter()
        d = np.abs(codec.decode(z, hu.shape, chunk=(args.chunk,) * 3, halo=h)[0, 0].numpy() - whole)
        print(f"halo {h:2d}: {time.perf_counter() - t:5.1f} s, |chunked - whole| mean {d.mean():.3f} HU, "
              f"p99 {np.percentile(d, 99):.2f}, max {d.max():.1f}", flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()

"""Winograd F(2x2,3x3) against oneDNN's direct 3x3 convolution, per layer shape (inference, no gradients).

`python bench/bench_winograd.py` prints one JSON line per shape: the two steady medians and the tile count that
`guided_diffusion.winograd.MIN_TILES` is compared with. The shapes are the 3x3 convolutions of the ADM-64 and
small-64 UNets at batch 4 and 1.
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from timing import emit, measure  # noqa: E402

import jittor as jt  # noqa: E402
import numpy as np  # noqa: E402
from jittor import nn as jnn  # noqa: E402

from guided_diffusion import winograd  # noqa: E402

# (batch, in channels, out channels, size)
SHAPES = [(4, 192, 192, 64), (4, 384, 384, 32), (4, 576, 576, 16), (4, 768, 768, 8), (4, 64, 64, 64),
          (4, 128, 128, 32), (4, 192, 192, 16), (4, 256, 256, 8), (1, 192, 192, 64), (1, 576, 576, 16),
          (2, 576, 576, 16), (1, 384, 384, 32)]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.RandomState(0)
    for n, c, o, s in SHAPES:
        x = jt.array(rng.randn(n, c, s, s).astype(np.float32))
        conv = jnn.Conv2d(c, o, 3, padding=1)
        with jt.no_grad():
            wino = measure(lambda: winograd.winograd_conv3x3(x, conv.weight, conv.bias), args.repeats)
            direct = measure(lambda: jnn.Conv2d.execute(conv, x), args.repeats)
        emit(dict(bench="winograd_conv", batch=n, in_channels=c, out_channels=o, size=s,
                  tiles=winograd.tile_count(x), winograd_ms=round(wino["steady_median_s"] * 1e3, 2),
                  direct_ms=round(direct["steady_median_s"] * 1e3, 2),
                  speedup=round(direct["steady_median_s"] / wino["steady_median_s"], 2),
                  load1_after=direct["load1_after"]))


if __name__ == "__main__":
    main()

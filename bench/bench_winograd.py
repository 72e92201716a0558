"""Winograd F(2x2,3x3) against oneDNN's direct 3x3 convolution, per layer shape.

`python bench/bench_winograd.py` prints one JSON line per shape and direction: the two steady medians and the tile
count that the thresholds in `guided_diffusion.winograd` (MIN_TILES, MIN_TILES_GRAD_WEIGHT) are compared with.
Inference (`winograd_conv`): the 3x3 convolutions of the ADM-64 and small-64 UNets at batch 4 and 1. Training
(`winograd_grad`): the small-64 UNet's 3x3 convolutions at batch 8, forward, input gradient and weight gradient,
each against the oneDNN primitive Jittor runs for it (with its layout reorders, as in a training step).
"""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # bench/, then the repository root
from timing import emit, measure  # noqa: E402

import jittor as jt  # noqa: E402
import numpy as np  # noqa: E402
from jittor import nn as jnn  # noqa: E402

from guided_diffusion.cpu import winograd  # noqa: E402

# (batch, in channels, out channels, size)
SHAPES = [(4, 192, 192, 64), (4, 384, 384, 32), (4, 576, 576, 16), (4, 768, 768, 8), (4, 64, 64, 64),
          (4, 128, 128, 32), (4, 192, 192, 16), (4, 256, 256, 8), (1, 192, 192, 64), (1, 576, 576, 16),
          (2, 576, 576, 16), (1, 384, 384, 32)]
TRAIN_SHAPES = [(8, 64, 64, 64), (8, 128, 64, 64), (8, 128, 128, 32), (8, 192, 192, 16), (8, 256, 256, 8),
                (2, 128, 128, 32)]


def _ms(result) -> float:
    return round(result["steady_median_s"] * 1e3, 2)


def bench_training(rng, repeats: int) -> None:
    """Forward, input gradient and weight gradient of one layer, Winograd against oneDNN."""
    for n, c, o, s in TRAIN_SHAPES:
        x = jt.array(rng.randn(n, c, s, s).astype(np.float32))
        dy = jt.array(rng.randn(n, o, s, s).astype(np.float32))
        conv = jnn.Conv2d(c, o, 3, padding=1)
        w = conv.weight
        pairs = {
            "forward": (lambda: winograd.winograd_conv3x3(x, w, conv.bias),
                        lambda: jnn.Conv2d.execute(conv, x)),
            "grad_input": (lambda: winograd.winograd_conv3x3(dy, w, transposed=True),
                           lambda: jt.mkl_ops.mkl_conv_backward_x(w, dy, s, s, 1, 1, 1, 1, 1, 1, 1)),
            "grad_weight": (lambda: winograd.winograd_grad_weight(x, dy),
                            lambda: jt.mkl_ops.mkl_conv_backward_w(x, dy, 3, 3, 1, 1, 1, 1, 1, 1, 1)),
        }
        for direction, (wino_fn, onednn_fn) in pairs.items():
            with jt.no_grad():
                wino = measure(wino_fn, repeats)
                direct = measure(onednn_fn, repeats)
            emit(dict(bench="winograd_grad", direction=direction, batch=n, in_channels=c, out_channels=o, size=s,
                      tiles=winograd.tile_count(x), winograd_ms=_ms(wino), onednn_ms=_ms(direct),
                      speedup=round(direct["steady_median_s"] / wino["steady_median_s"], 2),
                      load1_after=direct["load1_after"]))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--part", choices=["inference", "training", "all"], default="all")
    args = parser.parse_args()
    rng = np.random.RandomState(0)
    if args.part in ("training", "all"):
        bench_training(rng, args.repeats)
    if args.part == "training":
        return
    for n, c, o, s in SHAPES:
        x = jt.array(rng.randn(n, c, s, s).astype(np.float32))
        conv = jnn.Conv2d(c, o, 3, padding=1)
        with jt.no_grad():
            wino = measure(lambda: winograd.winograd_conv3x3(x, conv.weight, conv.bias), args.repeats)
            direct = measure(lambda: jnn.Conv2d.execute(conv, x), args.repeats)
        emit(dict(bench="winograd_conv", batch=n, in_channels=c, out_channels=o, size=s,
                  tiles=winograd.tile_count(x), winograd_ms=_ms(wino), direct_ms=_ms(direct),
                  speedup=round(direct["steady_median_s"] / wino["steady_median_s"], 2),
                  load1_after=direct["load1_after"]))


if __name__ == "__main__":
    main()

"""
Store a training checkpoint (e.g. ema_0.995_003000.pt) as a float16 .pt for the repository: half the size; the
checkpoint loader casts the weights back to float32.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from digits import save_demo_checkpoint  # noqa: E402  (this folder's digits.py)
from guided_diffusion.errors import run_cli  # noqa: E402


def main() -> None:
    args = create_argparser().parse_args()
    count = save_demo_checkpoint(args.src, args.dest)
    print("%d tensors written to %s (%.2f MB)" % (count, args.dest, os.path.getsize(args.dest) / 1e6))


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("src", help="checkpoint written by a training script (float32 state dict)")
    parser.add_argument("dest", help="where to write the float16 copy")
    return parser


if __name__ == "__main__":
    run_cli(main)

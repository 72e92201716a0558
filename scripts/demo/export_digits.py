"""
Export the shipped MNIST digits (scripts/demo/mnist_5k.npz) to a folder of 32x32 RGB PNGs named <digit>_<index>.png,
the layout the training scripts read with --data_dir (the class is the file-name prefix before "_").
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from digits import export_digits  # noqa: E402  (this folder's digits.py)
from guided_diffusion.errors import run_cli  # noqa: E402


def main() -> None:
    args = create_argparser().parse_args()
    count = export_digits(args.npz, args.out_dir)
    print("%d digits in %s" % (count, args.out_dir))


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--npz", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "mnist_5k.npz"),
                        help="the digits (.npz with `images` uint8 N x 28 x 28 and `labels`)")
    parser.add_argument("--out_dir", default="data/digits", help="folder to write the PNGs into")
    return parser


if __name__ == "__main__":
    run_cli(main)

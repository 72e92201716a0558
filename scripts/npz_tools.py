"""
Work with sample batches (.npz files with arr_0 = uint8 N x H x W x 3 images and optional arr_1 = labels, as written
by the sampling scripts and read by evaluations/evaluator.py):

    python scripts/npz_tools.py info samples_100x256x256x3.npz
    python scripts/npz_tools.py export samples_100x256x256x3.npz out_pngs/ --limit 16
    python scripts/npz_tools.py grid samples_100x256x256x3.npz grid.png --count 64
    python scripts/npz_tools.py pack path/to/images/ images.npz --image_size 256 --labels True

Large files are streamed: the whole array is never loaded.
"""

import argparse
import os
import sys

import numpy as np

# Entry scripts outside the repository root put the root first on sys.path, so they run from any working
# directory (root scripts have it already: Python puts a script's own folder first).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import npz_tools  # noqa: E402
from guided_diffusion.errors import UserError, run_cli  # noqa: E402
from guided_diffusion.image_grid import save_image_grid  # noqa: E402
from guided_diffusion.script_util import str2bool  # noqa: E402


def main():
    args = create_argparser().parse_args()
    if args.command == "info":
        print(npz_tools.npz_summary(_existing(args.npz)))
    elif args.command == "export":
        n = npz_tools.export_npz_images(_existing(args.npz), args.out_dir, limit=args.limit, grid=args.grid)
        print("wrote %d images to %s" % (n, args.out_dir))
    elif args.command == "grid":
        images = np.concatenate(list(npz_tools.iter_npz_images(_existing(args.npz), limit=args.count)))
        save_image_grid(images, args.out, nrow=args.nrow)
        print("wrote a grid of %d images to %s" % (len(images), args.out))
    elif args.command == "pack":
        shape = npz_tools.pack_images_to_npz(args.image_dir, args.out, image_size=args.image_size,
                                             with_labels=args.labels)
        print("wrote %s images to %s" % ("x".join(str(s) for s in shape), args.out))


def _existing(path):
    if not os.path.isfile(path):
        raise UserError("%s: file not found" % path)
    return path


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="print the arrays, shapes, dtypes and label statistics of an .npz")
    p.add_argument("npz")
    p = sub.add_parser("export", help="write the images of an .npz as PNG files (and a grid.png)")
    p.add_argument("npz")
    p.add_argument("out_dir")
    p.add_argument("--limit", type=int, default=None, help="export only the first LIMIT images")
    p.add_argument("--grid", type=str2bool, default=True, help="also write grid.png of the first 64 images")
    p = sub.add_parser("grid", help="write one PNG grid of the first images of an .npz")
    p.add_argument("npz")
    p.add_argument("out")
    p.add_argument("--count", type=int, default=64, help="number of images in the grid (default: %(default)s)")
    p.add_argument("--nrow", type=int, default=None, help="images per row (default: a square grid)")
    p = sub.add_parser("pack", help="build an .npz (arr_0, optional arr_1) from a folder of images")
    p.add_argument("image_dir")
    p.add_argument("out")
    p.add_argument("--image_size", type=int, default=None,
                   help="centre-crop and resize every image to this square size (default: keep sizes; all images "
                        "must then have the same size)")
    p.add_argument("--labels", type=str2bool, default=False,
                   help="also write arr_1: class ids from the file-name prefix before the first '_' (sorted names "
                        "-> 0, 1, ...), as the training data loader assigns them")
    return parser


if __name__ == "__main__":
    run_cli(main)

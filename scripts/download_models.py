"""
Download the released guided-diffusion checkpoints (openai/guided-diffusion, July 2021) by name into a models
folder. Files already present are kept. Example:

    python scripts/download_models.py 256x256_diffusion 256x256_diffusion_uncond 256x256_classifier
    python scripts/download_models.py --list
"""

import argparse
import os
import sys

# Entry scripts outside the repository root put the root first on sys.path, so they run from any working
# directory (root scripts have it already: Python puts a script's own folder first).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import download  # noqa: E402
from guided_diffusion.errors import run_cli  # noqa: E402


def main():
    args = create_argparser().parse_args()
    if args.list or not args.names:
        print("\n".join(download.released_checkpoint_summary()))
        if not args.list:
            print("\ngive one or more names (or `all`) to download them into %s" % args.models_dir)
        return
    for path in download.download_released_checkpoints(args.names, args.models_dir):
        print(path)


def create_argparser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*",
                        help="checkpoint names such as 256x256_diffusion (with or without .pt), or `all`")
    parser.add_argument("--models_dir", default="models",
                        help="folder the checkpoints are saved in (default: %(default)s)")
    parser.add_argument("--list", action="store_true", help="list the available checkpoints and exit")
    return parser


if __name__ == "__main__":
    run_cli(main)

"""
Encode a DiT training set with the VAE once, for fast training (`train.py --feature-path`).

Every image of --data-path (an ImageFolder tree, read as train.py reads it: centre crop, [-1, 1]) and its mirror
image are encoded; the VAE posterior's mean and std are stored as float32 shards of --shard-size images in
--features-path (at 256 px: 64 KiB per image, 65.5 MB per 1,000 images). Rerunning the same command after an
interruption skips the shards already written. Under mpirun rank r encodes shards r, r + N, ...
"""

import argparse
import os
import sys

# Entry scripts outside the repository root put the root first on sys.path, so they run from any working
# directory; DiT's put their own folder before it, for DiT's modules (models, diffusion, ...).
DIT_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [DIT_DIR, os.path.dirname(DIT_DIR)]

import guided_diffusion  # noqa: F401,E402  (prepares Jittor's environment before Jittor is imported)

from guided_diffusion import dist_util  # noqa: E402
from guided_diffusion.errors import InputCheck, run_cli  # noqa: E402

import dit_util  # noqa: E402
import features  # noqa: E402


def create_argparser() -> argparse.ArgumentParser:
    """train.py's data and VAE flags, the output folder, the batch and shard sizes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-path", type=str, required=True,
                        help="training images, one sub-folder per class (as for train.py)")
    parser.add_argument("--features-path", type=str, required=True,
                        help="output folder (train.py --feature-path reads it); rerun to resume")
    parser.add_argument("--image-size", type=int, default=256, help="image size in pixels, as train.py's")
    features.add_class_flag(parser)
    dit_util.add_vae_flags(parser, default_vae="ema")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="images per VAE pass and process (each with its mirror: the VAE sees twice as many)")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per shard file")
    parser.add_argument("--max-shards", type=int, default=0,
                        help="stop after this many new shards per process (0: no limit); rerun to continue")
    return parser


def main() -> None:
    """Check the flags, list the images, load the VAE and write the missing shards, then the index."""
    args = create_argparser().parse_args()
    dist_util.setup_dist()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    check = InputCheck()
    for flag, value, least in (("--batch-size", args.batch_size, 1), ("--shard-size", args.shard_size, 1),
                               ("--max-shards", args.max_shards, 0)):
        if value < least:
            check.problem("%s must be at least %d (got %d)" % (flag, least, value))
    listing = check(dit_util.list_image_folder, args.data_path, args.class_from)
    if os.path.exists(args.features_path) and not os.path.isdir(args.features_path):
        check.problem("--features-path %s is a file: give a folder" % args.features_path)
    dit_util.check_vae_inputs(check, args)
    check.done()

    files, labels, classes = listing
    if rank == 0 and listing.notice:
        print("note: " + listing.notice)
    vae = dit_util.load_vae(args)
    latent_size = dit_util.latent_size_for(args.image_size, dit_util.vae_downsample_factor(vae))
    latent_shape = (vae.config["latent_channels"], latent_size, latent_size)
    vae_name = os.path.basename(os.path.normpath(dit_util.vae_folder(args)))
    plan = features.feature_plan(files, classes, args.image_size, latent_shape, args.shard_size, vae_name,
                                 args.data_path)
    log = print if rank == 0 else (lambda message: None)
    log("%d images in %d classes -> %d shards in %s (%.1f MB)" % (
        len(files), len(classes), plan["num_shards"], args.features_path,
        len(files) * features.bytes_per_image(latent_shape) / 1e6))
    index = features.extract_features(args.features_path, plan, files, labels, features.vae_moments_encoder(vae),
                                      batch_size=args.batch_size, max_shards=args.max_shards, rank=rank,
                                      world_size=world, log=log, warn=lambda m: print(m, file=sys.stderr))
    if index is not None:
        log("train with: python train.py --feature-path %s --image-size %d --num-classes %d ..."
            % (args.features_path, args.image_size, len(classes)))


if __name__ == "__main__":
    run_cli(main)

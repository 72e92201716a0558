"""
Generate a large batch of image samples from a model and save them as a large numpy array. This can be used to
produce samples for FID evaluation.
"""

import argparse
import os
import sys

# Entry scripts outside the repository root put the root first on sys.path, so they run from any working
# directory (root scripts have it already: Python puts a script's own folder first).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import dist_util, logger, model_loading, sampling, samplers  # noqa: E402
from guided_diffusion.errors import InputCheck, run_cli  # noqa: E402
from guided_diffusion.flag_help import attach_flag_help  # noqa: E402
from guided_diffusion.script_util import add_dict_to_argparser, model_and_diffusion_defaults  # noqa: E402


def main():
    args = create_argparser().parse_args()
    check = InputCheck()
    sampling.check_sampling_flags(check, args)
    classes = check(model_loading.trained_classes, args.model_path, args.num_classes) if args.class_cond else None
    fixed = check(model_loading.parse_class_labels, args.class_labels, classes or args.num_classes)
    if fixed and not args.class_cond:
        check.problem("--class_labels needs a class-conditional model: add --class_cond True")
    check(model_loading.require_file, args.model_path, what="diffusion model", flag="--model_path")
    check.done()

    dist_util.setup_dist()
    logger.configure()

    logger.log("creating model and diffusion...")
    model, diffusion = model_loading.load_model_and_diffusion(
        args, model_and_diffusion_defaults().keys(), model_path=args.model_path
    )

    if args.class_cond:
        logger.log(classes.describe())
    logger.log("sampling...")
    sample_batch = sampling.make_diffusion_sampler(
        diffusion, model, image_size=args.image_size, batch_size=args.batch_size, seed=args.seed,
        sampler=samplers.choice_from_args(args), clip_denoised=args.clip_denoised,
        num_classes=classes.count if args.class_cond else None, fixed_labels=fixed,
    )
    sampling.generate_samples(
        sample_batch, num_samples=args.num_samples, batch_size=args.batch_size, out_dir=logger.get_dir(),
        image_shape=(args.image_size, args.image_size, 3), run_config=sampling.sampling_run_config(args),
    )
    logger.log("sampling complete")


def create_argparser():
    defaults = dict(
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        sampler="",
        unipc_order=2,
        unipc_variant="bh2",
        model_path="",
        seed=0,
        class_labels="",
    )
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dict_to_argparser(parser, defaults)
    attach_flag_help(parser)
    return parser


if __name__ == "__main__":
    run_cli(main)

"""
Approximate the bits/dimension for an image model.
"""

import argparse
import os
import sys

# Entry scripts outside the repository root put the root first on sys.path, so they run from any working
# directory (root scripts have it already: Python puts a script's own folder first).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import dist_util, logger, model_loading, sampling  # noqa: E402
from guided_diffusion.bpd_evaluation import run_bpd_evaluation  # noqa: E402
from guided_diffusion.errors import InputCheck, run_cli  # noqa: E402
from guided_diffusion.flag_help import attach_flag_help  # noqa: E402
from guided_diffusion.image_datasets import check_data_dir, load_data  # noqa: E402
from guided_diffusion.script_util import add_dict_to_argparser, model_and_diffusion_defaults  # noqa: E402


def main():
    args = create_argparser().parse_args()
    check = InputCheck()
    sampling.check_sampling_flags(check, args)
    check(check_data_dir, args.data_dir)
    check(model_loading.require_file, args.model_path, what="diffusion model", flag="--model_path")
    check.done()

    dist_util.setup_dist()
    logger.configure()

    logger.log("creating model and diffusion...")
    # Like the reference, the model is evaluated without the fp16 conversion (use_fp16 is not applied).
    model, diffusion = model_loading.load_model_and_diffusion(
        args, model_and_diffusion_defaults().keys(), model_path=args.model_path, use_fp16=False
    )

    logger.log("creating data loader...")
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        deterministic=True,
        seed=args.seed,
    )
    sampling.seed_batch(args.seed, 0)

    logger.log("evaluating...")
    run_bpd_evaluation(model, diffusion, data, args.num_samples, args.clip_denoised)
    logger.log("evaluation complete")


def create_argparser():
    defaults = dict(data_dir="", clip_denoised=True, num_samples=1000, batch_size=1, model_path="", seed=0)
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dict_to_argparser(parser, defaults)
    attach_flag_help(parser, {
        "num_samples": "number of dataset images to evaluate (rounded up to whole batches)",
        "batch_size": "images per batch (per MPI rank)",
        "seed": "seed of the noise drawn at every timestep (the reference does not seed)",
    })
    return parser


if __name__ == "__main__":
    run_cli(main)

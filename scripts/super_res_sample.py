"""
Generate a large batch of samples from a super resolution model, given a batch of samples from a regular model
from image_sample.py.
"""

import argparse
import os
import sys

# Entry scripts outside the repository root put the root first on sys.path, so they run from any working
# directory (root scripts have it already: Python puts a script's own folder first).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import dist_util, logger, model_loading, sampling, samplers  # noqa: E402
from guided_diffusion.base_samples import BaseSamples  # noqa: E402
from guided_diffusion.errors import InputCheck, run_cli  # noqa: E402
from guided_diffusion.flag_help import attach_flag_help  # noqa: E402
from guided_diffusion.script_util import (  # noqa: E402
    add_dict_to_argparser,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)


def main():
    args = create_argparser().parse_args()
    check = InputCheck()
    sampling.check_sampling_flags(check, args)
    base = check(BaseSamples, args.base_samples, args.small_size, args.class_cond)
    check(model_loading.require_file, args.model_path, what="super-resolution model", flag="--model_path")
    check.done()

    dist_util.setup_dist()
    logger.configure()

    logger.log("creating model...")
    model, diffusion = model_loading.load_model_and_diffusion(
        args, sr_model_and_diffusion_defaults().keys(), model_path=args.model_path,
        factory=sr_create_model_and_diffusion,
    )

    logger.log("creating samples...")
    sample_batch = sampling.make_diffusion_sampler(
        diffusion, model, image_size=args.large_size, batch_size=args.batch_size, seed=args.seed,
        sampler=samplers.choice_from_args(args), clip_denoised=args.clip_denoised,
        extra_kwargs=lambda b, n: base.batch(b, args.batch_size, n),
    )
    sampling.generate_samples(
        sample_batch, num_samples=args.num_samples, batch_size=args.batch_size, out_dir=logger.get_dir(),
        image_shape=(args.large_size, args.large_size, 3), run_config=sampling.sampling_run_config(args),
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
        base_samples="",
        model_path="",
        seed=0,
    )
    defaults.update(sr_model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dict_to_argparser(parser, defaults)
    attach_flag_help(parser, {
        "use_ddim": "sample with DDIM instead of DDPM (the reference script ignores this flag and always uses "
                    "DDPM; here it is honoured)",
        "model_path": "super-resolution checkpoint (.pt), e.g. models/64_256_upsampler.pt",
        "num_samples": "number of upsampled images; base samples are used in turn, cyclically",
    })
    return parser


if __name__ == "__main__":
    run_cli(main)

"""
Train a super-resolution model (low_res = the training image area-downsampled to --small_size).
"""

import argparse
import os
import sys

# Entry scripts outside the repository root put the root first on sys.path, so they run from any working
# directory (root scripts have it already: Python puts a script's own folder first).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import dist_util, logger  # noqa: E402
from guided_diffusion.model_loading import finetune_from  # noqa: E402
from guided_diffusion.errors import InputCheck, run_cli  # noqa: E402
from guided_diffusion.image_datasets import area_downsample, check_data_classes, check_data_dir, load_data  # noqa: E402
from guided_diffusion.resample import create_named_schedule_sampler  # noqa: E402
from guided_diffusion.training.preview import superres_preview_inputs  # noqa: E402
from guided_diffusion.script_util import (  # noqa: E402
    add_dict_to_argparser,
    args_to_dict,
    preview_diffusion_from_args,
    sr_create_model_and_diffusion,
    sr_model_and_diffusion_defaults,
)
from guided_diffusion.flag_help import TRAINING_FLAG_HELP, attach_flag_help  # noqa: E402
from guided_diffusion.train_util import (  # noqa: E402
    PREVIEW_DEFAULTS,
    TRAINING_CORE_DEFAULTS,
    check_training_flags,
    seeded_initialisation,
    train_loop_from_args,
)


def main() -> None:
    args = create_argparser().parse_args()
    check = InputCheck()
    check_training_flags(check, args)
    check(check_data_dir, args.data_dir)
    if args.class_cond:
        check(check_data_classes, args.data_dir, args.class_from, args.num_classes)
    if not 0 < args.small_size <= args.large_size:
        check.problem("--small_size %d must lie in 1..--large_size (%d)" % (args.small_size, args.large_size))
    check.done()

    dist_util.setup_dist()
    logger.configure()

    logger.log("creating model...")
    with seeded_initialisation(args.seed):
        model, diffusion = sr_create_model_and_diffusion(
            **args_to_dict(args, sr_model_and_diffusion_defaults().keys())
        )
    if args.finetune_from:
        finetune_from(model, args.finetune_from, log=logger.log)
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

    logger.log("creating data loader...")
    data = load_superres_data(
        args.data_dir,
        args.batch_size,
        large_size=args.large_size,
        small_size=args.small_size,
        class_cond=args.class_cond,
        random_flip=args.random_flip,
        seed=args.seed,
        class_from=args.class_from,
        num_classes=args.num_classes,
    )

    logger.log("training...")
    loop = train_loop_from_args(args, model, diffusion, data, schedule_sampler)
    if args.preview_interval:  # fixed low-resolution inputs (the first images), each shown beside its sample
        low_res, inputs = superres_preview_inputs(data.base.dataset, args.small_size, seed=args.seed)
        loop.add_preview(args.preview_interval, preview_diffusion_from_args(args), model_kwargs=low_res,
                         beside=inputs, shape=(3, args.large_size, args.large_size))
    loop.run_loop()


def load_superres_data(data_dir, batch_size, large_size, small_size, class_cond=False, random_flip=True, seed=0,
                       class_from="auto", num_classes=None):
    """Training batches of large_size images with model_kwargs["low_res"] (area-downsampled to small_size)."""
    data = load_data(
        data_dir=data_dir,
        batch_size=batch_size,
        image_size=large_size,
        class_cond=class_cond,
        random_flip=random_flip,
        seed=seed,
        class_from=class_from,
        num_classes=num_classes,
    )

    def add_low_res(large_batch, model_kwargs, _index):
        model_kwargs = dict(model_kwargs)
        model_kwargs["low_res"] = area_downsample(large_batch, small_size)
        return large_batch, model_kwargs

    return data.map(add_low_res)


def create_argparser() -> argparse.ArgumentParser:
    defaults = dict(
        data_dir="",
        class_from="auto",
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        batch_size=1,
        microbatch=-1,
        ema_rate="0.9999",
        log_interval=10,
        save_interval=10000,
        resume_checkpoint="",
        use_fp16=False,
        fp16_scale_growth=1e-3,
        random_flip=True,
        seed=0,
    )
    defaults.update(PREVIEW_DEFAULTS)  # --preview_interval: off by default
    defaults.update(TRAINING_CORE_DEFAULTS)  # post-hoc EMA (--ema_std), --max_steps: off by default
    defaults.update(sr_model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__)
    add_dict_to_argparser(parser, defaults)
    attach_flag_help(parser, TRAINING_FLAG_HELP)
    return parser


if __name__ == "__main__":
    run_cli(main)

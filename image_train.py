"""
Train a diffusion model on images.
"""

import argparse

from guided_diffusion import dist_util, logger
from guided_diffusion.errors import InputCheck, run_cli
from guided_diffusion.model_loading import finetune_from
from guided_diffusion.image_datasets import check_data_classes, check_data_dir, load_data
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    model_and_diffusion_defaults,
    preview_diffusion_from_args,
)
from guided_diffusion.flag_help import TRAINING_FLAG_HELP, attach_flag_help
from guided_diffusion.train_util import (
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
    check.done()

    dist_util.setup_dist()
    logger.configure()

    logger.log("creating model and diffusion...")
    with seeded_initialisation(args.seed):
        model, diffusion = create_model_and_diffusion(**args_to_dict(args, model_and_diffusion_defaults().keys()))
    if args.finetune_from:
        finetune_from(model, args.finetune_from, log=logger.log)
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

    logger.log("creating data loader...")
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=args.class_cond,
        random_flip=args.random_flip,
        seed=args.seed,
        class_from=args.class_from,
        num_classes=args.num_classes,
    )

    logger.log("training...")
    loop = train_loop_from_args(args, model, diffusion, data, schedule_sampler)
    classes = (len(data.class_names or []) or args.num_classes) if args.class_cond else None
    loop.add_preview(args.preview_interval, preview_diffusion_from_args(args), classes)
    loop.run_loop()


def create_argparser() -> argparse.ArgumentParser:
    defaults = dict(
        data_dir="",
        class_from="auto",
        schedule_sampler="uniform",
        lr=1e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        batch_size=1,
        microbatch=-1,  # -1 disables microbatches
        ema_rate="0.9999",  # comma-separated list of EMA values
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
    defaults.update(model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__)
    add_dict_to_argparser(parser, defaults)
    attach_flag_help(parser, TRAINING_FLAG_HELP)
    return parser


if __name__ == "__main__":
    run_cli(main)

"""
Train a noised image classifier on ImageNet-style folders (the classifier used for guided sampling).
"""

import argparse

from guided_diffusion import dist_util, logger
from guided_diffusion.model_loading import finetune_from
from guided_diffusion.errors import InputCheck, run_cli
from guided_diffusion.image_datasets import check_data_classes, check_data_dir, load_data
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
)
from guided_diffusion.flag_help import TRAINING_FLAG_HELP, attach_flag_help
from guided_diffusion.train_util import (
    TRAINING_CORE_DEFAULTS,
    check_training_flags,
    classifier_train_loop_from_args,
    seeded_initialisation,
)


def main() -> None:
    args = create_argparser().parse_args()
    check = InputCheck()
    check_training_flags(check, args)
    check(check_data_dir, args.data_dir)
    check(check_data_classes, args.data_dir, args.class_from, args.num_classes)
    if args.val_data_dir:
        check(check_data_dir, args.val_data_dir, flag="--val_data_dir")
    check.done()

    dist_util.setup_dist()
    logger.configure()

    logger.log("creating model and diffusion...")
    with seeded_initialisation(args.seed):
        model, diffusion = create_classifier_and_diffusion(
            **args_to_dict(args, classifier_and_diffusion_defaults().keys())
        )
    if args.finetune_from:
        finetune_from(model, args.finetune_from, log=logger.log)
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion) if args.noised else None

    logger.log("creating data loader...")
    data = load_data(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=True,
        random_crop=True,
        random_flip=args.random_flip,
        seed=args.seed,
        class_from=args.class_from,
        num_classes=args.num_classes,
    )
    val_data = None
    if args.val_data_dir:
        val_data = load_data(
            data_dir=args.val_data_dir,
            batch_size=args.batch_size,
            image_size=args.image_size,
            class_cond=True,
            random_flip=args.random_flip,
            seed=args.seed,
            class_from=args.class_from,
            class_names=data.class_names,
        )

    logger.log("training classifier model...")
    classifier_train_loop_from_args(args, model, diffusion, data, val_data, schedule_sampler).run_loop()


def create_argparser() -> argparse.ArgumentParser:
    defaults = dict(
        data_dir="",
        val_data_dir="",
        class_from="auto",
        noised=True,
        iterations=150000,
        lr=3e-4,
        weight_decay=0.0,
        anneal_lr=False,
        batch_size=4,
        microbatch=-1,
        schedule_sampler="uniform",
        resume_checkpoint="",
        log_interval=10,
        eval_interval=5,
        save_interval=10000,
        random_flip=True,
        seed=0,
    )
    defaults.update(TRAINING_CORE_DEFAULTS)  # post-hoc EMA (--ema_std), --max_steps: off by default
    defaults.update(classifier_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__)
    add_dict_to_argparser(parser, defaults)
    attach_flag_help(parser, TRAINING_FLAG_HELP)
    return parser


if __name__ == "__main__":
    run_cli(main)

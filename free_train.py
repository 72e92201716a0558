"""
Train a class-conditional diffusion model for classifier-free guidance (default: CIFAR-10, downloaded to
./data/cifar10 when absent). Labels are replaced by the null label (= --num_classes) with probability --p_uncond,
so one model learns both the conditional and the unconditional prediction; sample with free_sample.py.
"""

import argparse

from guided_diffusion import dist_util, logger
from guided_diffusion.cifar10 import check_folder_classes, load_cifar10_or_folder
from guided_diffusion.errors import InputCheck, run_cli
from guided_diffusion.image_datasets import with_label_dropout
from guided_diffusion.model_loading import finetune_from
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    create_model_and_diffusion,
    free_model_and_diffusion_defaults,
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

FREE_FLAG_HELP = dict(
    TRAINING_FLAG_HELP,
    data_dir="CIFAR-10 folder (cifar-10-batches-py inside, downloaded when absent) or a folder of images: one "
             "sub-folder per class, or flat with names <class>_<anything>.png (see --class_from)",
    num_classes="number of real classes; the label table gets one more row, the null label (= num_classes)",
)


def main() -> None:
    args = create_argparser().parse_args()
    check = InputCheck()
    check_training_flags(check, args)
    if not args.class_cond:
        check.problem("free_train.py trains a class-conditional model: leave --class_cond True")
    if not 0.0 <= args.p_uncond <= 1.0:
        check.problem("--p_uncond must be a probability in [0, 1] (got %g)" % args.p_uncond)
    if args.num_classes < 1:
        check.problem("--num_classes must be at least 1 (got %d)" % args.num_classes)
    check(check_folder_classes, args.data_dir, args.class_from, args.num_classes)
    check.done()

    dist_util.setup_dist()
    logger.configure()

    logger.log("creating model and diffusion...")
    with seeded_initialisation(args.seed):
        model, diffusion = create_model_and_diffusion(
            **dict(args_to_dict(args, model_and_diffusion_defaults().keys()), num_classes=args.num_classes + 1)
        )
    if args.finetune_from:
        finetune_from(model, args.finetune_from, log=logger.log)
    schedule_sampler = create_named_schedule_sampler(args.schedule_sampler, diffusion)

    logger.log("creating data loader...")
    data = load_cifar10_or_folder(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        image_size=args.image_size,
        class_cond=True,
        random_flip=args.random_flip,
        seed=args.seed,
        class_from=args.class_from,
        num_classes=args.num_classes,
    )
    classes = len(getattr(data, "class_names", None) or []) or args.num_classes
    data = with_label_dropout(data, args.p_uncond, null_label=args.num_classes, seed=args.seed)

    logger.log("training...")
    loop = train_loop_from_args(args, model, diffusion, data, schedule_sampler)
    loop.add_preview(args.preview_interval, preview_diffusion_from_args(args), classes)  # conditional rows
    loop.run_loop()


def create_argparser() -> argparse.ArgumentParser:
    defaults = dict(
        data_dir="./data/cifar10",
        class_from="auto",
        schedule_sampler="uniform",
        lr=2e-4,
        weight_decay=0.0,
        lr_anneal_steps=0,
        batch_size=128,
        microbatch=-1,
        ema_rate="0.9999",
        log_interval=100,
        save_interval=10000,
        resume_checkpoint="",
        use_fp16=False,
        fp16_scale_growth=1e-3,
        p_uncond=0.1,
        random_flip=True,
        seed=0,
    )
    defaults.update(PREVIEW_DEFAULTS)  # --preview_interval: off by default
    defaults.update(TRAINING_CORE_DEFAULTS)  # post-hoc EMA (--ema_std), --max_steps: off by default
    defaults.update(free_model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__)
    add_dict_to_argparser(parser, defaults)
    attach_flag_help(parser, FREE_FLAG_HELP)
    return parser


if __name__ == "__main__":
    run_cli(main)

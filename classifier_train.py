"""
Train a noised image classifier on ImageNet-style folders (the classifier used for guided sampling).
"""

import argparse

from guided_diffusion import dist_util, logger
from guided_diffusion.errors import InputCheck, run_cli
from guided_diffusion.image_datasets import check_data_dir, load_data
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    args_to_dict,
    classifier_and_diffusion_defaults,
    create_classifier_and_diffusion,
)
from guided_diffusion.train_util import (
    TRAIN_FLAG_HELP,
    ClassifierTrainLoop,
    check_training_flags,
    seeded_initialisation,
    set_flag_help,
)

CLASSIFIER_FLAG_HELP = dict(
    TRAIN_FLAG_HELP,
    val_data_dir="folder of validation images (evaluated every --eval_interval steps); '' to skip",
    noised="train on noised inputs q_sample(x, t) with random timesteps t (for guidance)",
    iterations="total number of optimizer steps (resumed steps included)",
    anneal_lr="decay the learning rate linearly to 0 over --iterations",
    eval_interval="evaluate on --val_data_dir every this many steps",
    classifier_use_fp16="mixed precision with dynamic loss scaling (CUDA only)",
    classifier_width="base channel count of the classifier",
    classifier_depth="residual blocks per resolution",
    classifier_attention_resolutions="comma-separated downsampling rates with attention",
    classifier_use_scale_shift_norm="FiLM-like timestep conditioning in the residual blocks",
    classifier_resblock_updown="residual blocks for downsampling",
    classifier_pool="output head: attention, adaptive, spatial or spatial_v2",
    data_dir="folder of training images; the class is the file-name prefix before '_'",
)


def main() -> None:
    args = create_argparser().parse_args()
    check = InputCheck()
    check_training_flags(check, args)
    check(check_data_dir, args.data_dir)
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
        )

    logger.log("training classifier model...")
    ClassifierTrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        val_data=val_data,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        weight_decay=args.weight_decay,
        anneal_lr=args.anneal_lr,
        iterations=args.iterations,
        noised=args.noised,
        schedule_sampler=schedule_sampler,
        resume_checkpoint=args.resume_checkpoint,
        log_interval=args.log_interval,
        eval_interval=args.eval_interval,
        save_interval=args.save_interval,
        use_fp16=args.classifier_use_fp16,
        seed=args.seed,
    ).run_loop()


def create_argparser() -> argparse.ArgumentParser:
    defaults = dict(
        data_dir="",
        val_data_dir="",
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
    defaults.update(classifier_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__)
    add_dict_to_argparser(parser, defaults)
    set_flag_help(parser, CLASSIFIER_FLAG_HELP)
    return parser


if __name__ == "__main__":
    run_cli(main)

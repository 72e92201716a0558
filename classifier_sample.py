"""
Like image_sample.py, but use a noisy image classifier to guide the sampling process towards more realistic
images (classifier guidance: DDPM, or DDIM with --use_ddim True --timestep_respacing ddim25).
"""

import argparse

from guided_diffusion import dist_util, guidance, logger, model_loading, sampling, samplers
from guided_diffusion.errors import InputCheck, run_cli
from guided_diffusion.flag_help import attach_flag_help
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    classifier_defaults,
    model_and_diffusion_defaults,
)


def main():
    args = create_argparser().parse_args()
    check = InputCheck()
    sampling.check_sampling_flags(check, args)
    classes = check(model_loading.trained_classes, args.model_path, args.num_classes)
    fixed = check(model_loading.parse_class_labels, args.class_labels, classes or args.num_classes)
    interval = check(guidance.parse_guidance_interval, args.guidance_interval, args.diffusion_steps)
    check(model_loading.require_file, args.model_path, what="diffusion model", flag="--model_path")
    check(model_loading.require_file, args.classifier_path, what="classifier", flag="--classifier_path")
    check.done()

    dist_util.setup_dist()
    logger.configure()

    logger.log("creating model and diffusion...")
    model, diffusion = model_loading.load_model_and_diffusion(
        args, model_and_diffusion_defaults().keys(), model_path=args.model_path
    )

    logger.log("loading classifier...")
    classifier = model_loading.load_classifier(args)
    cond_fn = guidance.classifier_cond_fn(classifier, args.classifier_scale, interval=interval,
                                          timestep_scale=guidance.timestep_scale(args))

    def model_fn(x, t, y=None):
        assert y is not None
        return model(x, t, y if args.class_cond else None)

    logger.log(classes.describe())
    logger.log("sampling...")
    sample_batch = sampling.make_diffusion_sampler(
        diffusion, model_fn, image_size=args.image_size, batch_size=args.batch_size, seed=args.seed,
        sampler=samplers.choice_from_args(args), clip_denoised=args.clip_denoised,
        cond_fn=cond_fn, num_classes=classes.count, fixed_labels=fixed,
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
        classifier_path="",
        classifier_scale=1.0,
        guidance_interval="",
        seed=0,
        class_labels="",
    )
    defaults.update(model_and_diffusion_defaults())
    defaults.update(classifier_defaults())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dict_to_argparser(parser, defaults)
    attach_flag_help(parser, {"class_labels": "comma-separated class ids (or class names of classes.json beside "
                                              "--model_path) to guide towards, used in turn (e.g. 207 or 1,2,3); "
                                              "empty: a random class per sample",
                              "num_classes": "classes of the diffusion model's label table and of the classifier's "
                                             "output (1000: ImageNet, the released models)"})
    return parser


if __name__ == "__main__":
    run_cli(main)

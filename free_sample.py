"""
Sample with classifier-free guidance: eps = (1 + w) * eps_cond - w * eps_uncond on the noise prediction (the
learned variance comes from the conditional prediction). Two ways to give the models:

  (a) --cmodel_path COND.pt --ucmodel_path UNCOND.pt: a class-conditional and an unconditional model with the same
      architecture flags, e.g. the released 256x256_diffusion.pt and 256x256_diffusion_uncond.pt (the conditional
      one is built with --class_cond True, the unconditional one with --class_cond False, whatever --class_cond says);
  (b) --model_path MODEL.pt: one model trained by free_train.py, whose label table has --num_classes + 1 rows; the
      last row is the null label used for the unconditional prediction. Flags not given on the command line take
      free_train.py's defaults (script_util.free_model_and_diffusion_defaults) in this mode.
"""

import argparse

from guided_diffusion import dist_util, logger, model_loading, sampling, samplers
from guided_diffusion.errors import InputCheck, run_cli
from guided_diffusion.flag_help import attach_flag_help
from guided_diffusion import guidance
from guided_diffusion.guidance import ClassifierFreeGuidance
from guided_diffusion.script_util import (
    add_dict_to_argparser,
    free_model_and_diffusion_defaults,
    model_and_diffusion_defaults,
)


def main():
    args = create_argparser().parse_args()
    if args.model_path:
        args = create_argparser(free_defaults=True).parse_args()  # mode (b): free_train.py's defaults

    check = InputCheck()
    sampling.check_sampling_flags(check, args)
    if args.model_path:
        if args.cmodel_path or args.ucmodel_path:
            check.problem("give either --model_path (a free_train.py model) or --cmodel_path with --ucmodel_path "
                          "(two models), not both")
        check(model_loading.require_file, args.model_path, what="free_train.py model", flag="--model_path")
        classes = check(model_loading.trained_classes, args.model_path, args.num_classes)
    else:
        if not (args.cmodel_path and args.ucmodel_path):
            check.problem("classifier-free sampling needs --cmodel_path (class-conditional model) and "
                          "--ucmodel_path (unconditional model), or --model_path (a model trained by "
                          "free_train.py)")
        classes = check(model_loading.trained_classes, args.cmodel_path, args.num_classes, "--cmodel_path")
        for flag, path, what in (("--cmodel_path", args.cmodel_path, "class-conditional model"),
                                 ("--ucmodel_path", args.ucmodel_path, "unconditional model")):
            if path:
                check(model_loading.require_file, path, what=what, flag=flag)
    fixed = check(model_loading.parse_class_labels, args.class_labels, classes or args.num_classes)
    interval = check(guidance.parse_guidance_interval, args.guidance_interval, args.diffusion_steps)
    if not 0.0 <= args.guidance_rescale <= 1.0:
        check.problem("--guidance_rescale %g: give a factor in [0, 1] (0: off; diffusers suggests 0.7)"
                      % args.guidance_rescale)
    check.done()

    dist_util.setup_dist()
    logger.configure()

    keys = model_and_diffusion_defaults().keys()
    cfg_options = dict(interval=interval, rescale=args.guidance_rescale, timestep_scale=guidance.timestep_scale(args))
    logger.log("creating model and diffusion...")
    if args.model_path:
        model, diffusion = model_loading.load_model_and_diffusion(
            args, keys, model_path=args.model_path, class_cond=True, num_classes=args.num_classes + 1
        )
        guided = ClassifierFreeGuidance(model, args.w, null_label=args.num_classes)
    else:
        cmodel, diffusion = model_loading.load_model_and_diffusion(
            args, keys, model_path=args.cmodel_path, flag="--cmodel_path", class_cond=True
        )
        ucmodel, _ = model_loading.load_model_and_diffusion(
            args, keys, model_path=args.ucmodel_path, flag="--ucmodel_path", class_cond=False
        )
        guided = ClassifierFreeGuidance(cmodel, args.w, uncond_model=ucmodel, **cfg_options)

    logger.log(classes.describe())
    logger.log("sampling with guidance weight w=%g..." % args.w)
    sample_batch = sampling.make_diffusion_sampler(
        diffusion, guided, image_size=args.image_size, batch_size=args.batch_size, seed=args.seed,
        sampler=samplers.choice_from_args(args), clip_denoised=args.clip_denoised,
        num_classes=classes.count, fixed_labels=fixed,
    )
    sampling.generate_samples(
        sample_batch, num_samples=args.num_samples, batch_size=args.batch_size, out_dir=logger.get_dir(),
        image_shape=(args.image_size, args.image_size, 3), run_config=sampling.sampling_run_config(args),
    )
    logger.log("sampling complete")


def create_argparser(free_defaults: bool = False):
    defaults = dict(
        clip_denoised=True,
        num_samples=10000,
        batch_size=16,
        use_ddim=False,
        sampler="",
        unipc_order=2,
        unipc_variant="bh2",
        cmodel_path="",
        ucmodel_path="",
        model_path="",
        w=3.0,
        guidance_interval="",
        guidance_rescale=0.0,
        seed=0,
        class_labels="",
    )
    defaults.update(free_model_and_diffusion_defaults() if free_defaults else model_and_diffusion_defaults())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dict_to_argparser(parser, defaults)
    attach_flag_help(parser, {
        "model_path": "mode (b): a model trained by free_train.py (null label = --num_classes)",
        "num_classes": "mode (b): number of real classes of the free_train.py model (its label table has one more "
                       "row, the null label; default 10); mode (a): rows of the conditional model's label table "
                       "(default 1000, the released models). Labels are drawn from classes.json beside the "
                       "checkpoint when present, else from 0..N-1",
        "class_cond": "ignored: the conditional model is always class-conditional, the unconditional one not",
    })
    return parser


if __name__ == "__main__":
    run_cli(main)

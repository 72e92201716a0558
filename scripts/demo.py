"""
The whole pipeline offline on the CPU in a few minutes: class-conditional MNIST digits from the small checkpoints in
scripts/demo/, one row per digit, sampled four ways (unguided with the null label, conditional, classifier-free
guidance, classifier guidance), each with DDIM and with the fast samplers (DPM-Solver++ and UniPC, 10 model calls).
Writes the .npz files and PNG grids under --out_dir and prints, per run, how often the classifier (at t = 0) sees the
requested digit, the colour spread |R-G|, |G-B| and the brightness of the 3-pixel border (the data: gray digits on
black, so both are 0 there), then the accuracies of every sampler side by side.
See scripts/demo/README.md for the data and how the checkpoints were trained.
"""

import argparse
import os
import sys
import time

DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
sys.path[:0] = [DEMO_DIR, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]

import guided_diffusion  # noqa: F401,E402  (prepares Jittor's environment before Jittor is imported)
from guided_diffusion import guidance, logger, model_loading, sampling, samplers  # noqa: E402
from guided_diffusion.errors import InputCheck, run_cli  # noqa: E402

import digits  # noqa: E402  (scripts/demo/digits.py)


def main() -> None:
    args = create_argparser().parse_args()
    check = InputCheck()
    if args.num_per_class < 1:
        check.problem("--num_per_class must be at least 1 (got %d)" % args.num_per_class)
    flags = digits.DEMO_MODEL_FLAGS
    for respacing in (args.timestep_respacing, args.fast_respacing if args.fast_sampler != "none" else "",
                      args.unipc_respacing if args.unipc_respacing != "none" else ""):
        check(model_loading.check_respacing, respacing, flags["diffusion_steps"],
              noise_schedule=flags["noise_schedule"])
    unipc = check(samplers.sampler_choice, "unipc", unipc_order=args.unipc_order, unipc_variant=args.unipc_variant)
    for flag, path in (("--model_path", args.model_path), ("--classifier_path", args.classifier_path)):
        if not os.path.isfile(path):
            check.problem("%s %s: file not found; the demo checkpoints ship in scripts/demo/ (restore them with "
                          "git), or train them as scripts/demo/README.md shows" % (flag, path))
    check.done()
    start = time.time()
    os.makedirs(args.out_dir, exist_ok=True)
    logger.configure(dir=args.out_dir, format_strs=["stdout", "log"])

    logger.log("loading the demo model and classifier...")
    model, diffusion, classifier = digits.load_demo_models(
        args.model_path, args.classifier_path, args.timestep_respacing)
    walks = [(samplers.sampler_choice("ddim"), args.timestep_respacing, diffusion, "")]
    for name, respacing in ((args.fast_sampler, args.fast_respacing), ("unipc", args.unipc_respacing)):
        if name != "none" and respacing != "none":
            choice = unipc if name == "unipc" else samplers.sampler_choice(name)
            walks.append((choice, respacing, digits.demo_diffusion(respacing),
                          "-%s-%s" % (choice.label(), respacing)))
    null = digits.NUM_DIGITS
    unconditional = digits.NullLabelModel(model, null)
    runs = [
        ("unguided", "unguided (null label, random digits)", unconditional, None),
        ("conditional", "conditional, no guidance (w=0)", model, None),
        ("cfg", "classifier-free guidance (w=%g)" % args.w,
         guidance.ClassifierFreeGuidance(model, args.w, null_label=null), None),
        ("classifier", "classifier guidance (scale %g, null label)" % args.classifier_scale, unconditional,
         guidance.classifier_cond_fn(classifier, args.classifier_scale)),
    ]
    labels = [d for d in range(digits.NUM_DIGITS) for _ in range(args.num_per_class)]
    n = len(labels)
    size = digits.DIGIT_IMAGE_SIZE
    figures = {}
    for sampler, respacing, sampler_diffusion, suffix in walks:
        for name, title, model_fn, cond_fn in runs:
            logger.log("sampling %d digits with %s %s: %s..." % (n, sampler.label(), respacing, title))
            sample_batch = sampling.make_diffusion_sampler(
                sampler_diffusion, model_fn, image_size=size, batch_size=n, seed=args.seed, sampler=sampler,
                cond_fn=cond_fn, num_classes=digits.NUM_DIGITS, fixed_labels=labels)
            run_config = dict(vars(args), run=name, sampler=sampler.label(), respacing=respacing)
            npz = sampling.generate_samples(
                sample_batch, num_samples=n, batch_size=n, out_dir=os.path.join(args.out_dir, name + suffix),
                image_shape=(size, size, 3), desc=name + suffix, run_config=run_config)
            grid = os.path.join(args.out_dir, "grid_%s%s.png" % (name, suffix))
            digits.save_digit_grid(npz, grid, args.num_per_class)
            logger.log("  %s\n  %s" % (npz, grid))
            figures[(sampler.label(), respacing, name)] = digits.sample_figures(classifier, npz)
    print_report(args, walks, runs, figures, n)
    print("\ndemo done in %.0f s; results in %s" % (time.time() - start, args.out_dir))


def print_report(args, walks, runs, figures, n: int) -> None:
    """The check of every run: accuracy (classifier at t = 0 sees the requested digit), colour spread, border; then
    the accuracies of all samplers side by side."""
    print("\nper run: accuracy = fraction of samples the classifier (at t = 0) assigns to the requested digit "
          "(chance 0.10);\nspread = mean |R-G|, |G-B| and border = mean of the 3-pixel frame, in uint8 levels "
          "(the data: 0 and 0). One row per digit 0-9, %d per row." % args.num_per_class)
    columns = [(sampler.label(), respacing) for sampler, respacing, _, _ in walks]
    for label, respacing in columns:
        print("\n%s %s:" % (label, respacing))
        for name, title, _, _ in runs:
            f = figures[(label, respacing, name)]
            print("  accuracy %-46s %.2f (%d/%d)  spread %5.1f  border %5.1f"
                  % (title + ":", f["accuracy"], round(f["accuracy"] * n), n, f["spread"], f["border"]))
    print("\nside by side (accuracy / spread / border):")
    print("  %-12s" % "run" + "".join("  %-22s" % ("%s %s" % c) for c in columns))
    for name, _, _, _ in runs:
        cells = ["%.2f / %.1f / %.1f" % tuple(figures[c + (name,)][k] for k in ("accuracy", "spread", "border"))
                 for c in columns]
        print("  %-12s" % name + "".join("  %-22s" % cell for cell in cells))


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out_dir", default="results/demo", help="where the .npz files and PNG grids go")
    parser.add_argument("--num_per_class", type=int, default=10, help="samples per digit (one grid row per digit)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the initial noise")
    parser.add_argument("--timestep_respacing", default="ddim25", help="DDIM steps, ddimN")
    parser.add_argument("--fast_sampler", default="dpm++2m",
                        choices=[s for s in samplers.SAMPLER_NAMES if s not in ("ddpm", "unipc")] + ["none"],
                        help="the second sampler every run also uses (none: skip it)")
    parser.add_argument("--fast_respacing", default="ddim10",
                        help="the second sampler's steps: DDIM's even stride, which stays clear of the cosine "
                             "schedule's last timesteps (alpha_bar ~ 2e-9 at t = 999, where classifier guidance's "
                             "x_0 correction is amplified ~2e4-fold; a logsnrN grid starts there)")
    parser.add_argument("--unipc_respacing", default="logsnr10@990",
                        help="the UniPC row's steps: 10 model calls on the log-SNR grid from t = 990 (it leaves out "
                             "the cosine schedule's last nine steps, where log-SNR falls from -4.3 to -9.9; there "
                             "UniPC kept classifier guidance best, bench/RESULTS.md); none: skip the row")
    parser.add_argument("--unipc_order", type=int, default=1,
                        help="the UniPC row's predictor order (1-3; the corrector adds one): 1 kept classifier "
                             "guidance best at 10 calls (bench/RESULTS.md); the scripts' default is 2, as diffusers")
    parser.add_argument("--unipc_variant", default="bh2", help="the UniPC row's B(h): bh1 or bh2")
    parser.add_argument("--w", type=float, default=3.0,
                        help="classifier-free guidance weight: eps = (1 + w) eps(x, y) - w eps(x, null)")
    parser.add_argument("--classifier_scale", type=float, default=10.0,
                        help="classifier guidance: the gradient of log p(y | x_t) is multiplied by this")
    parser.add_argument("--model_path", default=os.path.join(DEMO_DIR, "free_digits.pt"),
                        help="the demo's classifier-free diffusion model (EMA weights, float16)")
    parser.add_argument("--classifier_path", default=os.path.join(DEMO_DIR, "classifier_digits.pt"),
                        help="the demo's noisy classifier (float16)")
    return parser


if __name__ == "__main__":
    run_cli(main)

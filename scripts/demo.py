"""
The whole pipeline offline on the CPU in a few minutes: class-conditional MNIST digits from the small checkpoints in
scripts/demo/, sampled with DDIM, one row per digit, unguided (null label), with classifier-free guidance and with
classifier guidance. Writes the .npz files and PNG grids under --out_dir and prints how often the classifier (at
t = 0) sees the requested digit. See scripts/demo/README.md for the data and how the checkpoints were trained.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import digits, guidance, logger, sampling  # noqa: E402
from guided_diffusion.errors import UserError, run_cli  # noqa: E402

DEMO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")


def main() -> None:
    args = create_argparser().parse_args()
    if args.num_per_class < 1:
        raise UserError("--num_per_class must be at least 1 (got %d)" % args.num_per_class)
    for flag, path in (("--model_path", args.model_path), ("--classifier_path", args.classifier_path)):
        if not os.path.isfile(path):
            raise UserError("%s %s: file not found; the demo checkpoints ship in scripts/demo/ (restore them with "
                            "git), or train them as scripts/demo/README.md shows" % (flag, path))
    start = time.time()
    os.makedirs(args.out_dir, exist_ok=True)
    logger.configure(dir=args.out_dir, format_strs=["stdout", "log"])

    logger.log("loading the demo model and classifier...")
    sampling.check_respacing(args.timestep_respacing, digits.DEMO_MODEL_FLAGS["diffusion_steps"], True)
    model, diffusion, classifier = digits.load_demo_models(
        args.model_path, args.classifier_path, args.timestep_respacing)
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
    results = []
    for name, title, model_fn, cond_fn in runs:
        logger.log("sampling %d digits: %s..." % (n, title))
        sample_batch = sampling.make_diffusion_sampler(
            diffusion, model_fn, image_size=digits.DIGIT_IMAGE_SIZE, batch_size=n, seed=args.seed, sampler="ddim",
            cond_fn=cond_fn, num_classes=digits.NUM_DIGITS, fixed_labels=labels)
        run_config = dict(vars(args), run=name)
        npz = sampling.generate_samples(
            sample_batch, num_samples=n, batch_size=n, out_dir=os.path.join(args.out_dir, name),
            image_shape=(digits.DIGIT_IMAGE_SIZE, digits.DIGIT_IMAGE_SIZE, 3), desc=name, run_config=run_config)
        grid = os.path.join(args.out_dir, "grid_%s.png" % name)
        digits.save_digit_grid(npz, grid, args.num_per_class)
        accuracy, _ = digits.guidance_accuracy(classifier, npz)
        results.append((title, npz, grid, accuracy))

    print("\nresults (one row per digit 0-9, %d per row; DDIM %s):" % (args.num_per_class, args.timestep_respacing))
    for title, npz, grid, _ in results:
        print("  %s:\n    %s\n    %s" % (title, npz, grid))
    print("\nguidance check: fraction of samples the classifier (at t = 0) assigns to the requested digit")
    for title, _, _, accuracy in results:
        print("  accuracy %-46s %.2f (%d/%d)" % (title + ":", accuracy, round(accuracy * n), n))
    print("\ndemo done in %.0f s; results in %s" % (time.time() - start, args.out_dir))


def create_argparser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out_dir", default="results/demo", help="where the .npz files and PNG grids go")
    parser.add_argument("--num_per_class", type=int, default=10, help="samples per digit (one grid row per digit)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the initial noise")
    parser.add_argument("--timestep_respacing", default="ddim25", help="DDIM steps, ddimN")
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

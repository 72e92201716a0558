"""Sampler accuracy against steps: DDIM, DPM-Solver++ 2M and 3M, UniPC on time-uniform and log-SNR grids.

`python bench/bench_samplers.py --part all` prints JSON lines:

* analytic: Gaussian data N(0.3, 0.5^2) under the linear schedule, whose exact noise prediction and ODE solution are
  known (tests/gaussian_data_model.py): RMSE against the exact ODE solution for 5, 10, 20 and 40 steps, and the
  fewest steps each sampler and grid needs to reach the error of DDIM with 50 time-uniform steps;
* demo: the demo's classifier-free digits model (scripts/demo/free_digits.pt, w = 3, cosine schedule);
* unet: the fixture UNet (tests/fixtures/guided_diffusion/unet64_cond.pt, 64x64, random weights, linear schedule);
* guided: the demo model with classifier guidance (scale 10, the null-label model) and with classifier-free
  guidance (w = 3), 10 digits of each class from a fixed x_T, for each sampler and grid at 5, 10, 15 and 25 model
  calls: the demo's accuracy, colour spread and border, and the RMSE to a DDIM-1000 solution from the same x_T.

For the two networks: RMSE of DDIM-10/25/50 and 2M/3M-10/15/20 against a 1000-step 3M solution of the same ODE
from a fixed x_T, on both grids, and the seconds per image of each walk. The networks' walks clip each x_0
prediction to [-1, 1] as sampling does (clip_denoised=True): unclipped, the x_0 predicted at T-1 of the cosine
schedule (alpha_bar = 2.4e-9) carries the noise prediction's error times 2e4 and the walks diverge. The analytic
walks are unclipped. A time-uniform grid of N steps is the spacing "N" (from T-1 to 0), a log-SNR grid "logsnrN",
DDIM's stride "ddimN" (from T - T/N to 0; networks only).
"""

import argparse
import functools
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # bench/, then the repository root
from timing import emit  # noqa: E402

import jittor as jt  # noqa: E402
import numpy as np  # noqa: E402

from guided_diffusion import guidance, samplers, script_util  # noqa: E402
from guided_diffusion.image_grid import to_uint8_images  # noqa: E402
from guided_diffusion import gaussian_diffusion as gd  # noqa: E402
from guided_diffusion.checkpoint import load_file  # noqa: E402
from guided_diffusion.state_dicts import load_state_dict_strict  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "demo"))
import digits  # noqa: E402  (scripts/demo/digits.py)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from gaussian_data_model import GaussianDataModel  # noqa: E402  (tests/gaussian_data_model.py, a test double)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLERS = {"ddim": samplers.sampler_choice("ddim"), "2M": samplers.sampler_choice("dpm++2m"),
            "3M": samplers.sampler_choice("dpm++3m"),
            "unipc1-bh2": samplers.sampler_choice("unipc", unipc_order=1, unipc_variant="bh2"),
            "unipc2-bh1": samplers.sampler_choice("unipc", unipc_order=2, unipc_variant="bh1"),
            "unipc2-bh2": samplers.sampler_choice("unipc", unipc_order=2, unipc_variant="bh2"),
            "unipc3-bh1": samplers.sampler_choice("unipc", unipc_order=3, unipc_variant="bh1"),
            "unipc3-bh2": samplers.sampler_choice("unipc", unipc_order=3, unipc_variant="bh2")}
NETWORK_SAMPLERS = ("ddim", "2M", "3M", "unipc2-bh2", "unipc3-bh2")
GRIDS = {"uniform": "%d", "logsnr": "logsnr%d"}
# The networks also run on DDIM's even stride (range(0, T, T // N): it does not reach T-1, where the cosine
# schedule's alpha_bar is 2.4e-9).
NETWORK_GRIDS = dict(GRIDS, stride="ddim%d")
# The guided runs (the cosine-schedule demo model) also on the log-SNR grid from t = 990, which leaves out that
# schedule's last nine steps, where its log-SNR falls from -4.3 to -9.9.
GUIDED_GRIDS = dict(NETWORK_GRIDS, logsnr990="logsnr%d@990")


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    """Root-mean-square difference, in float64."""
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def walk(diffusion_flags: dict, spacing: str, model, noise: np.ndarray, sampler, model_kwargs=None,
         clip_denoised: bool = False, cond_fn=None):
    """One walk of a sampler (a name or samplers.SamplerChoice) on a spacing; (final sample, wall seconds)."""
    diffusion = script_util.create_gaussian_diffusion(**diffusion_flags, timestep_respacing=spacing)
    start = time.perf_counter()
    with jt.no_grad():
        out = samplers.run_sampler(diffusion, model, list(noise.shape), sampler, noise=jt.array(noise),
                                   clip_denoised=clip_denoised, model_kwargs=model_kwargs, cond_fn=cond_fn)
        result = out.numpy()
    return result, time.perf_counter() - start


def bench_analytic(args) -> None:
    for schedule in args.schedules.split(","):
        bench_analytic_schedule(schedule)


def bench_analytic_schedule(schedule: str) -> None:
    flags = dict(steps=1000, noise_schedule=schedule)
    model = GaussianDataModel(gd.get_named_beta_schedule(schedule, 1000), mu=0.3, std=0.5)
    noise = np.random.RandomState(0).randn(4, 3, 8, 8).astype(np.float32)
    # The exact ODE down to timestep 0, then the last step every walk takes to the clean image (x_0 = D(x)).
    exact = model.data_prediction(model.ode_solution(noise, 999, 0), 0)
    fine, _ = walk(flags, "1000", model, noise, "dpm++3m")
    emit(dict(bench="samplers_analytic", schedule=schedule, reference="exact ODE", check="3M-1000",
              rmse=rmse(fine, exact)))
    errors = {}

    def error(sampler, grid, n):
        if (sampler, grid, n) not in errors:
            out, _ = walk(flags, GRIDS[grid] % n, model, noise, SAMPLERS[sampler])
            errors[sampler, grid, n] = rmse(out, exact)
        return errors[sampler, grid, n]

    for grid in GRIDS:
        for sampler in SAMPLERS:
            emit(dict(bench="samplers_analytic", schedule=schedule, grid=grid, sampler=sampler,
                      rmse={n: float("%.4g" % error(sampler, grid, n)) for n in (5, 10, 20, 40)}))
    target = error("ddim", "uniform", 50)
    for grid in GRIDS:
        for sampler in SAMPLERS:
            # The fewest steps from which on (up to 50) the error stays at or below DDIM-50's.
            needed = None
            for n in range(50, 1, -1):
                if error(sampler, grid, n) > target:
                    break
                needed = n
            emit(dict(bench="samplers_analytic_steps_to_ddim50", schedule=schedule,
                      target_rmse=float("%.4g" % target), grid=grid, sampler=sampler, steps=needed))


def bench_network(name: str, model, diffusion_flags: dict, noise: np.ndarray, model_kwargs: dict, args) -> None:
    batch = noise.shape[0]
    run = functools.partial(walk, diffusion_flags, model=model, noise=noise, model_kwargs=model_kwargs,
                            clip_denoised=True)
    for sampler in NETWORK_SAMPLERS:  # every order: every kernel is compiled before anything is timed
        run("6", sampler=SAMPLERS[sampler])
    reference, seconds = run(str(args.reference_steps), sampler="dpm++3m")
    scale = float(np.sqrt(np.mean(reference.astype(np.float64) ** 2)))
    ddim_reference, ddim_seconds = run(str(args.reference_steps), sampler="ddim")
    emit(dict(bench="samplers_" + name, reference="3M-%d" % args.reference_steps, reference_rms=round(scale, 4),
              s_per_image=round(seconds / batch, 4), check="ddim-%d" % args.reference_steps,
              check_rmse=float("%.4g" % rmse(ddim_reference, reference)),
              check_s_per_image=round(ddim_seconds / batch, 4), load1=round(os.getloadavg()[0], 2)))
    runs = [("ddim", n) for n in (10, 25, 50)] + [(s, n) for s in NETWORK_SAMPLERS[1:] for n in (10, 15, 20)]
    for grid in NETWORK_GRIDS:
        for sampler, n in runs:
            out, seconds = run(NETWORK_GRIDS[grid] % n, sampler=SAMPLERS[sampler])
            err = rmse(out, reference)
            emit(dict(bench="samplers_" + name, grid=grid, sampler=sampler, steps=n, rmse=float("%.4g" % err),
                      relative_rmse=float("%.4g" % (err / scale)), s_per_image=round(seconds / batch, 4),
                      load1=round(os.getloadavg()[0], 2)))


def bench_demo(args) -> None:
    model, _, _ = digits.load_demo_models(os.path.join(ROOT, "scripts", "demo", "free_digits.pt"),
                                          os.path.join(ROOT, "scripts", "demo", "classifier_digits.pt"), "")
    flags = dict(script_util.model_and_diffusion_defaults(), **digits.DEMO_MODEL_FLAGS)
    diffusion_flags = dict(steps=flags["diffusion_steps"], learn_sigma=flags["learn_sigma"],
                           noise_schedule=flags["noise_schedule"], predict_xstart=flags["predict_xstart"])
    guided = guidance.ClassifierFreeGuidance(model, 3.0, null_label=digits.NUM_DIGITS)
    size = digits.DIGIT_IMAGE_SIZE
    noise = np.random.RandomState(0).randn(args.batch, 3, size, size).astype(np.float32)
    labels = jt.array(np.arange(args.batch, dtype=np.int32) % digits.NUM_DIGITS)
    bench_network("demo_cfg_w3", guided, diffusion_flags, noise, {"y": labels}, args)


def bench_unet(args) -> None:
    fixtures = os.path.join(ROOT, "tests", "fixtures", "guided_diffusion")
    with open(os.path.join(fixtures, "unet64_cond_flags.json")) as f:
        flags = json.load(f)
    model, _ = script_util.create_model_and_diffusion(**flags)
    load_state_dict_strict(model, load_file(os.path.join(fixtures, "unet64_cond.pt")))
    model.eval()
    diffusion_flags = dict(steps=flags["diffusion_steps"], learn_sigma=flags["learn_sigma"],
                           noise_schedule=flags["noise_schedule"])
    noise = np.random.RandomState(0).randn(2, 3, 64, 64).astype(np.float32)
    bench_network("fixture_unet64", model, diffusion_flags, noise, {"y": jt.array(np.array([3, 999], np.int32))},
                  args)


#: The guided runs: (label, sampler, grid) at each number of model calls.
GUIDED_RUNS = [(s, s, g) for g in ("stride", "logsnr") for s in ("ddim", "2M", "unipc1-bh2", "unipc2-bh2",
                                                                   "unipc3-bh2", "unipc2-bh1")] + [
    ("unipc2-bh2", "unipc2-bh2", "uniform")] + [(s, s, "logsnr990") for s in ("2M", "unipc1-bh2", "unipc2-bh2")]


def bench_guided(args) -> None:
    model, _, classifier = digits.load_demo_models(os.path.join(ROOT, "scripts", "demo", "free_digits.pt"),
                                                   os.path.join(ROOT, "scripts", "demo", "classifier_digits.pt"), "")
    flags = dict(script_util.model_and_diffusion_defaults(), **digits.DEMO_MODEL_FLAGS)
    diffusion_flags = dict(steps=flags["diffusion_steps"], learn_sigma=flags["learn_sigma"],
                           noise_schedule=flags["noise_schedule"], predict_xstart=flags["predict_xstart"])
    null = digits.NUM_DIGITS
    size = digits.DIGIT_IMAGE_SIZE
    labels_np = np.repeat(np.arange(digits.NUM_DIGITS), args.per_class)
    noise = np.random.RandomState(0).randn(len(labels_np), 3, size, size).astype(np.float32)
    kwargs = {"y": jt.array(labels_np.astype(np.int32))}
    modes = {
        "classifier": (digits.NullLabelModel(model, null), guidance.classifier_cond_fn(classifier, 10.0)),
        "cfg": (guidance.ClassifierFreeGuidance(model, 3.0, null_label=null), None),
    }
    calls = [int(c) for c in args.calls.split(",")]
    for mode in args.modes.split(","):
        model_fn, cond_fn = modes[mode]
        run = functools.partial(walk, diffusion_flags, model=model_fn, noise=noise, model_kwargs=kwargs,
                                clip_denoised=True, cond_fn=cond_fn)
        reference = None
        if args.reference_steps:
            cached = "%s/reference_%s_ddim%d_%dper_class.npy" % (args.reference_cache, mode, args.reference_steps,
                                                                 args.per_class) if args.reference_cache else ""
            if cached and os.path.exists(cached):
                reference = np.load(cached)
            else:
                reference = run(str(args.reference_steps), sampler="ddim")[0]
                if cached:
                    os.makedirs(args.reference_cache, exist_ok=True)
                    np.save(cached, reference)

        def figures(out):
            images = to_uint8_images(jt.array(out))
            preds = digits.classify_images(classifier, images)
            return dict(accuracy=float(np.mean(preds == labels_np)), spread=round(digits.colour_spread(images), 2),
                        border=round(digits.border_mean(images), 2),
                        rmse=None if reference is None else float("%.4g" % rmse(out, reference)))

        if reference is not None:
            emit(dict(bench="samplers_guided", mode=mode, sampler="ddim", grid="uniform",
                      calls=args.reference_steps, **figures(reference)))
        for label, sampler, grid in GUIDED_RUNS if args.runs == "all" else [
                r for r in GUIDED_RUNS if "%s@%s" % (r[0], r[2]) in args.runs.split(",")]:
            for n in calls:
                out, seconds = run(GUIDED_GRIDS[grid] % n, sampler=SAMPLERS[sampler])
                emit(dict(bench="samplers_guided", mode=mode, sampler=label, grid=grid, calls=n,
                          s_per_image=round(seconds / len(labels_np), 4), **figures(out)))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="all", choices=["analytic", "demo", "unet", "guided", "all"])
    parser.add_argument("--schedules", default="linear,cosine", help="analytic part: the noise schedules")
    parser.add_argument("--calls", default="5,10,15,25", help="guided part: the numbers of model calls")
    parser.add_argument("--modes", default="classifier,cfg", help="guided part: classifier and/or cfg")
    parser.add_argument("--per_class", type=int, default=10, help="guided part: digits per class")
    parser.add_argument("--runs", default="all", help="guided part: all, or sampler@grid labels, e.g. ddim@stride")
    parser.add_argument("--batch", type=int, default=4, help="images per walk for the demo model")
    parser.add_argument("--reference_steps", type=int, default=1000,
                        help="steps of the reference solution (guided part: DDIM; 0 skips it)")
    parser.add_argument("--reference_cache", default="",
                        help="guided part: a folder where the DDIM reference of each mode is saved and reused "
                             "(the same x_T and digits per class; empty: always recomputed)")
    args = parser.parse_args()
    jt.set_global_seed(0)
    if args.part in ("analytic", "all"):
        bench_analytic(args)
    if args.part in ("demo", "all"):
        bench_demo(args)
    if args.part in ("unet", "all"):
        bench_unet(args)
    if args.part in ("guided", "all"):
        bench_guided(args)


if __name__ == "__main__":
    main()

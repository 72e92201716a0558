"""25-step DDIM sampling loop: `python bench/bench_ddim_loop.py --config small64 --batch 4`."""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # bench/, then the repository root
from timing import emit, measure  # noqa: E402

import jittor as jt  # noqa: E402
import numpy as np  # noqa: E402

from configs import flags  # noqa: E402
from guided_diffusion.script_util import create_model_and_diffusion  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="small64", choices=["adm64", "adm256", "small64"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    cfg = flags(args.config, timestep_respacing="ddim%d" % args.steps)
    model, diffusion = create_model_and_diffusion(**cfg)
    model.eval()
    size = cfg["image_size"]
    noise = jt.array(np.random.RandomState(0).randn(args.batch, 3, size, size).astype(np.float32))
    kwargs = {"y": jt.array(np.arange(args.batch, dtype=np.int32))} if cfg["class_cond"] else {}

    def loop():
        with jt.no_grad():
            return diffusion.ddim_sample_loop(model, (args.batch, 3, size, size), noise=noise,
                                              clip_denoised=True, model_kwargs=kwargs)

    result = measure(loop, args.repeats)
    result["images_per_s"] = round(args.batch / result["steady_median_s"], 4)
    emit(dict(bench="ddim_loop", config=args.config, batch=args.batch, steps=args.steps, **result))


if __name__ == "__main__":
    main()

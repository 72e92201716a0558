"""One training step (forward, backward, AdamW, EMA) of the small 64x64 ADM through TrainLoop.run_step:
`python bench/bench_train_step.py --config small64 --batch 8`."""

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # bench/, then the repository root
from timing import emit, measure  # noqa: E402

import jittor as jt  # noqa: E402
import numpy as np  # noqa: E402

from configs import flags  # noqa: E402
from guided_diffusion import logger  # noqa: E402
from guided_diffusion.script_util import create_model_and_diffusion  # noqa: E402
from guided_diffusion.train_util import TrainLoop  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="small64", choices=["adm64", "adm256", "small64"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = flags(args.config)
    jt.set_global_seed(0)
    with tempfile.TemporaryDirectory() as log_dir:
        logger.configure(dir=log_dir, format_strs=[])
        model, diffusion = create_model_and_diffusion(**cfg)
        size = cfg["image_size"]
        rng = np.random.RandomState(0)
        batch = rng.uniform(-1, 1, size=(args.batch, 3, size, size)).astype(np.float32)
        cond = {"y": rng.randint(0, 1000, size=(args.batch,)).astype(np.int64)} if cfg["class_cond"] else {}
        loop = TrainLoop(model=model, diffusion=diffusion, data=None, batch_size=args.batch, microbatch=-1,
                         lr=1e-4, ema_rate="0.9999", log_interval=10 ** 9, save_interval=10 ** 9,
                         resume_checkpoint="")

        def step():
            loop.run_step(batch, cond)
            loop.step += 1
            return None

        result = measure(step, args.repeats)
    emit(dict(bench="train_step", config=args.config, batch=args.batch, **result))


if __name__ == "__main__":
    main()

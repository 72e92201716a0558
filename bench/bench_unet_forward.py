"""UNet forward time: `python bench/bench_unet_forward.py --config adm64 --batch 4`."""

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
    parser.add_argument("--config", default="adm64", choices=["adm64", "adm256", "small64"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = flags(args.config)
    model, _ = create_model_and_diffusion(**cfg)
    model.eval()
    size = cfg["image_size"]
    rng = np.random.RandomState(0)
    x = jt.array(rng.randn(args.batch, 3, size, size).astype(np.float32))
    t = jt.array(rng.randint(0, 1000, size=(args.batch,)).astype(np.int32))
    y = jt.array(rng.randint(0, 1000, size=(args.batch,)).astype(np.int32)) if cfg["class_cond"] else None

    def forward():
        with jt.no_grad():
            return model(x, t, y=y)

    result = measure(forward, args.repeats)
    params = sum(int(np.prod(p.shape)) for p in model.parameters())
    emit(dict(bench="unet_forward", config=args.config, batch=args.batch, params=params, **result))


if __name__ == "__main__":
    main()

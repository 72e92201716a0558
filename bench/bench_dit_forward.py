"""DiT forward time: `python bench/bench_dit_forward.py --model DiT-XL/2 --batch 2` (32x32x4 latents)."""

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # bench/, then the repository root
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "DiT"))
from timing import emit, measure  # noqa: E402

import jittor as jt  # noqa: E402
import numpy as np  # noqa: E402

from models import DiT_models  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="DiT-XL/2", choices=list(DiT_models))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = DiT_models[args.model](input_size=args.latent)
    model.eval()
    rng = np.random.RandomState(0)
    x = jt.array(rng.randn(args.batch, 4, args.latent, args.latent).astype(np.float32))
    t = jt.array(rng.randint(0, 1000, size=(args.batch,)).astype(np.int32))
    y = jt.array(rng.randint(0, 1000, size=(args.batch,)).astype(np.int32))

    def forward():
        with jt.no_grad():
            return model(x, t, y)

    result = measure(forward, args.repeats)
    emit(dict(bench="dit_forward", model=args.model, batch=args.batch, latent=args.latent, **result))


if __name__ == "__main__":
    main()

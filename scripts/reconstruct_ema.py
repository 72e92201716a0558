"""
Post-hoc EMA: make the EMA of any relative std S from the power-function EMA snapshots a training run saved with
--ema_std (DiT: --ema-std), as EDM2 does (Karras et al. 2024, Algorithm 3), and write it as a model file that the
sampling scripts load with --model_path (DiT: --ckpt).

    python scripts/reconstruct_ema.py --log_dir $OPENAI_LOGDIR --std 0.08 --out ema_0.080.pt
    python scripts/reconstruct_ema.py --log_dir results/000-DiT-XL-2 --std 0.08 --step 400000 --out dit_0.080.pt

--log_dir is an ADM log directory or a DiT run folder (its checkpoints/ is searched). The snapshots of every std up
to --step (default: the newest step with snapshots) are combined.
"""

import argparse
import os
import sys

# Entry scripts outside the repository root put the root first on sys.path, so they run from any working
# directory.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from guided_diffusion import checkpoint  # noqa: E402
from guided_diffusion.errors import InputCheck, run_cli  # noqa: E402
from guided_diffusion.training.reconstruct import list_snapshots, reconstruct, select_snapshots  # noqa: E402


def create_argparser() -> argparse.ArgumentParser:
    """--log_dir, --std, --step, --out."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log_dir", required=True,
                        help="the run's log directory (ADM) or run folder (DiT) holding phema_<std>_<step>.pt files")
    parser.add_argument("--std", type=float, required=True,
                        help="relative standard deviation of the EMA to make, in (0, 0.28] (EDM2: 0.05-0.15 typical)")
    parser.add_argument("--step", type=int, default=None,
                        help="the training step to reconstruct at: one with snapshots (default: the newest)")
    parser.add_argument("--out", required=True, help="the model file to write (.pt, a plain state dict)")
    return parser


def main() -> None:
    args = create_argparser().parse_args()
    check = InputCheck()
    if not args.out.endswith(".pt"):
        check.problem("--out %s must end in .pt (the sampling scripts load .pt model files)" % args.out)
    snapshots = check(list_snapshots, args.log_dir)
    check.done()
    used, step = select_snapshots(snapshots, args.std, args.step)
    state_dict, coefficients = reconstruct(used, args.std, step)
    print("post-hoc EMA std %.3f at step %d from %d snapshots:" % (args.std, step, len(used)))
    for snapshot, coefficient in zip(used, coefficients):
        print("  %+.6f  %s" % (coefficient, snapshot.path))
    checkpoint.save_file(state_dict, args.out)
    print("wrote %s" % args.out)


if __name__ == "__main__":
    run_cli(main)

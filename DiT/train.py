"""
A minimal training script for DiT (DiT ``train.py``), in Jittor, runnable on one process or under mpirun.

Images from an ImageFolder-style tree (one sub-folder per class) are centre-cropped, randomly flipped, encoded by
the VAE into latents (a posterior sample x 0.18215), and the DiT learns them with the diffusion loss (AdamW, lr
1e-4, no weight decay, EMA 0.9999). Checkpoints {"model", "ema", "opt", "args"} are written every --ckpt-every
steps; --resume continues a run from one of them exactly where it stopped. --feature-path trains from the VAE
posteriors stored by extract_features.py instead (no VAE is run; the same data order, flips and noise).
"""

import argparse
import os
import sys
from time import time

# Entry scripts outside the repository root put the root first on sys.path, so they run from any working
# directory; DiT's put their own folder before it, for DiT's modules (models, diffusion, ...).
DIT_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [DIT_DIR, os.path.dirname(DIT_DIR)]

import guided_diffusion  # noqa: F401,E402  (prepares Jittor's environment before Jittor is imported)
import jittor as jt  # noqa: E402
import numpy as np  # noqa: E402

from guided_diffusion import dist_util, model_loading  # noqa: E402
from guided_diffusion.errors import InputCheck, run_cli  # noqa: E402
from guided_diffusion.image_datasets import BatchIterator  # noqa: E402
from guided_diffusion.nn import update_ema  # noqa: E402
from guided_diffusion.run_guard import RunGuard  # noqa: E402
from guided_diffusion.train_util import seeded_initialisation  # noqa: E402
from guided_diffusion.training.ema import MultiRateEMA, PowerFunctionEMA, parse_ema_stds  # noqa: E402
from guided_diffusion.training.loop import StepOutcome, TrainingLoop, stop_step  # noqa: E402
from guided_diffusion.training.optim import AdamW  # noqa: E402

import dit_util  # noqa: E402
import features  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from models import DiT_models  # noqa: E402


def create_argparser() -> argparse.ArgumentParser:
    """The reference's flags (with --batch-size as an alias of --global-batch-size), --vae-path and --resume."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-path", type=str, default=None,
                        help="training images, one sub-folder per class (e.g. ImageNet's train folder)")
    parser.add_argument("--feature-path", type=str, default=None,
                        help="train from the features extract_features.py stored (instead of --data-path; no VAE)")
    parser.add_argument("--results-dir", type=str, default="results",
                        help="each run gets a new NNN-model folder here (log.txt, checkpoints/)")
    parser.add_argument("--model", type=str, choices=list(DiT_models.keys()), default="DiT-XL/2",
                        help="DiT configuration to train")
    parser.add_argument("--image-size", type=int, default=256,
                        help="image size in pixels: 256 or 512 as released (any multiple of the VAE's "
                             "downsampling factor, e.g. for small CPU experiments)")
    parser.add_argument("--num-classes", type=int, default=1000, help="number of label classes of the model")
    features.add_class_flag(parser)
    parser.add_argument("--epochs", type=int, default=1400, help="passes over the data set")
    parser.add_argument("--global-batch-size", "--batch-size", dest="global_batch_size", type=int, default=256,
                        help="images per step over all processes")
    parser.add_argument("--global-seed", type=int, default=0, help="seed of the initial weights, data order, flips, noise and timesteps")
    dit_util.add_vae_flags(parser, default_vae="ema")
    parser.add_argument("--num-workers", type=int, default=4,
                        help="accepted for compatibility; images are decoded by one background thread")
    parser.add_argument("--log-every", type=int, default=100, help="log the mean loss every this many steps")
    parser.add_argument("--ckpt-every", type=int, default=50_000, help="write a checkpoint every this many steps")
    parser.add_argument("--resume", type=str, default=None,
                        help="continue from a checkpoint written by this script (.../checkpoints/XXXXXXX.pt)")
    parser.add_argument("--ema-std", type=str, default="",
                        help="post-hoc EMA: comma-separated relative stds (e.g. 0.05,0.1), one power-function EMA "
                             "each, saved as phema_<std>_<step>.pt with every checkpoint (empty: off)")
    parser.add_argument("--max-steps", type=int, default=0,
                        help="end after this many optimizer steps with a checkpoint (0: run all --epochs)")
    parser.add_argument("--preview-every", type=int, default=0,
                        help="every N steps write preview_NNNNNN.png into the experiment folder: EMA samples of "
                             "the first classes (a row each, at most 8) from fixed noise, UniPC on logsnr10, "
                             "decoded by the VAE; training is unchanged by it. 0: off")
    parser.add_argument("--finetune-from", type=str, default="", help="start at step 0 from this checkpoint's "
                        "weights; a label table of another class count is re-initialised (the log has a table)")
    parser.add_argument("--grad-checkpoint", action="store_true",
                        help="recompute each DiT block in the backward pass: less memory, more time, same result")
    dit_util.add_model_override_flags(parser)
    return parser


def main() -> None:
    args = create_argparser().parse_args()
    dist_util.setup_dist()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    check = InputCheck()
    dit_util.check_training_flags(check, args, world)
    if args.feature_path and not args.data_path:
        features.check_feature_inputs(check, args)
    listing = check(dit_util.list_image_folder, args.data_path, args.class_from, args.num_classes) \
        if args.data_path else None
    needs_vae = not args.feature_path or args.preview_every > 0  # previews decode latents
    dit_util.check_inputs(check, args, vae=needs_vae)
    resume = args.resume or dit_util.find_run_to_continue(args)  # rerunning a command continues its run

    vae = dit_util.load_vae(args) if needs_vae else None
    dataset, latent_size, to_latents, num_classes = features.training_data(args, listing, vae)
    with seeded_initialisation(args.global_seed):
        model = dit_util.build_model(args, latent_size)
        ema = dit_util.build_model(args, latent_size)  # EMA of the model, used after training
    finetuned = (model_loading.finetune_from(model, args.finetune_from, flag="--finetune-from")
                 if args.finetune_from and not resume else None)
    dist_util.sync_params(model.parameters())
    update_ema(ema.parameters(), model.parameters(), rate=0)  # ema starts as a copy of the model
    opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    diffusion = create_diffusion(timestep_respacing="")  # default: 1000 steps, linear noise schedule

    # DistributedSampler's order: one permutation of the whole dataset per epoch, rank r takes every world-th image
    loader = BatchIterator(dataset, args.global_batch_size // world, shuffle=True, seed=args.global_seed,
                           rank=rank, world_size=world)

    guard = RunGuard(last_checkpoint=resume)
    emas = [MultiRateEMA(model.parameters(), [0.9999], averages=[list(ema.parameters())])]
    stds = parse_ema_stds(args.ema_std)
    power_emas = [PowerFunctionEMA(model.parameters(), stds)] if stds else []
    checkpoints = dit_util.training_checkpoints(None, args, guard)
    train_steps = dit_util.load_training_checkpoint(resume, model, ema, opt, power_emas, checkpoints) if resume else 0
    experiment_dir = dit_util.experiment_dir_for(args, train_steps, resume) if rank == 0 else None
    logger = dit_util.create_logger(experiment_dir)
    loader.warn = logger.warning
    guard.log = checkpoints.log = logger.info
    checkpoints.folder = os.path.join(experiment_dir, "checkpoints") if experiment_dir else None
    logger.info("Experiment directory created at %s" % experiment_dir)
    for line in (finetuned.table().split("\n") if finetuned else []):
        logger.info(line)
    if resume:
        logger.info("Resumed from %s at step %d%s" % (resume, train_steps, "" if args.resume else
                    " (the newest checkpoint of this command's run; pass --resume to choose another)"))
    logger.info("DiT Parameters: {:,}".format(sum(p.numel() for p in model.parameters())))
    logger.info("Dataset contains {:,} images ({}) in {} classes".format(
        len(dataset), args.feature_path or args.data_path, num_classes))
    features.record_classes(experiment_dir, logger.info, listing or dataset, args.num_classes)

    model.train()  # important! This enables embedding dropout for classifier-free guidance
    ema.eval()  # EMA model should always be in eval mode
    steps_per_epoch = loader.batches_per_epoch  # the same on every rank (the order is padded)
    loader.seek(train_steps)
    logged = dict(steps=0, loss=0.0, start=time(), epoch=-1)
    logger.info("Training for %d epochs..." % args.epochs)

    def step_fn(step: int) -> StepOutcome:
        if step // steps_per_epoch != logged["epoch"]:
            logged["epoch"] = step // steps_per_epoch
            logger.info("Beginning epoch %d..." % logged["epoch"])
        images, cond = next(loader)
        x = to_latents(images)  # the step's first random draw: a sample of the VAE posterior
        x.sync()  # drawn before t and the noise on either path (Jittor draws when an op executes)
        y = jt.array(cond["y"].astype(np.int32))
        t = jt.randint(0, diffusion.num_timesteps, (x.shape[0],), dtype="int32")
        loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
        opt.step(loss)
        return StepOutcome(True, {"loss": loss})

    def log(step: int, outcome: StepOutcome) -> None:
        logged["loss"] += float(outcome.losses["loss"].item())
        logged["steps"] += 1
        if (step + 1) % args.log_every == 0:
            steps_per_sec = logged["steps"] / (time() - logged["start"])
            avg_loss = float(dist_util.all_reduce_mean_array(np.array(logged["loss"] / logged["steps"])))
            bad = f", Skipped Images: {loader.bad_images}" if loader.bad_images else ""
            logger.info(f"(step={step + 1:07d}) Train Loss: {avg_loss:.4f}, "
                        f"Train Steps/Sec: {steps_per_sec:.2f}{bad}")
            logged.update(steps=0, loss=0.0, start=time())

    def save(step: int):
        weights = list(model.parameters()) + [v for e in emas + power_emas for v in e.vars()]
        path = checkpoints.save(step, lambda: dit_util.training_states(model, ema, opt, args, power_emas), weights)
        logger.info(f"Saved checkpoint to {path}")
        return path

    previews = [(args.preview_every, dit_util.training_preview(ema, vae, latent_size, num_classes, experiment_dir,
                                                               args.global_seed, logger.info))] \
        if args.preview_every else []
    TrainingLoop(seed=args.global_seed, guard=guard, emas=emas + power_emas, params=lambda: model.parameters(),
                 sync_vars=lambda: list(model.parameters()) + opt.param_groups[0]["m"] + opt.param_groups[0]["values"],
                 save=save, save_interval=args.ckpt_every, stop_at=stop_step(args.epochs * steps_per_epoch,
                                                                             args.max_steps),
                 log=log, periodic=previews).run(train_steps, step_fn)
    loader.close()
    model.eval()  # important! This disables randomized embedding dropout
    logger.info("Done!")


if __name__ == "__main__":
    run_cli(main)

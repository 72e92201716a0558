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

from guided_diffusion import dist_util  # noqa: E402
from guided_diffusion.errors import InputCheck, run_cli  # noqa: E402
from guided_diffusion.image_datasets import BatchIterator  # noqa: E402
from guided_diffusion.nn import update_ema  # noqa: E402
from guided_diffusion.run_guard import RunGuard  # noqa: E402
from guided_diffusion.train_util import AdamW, seed_training_step, seeded_initialisation  # noqa: E402

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
    parser.add_argument("--grad-checkpoint", action="store_true",
                        help="recompute each DiT block in the backward pass: less memory, more time, same result")
    dit_util.add_model_override_flags(parser)
    return parser


def main() -> None:
    args = create_argparser().parse_args()
    dist_util.setup_dist()
    rank, world = dist_util.get_rank(), dist_util.get_world_size()
    check = InputCheck()
    if args.global_batch_size < 1 or args.global_batch_size % world:
        check.problem("--global-batch-size %d must be a positive multiple of the number of processes %d"
                      % (args.global_batch_size, world))
    if args.log_every < 1 or args.ckpt_every < 1 or args.epochs < 1:
        check.problem("--log-every, --ckpt-every and --epochs must be at least 1")
    if args.resume and not os.path.isfile(args.resume):
        check.problem("--resume %s: file not found; give a checkpoint written by train.py "
                      "(results/NNN-model/checkpoints/XXXXXXX.pt)" % args.resume)
    if (args.data_path is None) == (args.feature_path is None):
        check.problem("give either --data-path (images) or --feature-path (features from extract_features.py)")
    elif args.feature_path:
        features.check_feature_inputs(check, args)
    listing = check(dit_util.list_image_folder, args.data_path, args.class_from, args.num_classes) \
        if args.data_path else None
    dit_util.check_inputs(check, args, vae=not args.feature_path)
    resume = args.resume or dit_util.find_run_to_continue(args)  # rerunning a command continues its run

    dataset, latent_size, to_latents, num_classes = features.training_data(args, listing)
    with seeded_initialisation(args.global_seed):
        model = dit_util.build_model(args, latent_size)
        ema = dit_util.build_model(args, latent_size)  # EMA of the model, used after training
    dist_util.sync_params(model.parameters())
    update_ema(ema.parameters(), model.parameters(), rate=0)  # ema starts as a copy of the model
    opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    diffusion = create_diffusion(timestep_respacing="")  # default: 1000 steps, linear noise schedule

    # DistributedSampler's order: one permutation of the whole dataset per epoch, rank r takes every world-th image
    loader = BatchIterator(dataset, args.global_batch_size // world, shuffle=True, seed=args.global_seed,
                           rank=rank, world_size=world)

    train_steps = dit_util.load_training_checkpoint(resume, model, ema, opt) if resume else 0
    experiment_dir = dit_util.experiment_dir_for(args, train_steps, resume) if rank == 0 else None
    logger = dit_util.create_logger(experiment_dir)
    loader.warn = logger.warning
    checkpoint_dir = os.path.join(experiment_dir, "checkpoints") if experiment_dir else None
    logger.info("Experiment directory created at %s" % experiment_dir)
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
    total_steps = args.epochs * steps_per_epoch
    loader.seek(train_steps)
    log_steps, running_loss, start_time, logged_epoch = 0, 0.0, time(), -1
    logger.info("Training for %d epochs..." % args.epochs)
    guard = RunGuard(log=logger.info, last_checkpoint=resume)
    with guard:
        while train_steps < total_steps:
            if train_steps // steps_per_epoch != logged_epoch:
                logged_epoch = train_steps // steps_per_epoch
                logger.info("Beginning epoch %d..." % logged_epoch)
            images, cond = next(loader)
            seed_training_step(args.global_seed, train_steps)
            x = to_latents(images)  # the step's first random draw: a sample of the VAE posterior
            x.sync()  # drawn before t and the noise on either path (Jittor draws when an op executes)
            y = jt.array(cond["y"].astype(np.int32))
            t = jt.randint(0, diffusion.num_timesteps, (x.shape[0],), dtype="int32")
            loss = diffusion.training_losses(model, x, t, dict(y=y))["loss"].mean()
            opt.step(loss)
            update_ema(ema.parameters(), model.parameters(), rate=0.9999)
            jt.sync(list(model.parameters()) + list(ema.parameters()) + opt.param_groups[0]["m"]
                    + opt.param_groups[0]["values"])

            loss_value = float(loss.item())
            running_loss += loss_value
            log_steps += 1
            train_steps += 1
            stop = guard.after_step(train_steps, {"loss": loss_value})
            if train_steps % args.log_every == 0:
                steps_per_sec = log_steps / (time() - start_time)
                avg_loss = float(dist_util.all_reduce_mean_array(np.array(running_loss / log_steps)))
                bad = f", Skipped Images: {loader.bad_images}" if loader.bad_images else ""
                logger.info(f"(step={train_steps:07d}) Train Loss: {avg_loss:.4f}, "
                            f"Train Steps/Sec: {steps_per_sec:.2f}{bad}")
                running_loss, log_steps, start_time = 0.0, 0, time()
            if train_steps % args.ckpt_every == 0 or stop or train_steps == total_steps:
                path = dit_util.save_training_checkpoint_on_main(checkpoint_dir, train_steps, model, ema, opt,
                                                                 args, guard)
                logger.info(f"Saved checkpoint to {path}")
            if stop:
                guard.exit_after_save(train_steps, path)
    loader.close()
    model.eval()  # important! This disables randomized embedding dropout
    logger.info("Done!")


if __name__ == "__main__":
    run_cli(main)

"""
Sample many images from a DiT for FID evaluation (DiT ``sample_ddp.py``), optionally across MPI ranks.

The batches go through the project's one sampling loop (guided_diffusion.sampling.generate_samples): finished
batches are kept as they complete, an interrupted run resumes, and the result is the evaluator's .npz (arr_0 uint8
NHWC images, arr_1 their class labels) in the reference's folder
``{sample-dir}/{model}-{ckpt}-size-{S}-vae-{vae}-cfg-{cfg}-seed-{seed}``, also linked as ``{that folder}.npz``.
Run with ``mpirun -np N python sample_ddp.py ...`` to split the batches between N processes.
"""

import argparse
import os
import sys

# Entry scripts outside the repository root put the root first on sys.path, so they run from any working
# directory; DiT's put their own folder before it, for DiT's modules (models, diffusion, ...).
DIT_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [DIT_DIR, os.path.dirname(DIT_DIR)]

import guided_diffusion  # noqa: F401,E402  (prepares Jittor's environment before Jittor is imported)
import jittor as jt  # noqa: E402
import numpy as np  # noqa: E402

from guided_diffusion import dist_util  # noqa: E402
from guided_diffusion.errors import InputCheck, run_cli  # noqa: E402
from guided_diffusion.model_loading import check_count  # noqa: E402
from guided_diffusion.sampling import generate_samples, run_diffusion, sampling_run_config, seed_batch  # noqa: E402

import dit_util  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from models import DiT_models  # noqa: E402


def create_argparser() -> argparse.ArgumentParser:
    """The reference's flags, plus --vae-path, --guide-all-channels and the model-size overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=str, choices=list(DiT_models.keys()), default="DiT-XL/2",
                        help="DiT configuration the checkpoint was trained with")
    dit_util.add_vae_flags(parser, default_vae="ema")
    parser.add_argument("--sample-dir", type=str, default="samples", help="parent folder of the results")
    parser.add_argument("--per-proc-batch-size", type=int, default=32, help="images per batch (per process)")
    parser.add_argument("--num-fid-samples", type=int, default=50_000, help="number of images to generate")
    parser.add_argument("--image-size", type=int, default=256,
                        help="image size in pixels: 256 or 512 for the released models (any multiple of the "
                             "VAE's downsampling factor for your own)")
    parser.add_argument("--num-classes", type=int, default=1000, help="number of classes the model was trained on")
    parser.add_argument("--cfg-scale", type=float, default=1.5,
                        help="classifier-free guidance scale (1.0 samples without guidance)")
    dit_util.add_sampler_flags(parser)
    parser.add_argument("--global-seed", type=int, default=0, help="seed; every batch seeds itself from it")
    parser.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                        help="accepted for compatibility; Jittor computes in float32 (no TF32 switch)")
    parser.add_argument("--ckpt", type=str, default=None,
                        help="DiT checkpoint (.pt: released or written by train.py); unset: the released "
                             "DiT-XL-2-{S}x{S}.pt, downloaded into ./pretrained_models")
    parser.add_argument("--guide-all-channels", action="store_true",
                        help="apply guidance to all 4 latent eps channels (the released code guides only the "
                             "first 3)")
    dit_util.add_model_override_flags(parser)
    return parser


def main() -> None:
    args = create_argparser().parse_args()
    check = InputCheck()
    if args.cfg_scale < 1.0:
        check.problem("--cfg-scale must be >= 1.0 (got %g); 1.0 disables guidance" % args.cfg_scale)
    dit_util.check_sampling_flags(check, args)
    classes = check(dit_util.trained_classes, args)  # labels are drawn from the classes the model was trained on
    check(check_count, args.per_proc_batch_size, "--per-proc-batch-size")
    check(check_count, args.num_fid_samples, "--num-fid-samples")
    dit_util.check_inputs(check, args, ckpt_flag="--ckpt")
    dist_util.setup_dist()
    using_cfg = args.cfg_scale > 1.0
    if dist_util.is_main_process():
        print(classes.describe())

    vae = dit_util.load_vae(args)
    latent_size = dit_util.latent_size_for(args.image_size, dit_util.vae_downsample_factor(vae))
    model = dit_util.build_model(args, latent_size)
    ckpt = dit_util.load_dit_checkpoint(model, args.ckpt, args)
    model.eval()  # important!
    diffusion = create_diffusion(dit_util.sampling_spacing(args))

    model_string_name = args.model.replace("/", "-")
    ckpt_string_name = os.path.basename(ckpt).replace(".pt", "") if args.ckpt else "pretrained"
    folder_name = "%s-%s-size-%d-vae-%s-cfg-%s-seed-%d" % (model_string_name, ckpt_string_name, args.image_size,
                                                         args.vae, args.cfg_scale, args.global_seed)
    sampler = dit_util.sampler_choice(args)
    if args.sampler != "ddpm":  # the reference's name stays the name of its DDPM samples
        folder_name += "-%s-%d" % (sampler.label(), args.num_sampling_steps)
    sample_folder_dir = os.path.join(args.sample_dir, folder_name)
    channels = model.in_channels

    def sample_batch(batch_index: int, n: int):
        rng = seed_batch(args.global_seed, batch_index)
        z = jt.randn(n, channels, latent_size, latent_size)  # noise first, then labels (as the reference)
        labels = rng.randint(0, classes.count, size=(n,)).astype(np.int64)
        y = jt.array(labels.astype(np.int32))
        if using_cfg:
            z = jt.concat([z, z], dim=0)
            y = jt.concat([y, jt.array(np.full((n,), args.num_classes, dtype=np.int32))], dim=0)
            model_kwargs = dict(y=y, **dit_util.cfg_kwargs(args))
            sample_fn = model.forward_with_cfg
        else:
            model_kwargs = dict(y=y)
            sample_fn = model.forward
        samples = run_diffusion(diffusion, sample_fn, z.shape, sampler=sampler, noise=z, clip_denoised=False,
                                model_kwargs=model_kwargs, progress=False)
        if using_cfg:
            samples = samples[:n]  # remove null class samples
        return dit_util.images_to_uint8_dit(dit_util.decode_latents(vae, samples)), labels

    run_config = {k: v for k, v in sampling_run_config(args).items() if k not in ("tf32",)}
    path = generate_samples(sample_batch, num_samples=args.num_fid_samples, batch_size=args.per_proc_batch_size,
                            out_dir=sample_folder_dir, image_shape=(args.image_size, args.image_size, 3),
                            desc="DiT sampling", run_config=run_config)
    if dist_util.is_main_process() and path:
        alias = sample_folder_dir + ".npz"  # the reference's output name
        if os.path.exists(alias) and not os.path.samefile(alias, path):
            print("note: %s exists from another run and was left alone; the samples are in %s" % (alias, path))
            alias = path
        elif not os.path.exists(alias):
            try:
                os.link(path, alias)
            except OSError:
                alias = path
        print("Saved .npz file to %s [shape=(%d, %d, %d, 3)]." % (alias, args.num_fid_samples, args.image_size,
                                                                   args.image_size))


if __name__ == "__main__":
    run_cli(main)

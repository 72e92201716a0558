"""
Sample new images from a pre-trained DiT (DiT ``sample.py``): 8 fixed ImageNet classes (or --class-labels) with
classifier-free guidance, decoded by the VAE and written as a grid of 4 columns to sample.png.
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

from guided_diffusion.errors import InputCheck, run_cli  # noqa: E402
from guided_diffusion.image_grid import save_image_grid  # noqa: E402
from guided_diffusion.sampling import run_diffusion  # noqa: E402
from guided_diffusion.seeding import seed_all  # noqa: E402

import dit_util  # noqa: E402
from diffusion import create_diffusion  # noqa: E402
from models import DiT_models  # noqa: E402


def create_argparser() -> argparse.ArgumentParser:
    """The reference's flags, plus --vae-path, --output and the model-size overrides."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=str, choices=list(DiT_models.keys()), default="DiT-XL/2",
                        help="DiT configuration the checkpoint was trained with")
    dit_util.add_vae_flags(parser, default_vae="mse")
    parser.add_argument("--image-size", type=int, default=256,
                        help="image size in pixels: 256 or 512 for the released models (any multiple of the "
                             "VAE's downsampling factor for your own)")
    parser.add_argument("--num-classes", type=int, default=1000, help="number of classes the model was trained on")
    parser.add_argument("--cfg-scale", type=float, default=4.0, help="classifier-free guidance scale")
    parser.add_argument("--class-labels", type=str, default="",
                        help="comma-separated class ids, or class names of the classes.json train.py wrote beside "
                             "the checkpoint; empty: the released script's 8 ImageNet classes (1000-class models), "
                             "else the model's classes in turn")
    dit_util.add_sampler_flags(parser)
    parser.add_argument("--seed", type=int, default=0, help="random seed of the initial noise")
    parser.add_argument("--ckpt", type=str, default=None,
                        help="DiT checkpoint (.pt: released or written by train.py); unset: the released "
                             "DiT-XL-2-{S}x{S}.pt, downloaded into ./pretrained_models")
    parser.add_argument("--guide-all-channels", action="store_true",
                        help="apply guidance to all 4 latent eps channels (the released code guides only the "
                             "first 3; keep off to reproduce its samples)")
    parser.add_argument("--output", type=str, default="sample.png", help="where to write the image grid")
    dit_util.add_model_override_flags(parser)
    return parser


def main() -> None:
    args = create_argparser().parse_args()
    check = InputCheck()
    classes = check(dit_util.trained_classes, args)
    class_labels = check(dit_util.sample_class_labels, args.class_labels, classes) if classes else None
    dit_util.check_sampling_flags(check, args)
    dit_util.check_inputs(check, args, ckpt_flag="--ckpt")

    vae = dit_util.load_vae(args)
    latent_size = dit_util.latent_size_for(args.image_size, dit_util.vae_downsample_factor(vae))
    model = dit_util.build_model(args, latent_size)
    dit_util.load_dit_checkpoint(model, args.ckpt, args)
    model.eval()  # important! (label dropout is on in training mode)
    diffusion = create_diffusion(dit_util.sampling_spacing(args))

    n = len(class_labels)
    seed_all(args.seed)  # the noise depends on --seed alone (drawn after the models are built and loaded)
    z = jt.randn(n, model.in_channels, latent_size, latent_size)
    y = jt.array(np.array(class_labels, dtype=np.int32))

    # Setup classifier-free guidance: the second half of the batch uses the null class.
    z = jt.concat([z, z], dim=0)
    y_null = jt.array(np.full((n,), args.num_classes, dtype=np.int32))
    y = jt.concat([y, y_null], dim=0)
    model_kwargs = dict(y=y, **dit_util.cfg_kwargs(args))

    samples = run_diffusion(diffusion, model.forward_with_cfg, z.shape, sampler=dit_util.sampler_choice(args),
                            noise=z,
                            clip_denoised=False, model_kwargs=model_kwargs, progress=True)
    samples = samples[:n]  # remove null class samples
    samples = dit_util.decode_latents(vae, samples)
    save_image_grid(dit_util.images_to_uint8_grid(samples), args.output, nrow=4)
    print("Saved %s" % args.output)


if __name__ == "__main__":
    run_cli(main)

"""
The logic behind DiT's entry scripts (train.py, sample.py, sample_ddp.py), kept out of them so they stay wiring.

Building a model from a registry name (optionally shrunk for CPU experiments), loading the VAE and DiT weights with
clear errors, the ImageFolder listing, the reference's logger, the latent <-> image conversions and the training
checkpoint (model, EMA, AdamW state in PyTorch's layout via train_util.AdamW, args) with resume.
"""

import argparse
import json
import logging
import os
import re
from glob import glob
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

import guided_diffusion  # noqa: F401  (prepares Jittor's environment before Jittor is imported)
import jittor as jt

from guided_diffusion import checkpoint as gd_checkpoint
from guided_diffusion import state_dicts as gd_state_dicts
from guided_diffusion import dist_util, model_loading
from guided_diffusion.class_labels import ClassListing, class_count_problem, find_classes
from guided_diffusion.errors import CheckpointError, DataError, InputCheck, UserError
from guided_diffusion import samplers
from guided_diffusion.guidance import parse_guidance_interval
from guided_diffusion.run_guard import RunGuard
from guided_diffusion.training.checkpoints import CheckpointIO, DiTLayout
from guided_diffusion.training.ema import EMA, ema_std_name, parse_ema_stds
from guided_diffusion.training.optim import AdamW
from guided_diffusion.training.phema import MAX_STD
from guided_diffusion.training.preview import PREVIEW_RESPACING, PreviewGrid, preview_labels

from autoencoder import WEIGHTS_NAMES, AutoencoderKL
from diffusion import create_diffusion
from download import find_model, pretrained_models
from models import DiT, DiT_models

# Stable Diffusion's latent scaling factor, applied by DiT (not inside the VAE).
LATENT_SCALE = 0.18215
# The class labels sample.py draws (as released).
SAMPLE_CLASS_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]
HF_HUB = "https://huggingface.co"
# torchvision ImageFolder's extensions.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# ----------------------------------------------------------------------------------------------------------------
# Flags shared by the scripts
# ----------------------------------------------------------------------------------------------------------------


def add_model_override_flags(parser: argparse.ArgumentParser) -> None:
    """--depth / --hidden-size / --num-heads: shrink a named config (e.g. for CPU experiments and tests)."""
    parser.add_argument("--depth", type=int, default=None,
                        help="override the number of transformer blocks of --model (unset: the config's)")
    parser.add_argument("--hidden-size", type=int, default=None,
                        help="override the hidden width of --model (unset: the config's)")
    parser.add_argument("--num-heads", type=int, default=None,
                        help="override the number of attention heads of --model (unset: the config's)")


def add_vae_flags(parser: argparse.ArgumentParser, default_vae: str) -> None:
    """--vae (ema|mse) and --vae-path (a local diffusers VAE folder)."""
    parser.add_argument("--vae", type=str, choices=["ema", "mse"], default=default_vae,
                        help="which fine-tuned decoder of stabilityai/sd-vae-ft-* to use")
    parser.add_argument("--vae-path", type=str, default=None,
                        help="local diffusers VAE folder (config.json + diffusion_pytorch_model.safetensors); "
                             "unset: ./stabilityai/sd-vae-ft-{vae}, downloaded from the Hugging Face hub if missing")


def add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    """--num-sampling-steps (the reference's, default 250), --sampler (default: the reference's DDPM) with UniPC's
    options, and the guidance interval and rescale of classifier-free guidance (default off)."""
    parser.add_argument("--num-sampling-steps", type=int, default=250,
                        help="sampling steps, respaced from the 1000 of training (uniform for ddpm and ddim, uniform "
                             "in log-SNR for the ODE samplers dpm++2m, dpm++3m and unipc)")
    parser.add_argument("--sampler", type=str, choices=list(samplers.SAMPLER_NAMES), default="ddpm",
                        help="; ".join("%s: %s" % (s.name, s.summary) for s in samplers.SAMPLERS.values())
                        + ". The ODE samplers need far fewer steps (e.g. --sampler unipc --num-sampling-steps 10)")
    parser.add_argument("--unipc-order", type=int, default=samplers.UNIPC_DEFAULTS["order"],
                        help="--sampler unipc: order of the predictor, 1-3 (the corrector adds one)")
    parser.add_argument("--unipc-variant", type=str, default=samplers.UNIPC_DEFAULTS["variant"],
                        help="--sampler unipc: B(h) = h (bh1) or e^h - 1 (bh2)")
    parser.add_argument("--guidance-interval", type=str, default="",
                        help="LO,HI: classifier-free guidance only at timesteps LO <= t <= HI (0..999), elsewhere "
                             "the conditional prediction alone; empty: at every step")
    parser.add_argument("--guidance-rescale", type=float, default=0.0,
                        help="rescale the guided eps's standard deviation toward the conditional one by this factor "
                             "(Lin et al. 2023; diffusers' guidance_rescale); 0: off")


def sampler_choice(args: argparse.Namespace) -> samplers.SamplerChoice:
    """The sampler and its options that --sampler, --unipc-order and --unipc-variant ask for."""
    return samplers.choice_from_args(args, dashed=True)


def sampling_spacing(args: argparse.Namespace) -> str:
    """The respacing of --num-sampling-steps for --sampler: "N" (the reference's) or "logsnrN" for the ODE
    samplers (the sampler table's grid)."""
    return samplers.grid_for_steps(sampler_choice(args), args.num_sampling_steps)


def cfg_kwargs(args: argparse.Namespace) -> Dict[str, object]:
    """forward_with_cfg's keyword arguments from the flags (the interval parsed; both off by default)."""
    interval = parse_guidance_interval(args.guidance_interval, 1000, flag="--guidance-interval")
    return dict(cfg_scale=args.cfg_scale, guide_all_channels=args.guide_all_channels,
                guidance_interval=interval, guidance_rescale=args.guidance_rescale)


def check_sampling_flags(check: InputCheck, args: argparse.Namespace) -> None:
    """Record, in `check`, problems of the sampling flags shared by sample.py and sample_ddp.py."""
    if not 1 <= args.num_sampling_steps <= 1000:
        check.problem("--num-sampling-steps must lie in 1..1000 (got %d)" % args.num_sampling_steps)
    check(sampler_choice, args)
    check(parse_guidance_interval, args.guidance_interval, 1000, flag="--guidance-interval")
    if not 0.0 <= args.guidance_rescale <= 1.0:
        check.problem("--guidance-rescale %g: give a factor in [0, 1] (0: off)" % args.guidance_rescale)


def trained_classes(args: argparse.Namespace) -> model_loading.TrainedClasses:
    """The classes a checkpoint was trained on: the classes.json train.py wrote into its experiment folder (the
    checkpoint's folder or the one above), else --num-classes (the released models: ImageNet's 1000)."""
    if not args.ckpt or not os.path.isfile(args.ckpt):
        return model_loading.TrainedClasses(args.num_classes, None, "--num-classes %d" % args.num_classes)
    return model_loading.trained_classes(args.ckpt, args.num_classes, flag="--ckpt", levels=2,
                                         num_classes_flag="--num-classes")


def sample_class_labels(spec: str, classes: model_loading.TrainedClasses) -> List[int]:
    """sample.py's labels: --class-labels (ids, or names of classes.json); else the released script's 8 ImageNet
    classes on a 1000-class model, else the model's classes in turn, 8 images."""
    labels = model_loading.parse_class_labels(spec, classes, flag="--class-labels")
    if labels:
        return labels
    if classes.count >= 1000:
        return list(SAMPLE_CLASS_LABELS)
    return [i % classes.count for i in range(len(SAMPLE_CLASS_LABELS))]


def vae_folder(args: argparse.Namespace) -> str:
    """The VAE folder the flags name: --vae-path, else ./stabilityai/sd-vae-ft-{vae} (as the README says)."""
    return args.vae_path or os.path.join("stabilityai", "sd-vae-ft-%s" % args.vae)


# ----------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------


#: depth / hidden_size / num_heads of each DiT size (the paper's Table 1, as models.py builds them); the patch size is
#: the number after the slash. tests/test_dit_sampler_flags.py checks this table against models.DiT_models.
DIT_SIZES = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}


def model_config(name: str) -> Dict[str, int]:
    """depth / hidden_size / patch_size / num_heads of a registry name such as "DiT-XL/2", without building it."""
    if name not in DiT_models:
        raise UserError("unknown --model %r: choose one of %s" % (name, ", ".join(DiT_models)))
    size, patch = name[len("DiT-"):].split("/")
    depth, hidden_size, num_heads = DIT_SIZES[size]
    return {"depth": depth, "hidden_size": hidden_size, "patch_size": int(patch), "num_heads": num_heads}


def vae_downsample_factor(vae: AutoencoderKL) -> int:
    """Image size / latent size of a VAE: 8 for the KL-f8 VAEs (4 blocks), 2**(blocks-1) in general."""
    return 2 ** (len(vae.config["block_out_channels"]) - 1)


def latent_size_for(image_size: int, factor: int) -> int:
    """The latent size for --image-size, refusing sizes the VAE cannot encode exactly."""
    if image_size <= 0 or image_size % factor:
        raise UserError("--image-size %d must be a positive multiple of %d (the VAE's downsampling factor); "
                        "DiT was released for 256 and 512" % (image_size, factor))
    return image_size // factor


def build_model(args: argparse.Namespace, latent_size: int) -> DiT:
    """DiT_models[--model](input_size=latent_size, num_classes=--num-classes), with the optional size overrides."""
    cfg = model_config(args.model)
    overrides = {"depth": getattr(args, "depth", None), "hidden_size": getattr(args, "hidden_size", None),
                 "num_heads": getattr(args, "num_heads", None)}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.num_classes < 1:
        raise UserError("--num-classes must be at least 1 (got %d)" % args.num_classes)
    if latent_size % cfg["patch_size"]:
        raise UserError("the latent size %d is not divisible by the patch size %d of %s: choose another "
                        "--image-size or --model" % (latent_size, cfg["patch_size"], args.model))
    use_checkpoint = bool(getattr(args, "grad_checkpoint", False))
    if not overrides:
        return DiT_models[args.model](input_size=latent_size, num_classes=args.num_classes,
                                      use_checkpoint=use_checkpoint)
    cfg.update(overrides)
    if cfg["hidden_size"] % cfg["num_heads"]:
        raise UserError("--hidden-size %d is not divisible by --num-heads %d" % (cfg["hidden_size"], cfg["num_heads"]))
    return DiT(input_size=latent_size, num_classes=args.num_classes, use_checkpoint=use_checkpoint, **cfg)


def load_dit_checkpoint(model: DiT, ckpt: Optional[str], args: argparse.Namespace) -> str:
    """Load --ckpt (or the released DiT-XL/2 weights for --image-size) strictly into model; returns the path used."""
    if ckpt is None:
        if args.model != "DiT-XL/2" or args.image_size not in (256, 512) or args.num_classes != 1000:
            raise UserError("without --ckpt only the released models can be used (--model DiT-XL/2, --image-size "
                            "256 or 512, --num-classes 1000); pass --ckpt for other settings")
        ckpt = "DiT-XL-2-%dx%d.pt" % (args.image_size, args.image_size)
    state_dict = find_model(ckpt)
    gd_state_dicts.load_state_dict_strict(model, state_dict, source="DiT checkpoint %s" % ckpt)
    return ckpt


def fetch_vae(vae: str, folder: str) -> str:
    """Download stabilityai/sd-vae-ft-{vae} (config.json + safetensors) from the Hugging Face hub into folder.

    The reference's from_pretrained fetches the hub repository the same way; offline, the error names the URLs and
    the folder to put the files in (the README's ./stabilityai layout).
    """
    from guided_diffusion.download import download_file

    os.makedirs(folder, exist_ok=True)
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        url = "%s/stabilityai/sd-vae-ft-%s/resolve/main/%s" % (HF_HUB, vae, name)
        dest = os.path.join(folder, name)
        download_file(url, dest, what="the VAE file %s" % name,
                      place_hint="download config.json and diffusion_pytorch_model.safetensors from "
                                 "%s/stabilityai/sd-vae-ft-%s into %s (or pass --vae-path)"
                                 % (HF_HUB, vae, os.path.abspath(folder)))
    return folder


def _vae_is_present(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "config.json")) and any(
        os.path.isfile(os.path.join(folder, n)) for n in WEIGHTS_NAMES)


def check_inputs(check: InputCheck, args: argparse.Namespace, *, ckpt_flag: Optional[str] = None,
                 vae: bool = True) -> None:
    """Record, in `check`, every problem of a DiT script's flags and files (model, sizes, VAE, checkpoint) and
    then raise them together: nothing is downloaded or built before the cheap checks have all passed.

    ckpt_flag: "--ckpt" for the samplers (unset means the released DiT-XL/2 for --image-size). vae=False: the
    script needs no VAE (train.py --feature-path).
    """
    check(model_config, args.model)
    if args.num_classes < 1:
        check.problem("--num-classes must be at least 1 (got %d)" % args.num_classes)
    if ckpt_flag:
        ckpt = getattr(args, "ckpt", None)
        if ckpt is None:
            if args.model != "DiT-XL/2" or args.image_size not in (256, 512) or args.num_classes != 1000:
                check.problem("without --ckpt only the released models can be used (--model DiT-XL/2, --image-size "
                              "256 or 512, --num-classes 1000); pass --ckpt for other settings")
        elif ckpt not in pretrained_models and os.path.basename(ckpt) not in pretrained_models \
                and not os.path.isfile(ckpt):
            check.problem("could not find DiT checkpoint at %s: check %s (a released name such as "
                          "DiT-XL-2-256x256.pt, or a .pt file written by train.py)" % (ckpt, ckpt_flag))
    if vae:
        check_vae_inputs(check, args)
    check.done()


def check_vae_inputs(check: InputCheck, args: argparse.Namespace) -> None:
    """Record, in `check`, the problems of --image-size and the VAE folder; call it after the other checks: a
    missing default VAE folder is named only beside other problems (alone, it is downloaded)."""
    folder = vae_folder(args)
    factor = 8  # the SD VAEs'; a local folder's config says otherwise
    if _vae_is_present(folder):
        try:
            with open(os.path.join(folder, "config.json")) as f:
                factor = 2 ** (len(json.load(f).get("block_out_channels", [0] * 4)) - 1)
        except (OSError, ValueError, TypeError) as exc:
            check.problem("cannot read the VAE config in %s (%s): download config.json again" % (folder, exc))
    check(latent_size_for, args.image_size, factor)
    if args.vae_path is not None and not _vae_is_present(folder):
        check.problem("--vae-path %s does not hold a diffusers VAE (config.json and diffusion_pytorch_model."
                      "safetensors): check the folder" % folder)
    elif check.problems and not _vae_is_present(folder):
        check.problem("the VAE folder %s is missing: it is downloaded from %s/stabilityai/sd-vae-ft-%s when the "
                      "other problems are fixed (offline: put config.json and diffusion_pytorch_model.safetensors "
                      "there, or pass --vae-path)" % (os.path.abspath(folder), HF_HUB, args.vae))


def load_vae(args: argparse.Namespace) -> AutoencoderKL:
    """The VAE named by --vae-path, else ./stabilityai/sd-vae-ft-{vae} (downloaded from the hub if missing)."""
    folder = vae_folder(args)
    if args.vae_path is None and not _vae_is_present(folder):
        fetch_vae(args.vae, folder)
    return AutoencoderKL.from_pretrained(folder)


def encode_latents(vae: AutoencoderKL, x: jt.Var) -> jt.Var:
    """Images in [-1, 1] -> scaled latents: a posterior sample times 0.18215 (as DiT trains)."""
    with jt.no_grad():
        return (vae.encode(x).latent_dist.sample() * LATENT_SCALE).detach()


def decode_latents(vae: AutoencoderKL, z: jt.Var) -> jt.Var:
    """Scaled latents -> images in about [-1, 1]: vae.decode(z / 0.18215).sample."""
    with jt.no_grad():
        return vae.decode(z / LATENT_SCALE).sample


def images_to_uint8_dit(x: jt.Var) -> np.ndarray:
    """sample_ddp's conversion: clamp(127.5 x + 128, 0, 255) truncated to uint8, NCHW -> NHWC."""
    arr = x.numpy().astype(np.float32)
    arr = np.clip(127.5 * arr + 128.0, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr.transpose(0, 2, 3, 1))


def images_to_uint8_grid(x: jt.Var) -> np.ndarray:
    """torchvision save_image(normalize=True, value_range=(-1, 1)) rounding: ((x+1)/2*255 + 0.5), NHWC uint8."""
    arr = np.clip(x.numpy().astype(np.float32), -1.0, 1.0)
    arr = np.clip((arr + 1.0) / 2.0 * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr.transpose(0, 2, 3, 1))


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------


def list_image_folder(root: str, class_from: str = "auto", num_classes: Optional[int] = None) -> ClassListing:
    """The images of --data-path in torchvision ImageFolder's order (each sorted sub-folder walked in turn; images
    directly in root, which ImageFolder ignores, first) with their classes by the rule every training script uses
    (class_labels.find_classes, --class-from: the sub-folders, as ImageFolder, for one sub-folder per class). The
    listing unpacks as (files, labels, class names); more classes than num_classes raise a DataError."""
    if not os.path.isdir(root):
        raise DataError("--data-path %r is not a directory: give the ImageNet train folder (one sub-folder per class)"
                        % root)
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    files = [e.path for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    for folder in (e for e in entries if e.is_dir()):
        for dirpath, _, names in sorted(os.walk(folder.path, followlinks=True)):
            files.extend(os.path.join(dirpath, f) for f in sorted(names) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise DataError("--data-path %r holds no images (%s): images must be in root/<class>/<image> as for "
                        "torchvision's ImageFolder" % (root, ", ".join(IMAGE_EXTENSIONS)))
    listing = find_classes(root, files, class_from, flag="--class-from", data_flag="--data-path")
    problem = class_count_problem(listing.num_classes, num_classes, "--data-path %s" % root, "--num-classes") \
        if num_classes is not None else None
    if problem:
        raise DataError(problem)
    return listing


# ----------------------------------------------------------------------------------------------------------------
# Logging and experiment folders
# ----------------------------------------------------------------------------------------------------------------


def create_logger(logging_dir: Optional[str]) -> logging.Logger:
    """The reference's logger: rank 0 logs to stdout and logging_dir/log.txt; other ranks are silent."""
    logger = logging.getLogger("DiT")
    logger.handlers.clear()
    logger.propagate = False
    if dist_util.is_main_process() and logging_dir is not None:
        fmt = logging.Formatter("[\033[34m%(asctime)s\033[0m] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        for handler in (logging.StreamHandler(), logging.FileHandler(os.path.join(logging_dir, "log.txt"))):
            handler.setFormatter(fmt)
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def new_experiment_dir(results_dir: str, model_name: str) -> str:
    """{results_dir}/{NNN}-{model with '/' -> '-'}, NNN = number of entries already there (as the reference)."""
    os.makedirs(results_dir, exist_ok=True)
    index = len(glob(os.path.join(results_dir, "*")))
    return os.path.join(results_dir, "%03d-%s" % (index, model_name.replace("/", "-")))


# The flags that define a run: a rerun with the same ones continues it (the others, e.g. --epochs, may change).
RUN_DEFINING_FLAGS = ("model", "data_path", "image_size", "num_classes", "global_batch_size", "global_seed", "vae",
                      "vae_path", "depth", "hidden_size", "num_heads")
RUN_FLAGS_FILE = "args.json"


def run_flags(args: argparse.Namespace) -> Dict[str, object]:
    """The run-defining flags of args (paths made absolute), as written to a run folder's args.json."""
    flags = {k: getattr(args, k, None) for k in RUN_DEFINING_FLAGS}
    if getattr(args, "feature_path", None):  # absent otherwise, so runs from before the flag still continue
        flags["feature_path"] = args.feature_path
    for k in ("data_path", "vae_path", "feature_path"):
        if flags.get(k):
            flags[k] = os.path.abspath(flags[k])
    return flags


def _checkpoint_steps(ckpt_dir: str) -> List[int]:
    return sorted(int(os.path.basename(f)[:-3]) for f in glob(os.path.join(ckpt_dir, "*.pt"))
                  if os.path.basename(f)[:-3].isdigit())


def find_run_to_continue(args: argparse.Namespace) -> Optional[str]:
    """The newest complete checkpoint set of the newest run in --results-dir made by the same command (same
    run-defining flags), so that rerunning a command after a stop continues its run instead of starting over."""
    pattern = re.compile(r"^\d{3}-%s$" % re.escape(args.model.replace("/", "-")))
    if not os.path.isdir(args.results_dir):
        return None
    for name in sorted((n for n in os.listdir(args.results_dir) if pattern.match(n)), reverse=True):
        folder = os.path.join(args.results_dir, name)
        try:
            with open(os.path.join(folder, RUN_FLAGS_FILE)) as f:
                same = json.load(f) == json.loads(json.dumps(run_flags(args)))
        except (OSError, ValueError):
            continue
        newest = training_checkpoints(None, args, RunGuard()).newest(os.path.join(folder, "checkpoints"))
        if same and newest:
            return newest[0]
    return None


def experiment_dir_for(args: argparse.Namespace, resume_steps: int, resume: Optional[str] = None) -> str:
    """The run folder (with checkpoints/ inside): the resumed run's own folder, else a new one (with args.json).

    A resumed run continues in its folder unless that folder already holds later checkpoints (resuming from an
    older one), which are never overwritten: the run then gets a new folder.
    """
    resume = resume or args.resume
    if resume:
        ckpt_dir = os.path.dirname(os.path.abspath(resume))
        if os.path.basename(ckpt_dir) == "checkpoints":
            if not [s for s in _checkpoint_steps(ckpt_dir) if s > resume_steps]:
                return os.path.dirname(ckpt_dir)
    experiment_dir = new_experiment_dir(args.results_dir, args.model)
    os.makedirs(os.path.join(experiment_dir, "checkpoints"), exist_ok=True)
    with gd_checkpoint.atomic_write(os.path.join(experiment_dir, RUN_FLAGS_FILE), "w") as f:
        json.dump(run_flags(args), f, indent=1)
    return experiment_dir


# ----------------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------------


def check_training_flags(check: InputCheck, args: argparse.Namespace, world: int) -> None:
    """Record, in `check`, the problems of train.py's flags that need no file read (before anything is built)."""
    if args.global_batch_size < 1 or args.global_batch_size % world:
        check.problem("--global-batch-size %d must be a positive multiple of the number of processes %d"
                      % (args.global_batch_size, world))
    if args.log_every < 1 or args.ckpt_every < 1 or args.epochs < 1:
        check.problem("--log-every, --ckpt-every and --epochs must be at least 1")
    for flag in ("max_steps", "preview_every"):
        if getattr(args, flag) < 0:
            check.problem("--%s must be 0 (off) or positive (got %d)" % (flag.replace("_", "-"), getattr(args, flag)))
    try:
        parse_ema_stds(args.ema_std)
    except ValueError as exc:
        check.problem("--ema-std %r must be comma-separated relative stds in (0, %g], e.g. 0.05,0.1 (%s)"
                      % (args.ema_std, MAX_STD, exc))
    if args.finetune_from and (args.resume or not os.path.isfile(args.finetune_from)):
        check.problem("--finetune-from %s: %s" % (args.finetune_from, "give it without --resume (it starts a new run)"
                      if args.resume else "file not found; give a DiT checkpoint (.pt)"))
    if args.resume and not os.path.isfile(args.resume):
        check.problem("--resume %s: file not found; give a checkpoint written by train.py "
                      "(results/NNN-model/checkpoints/XXXXXXX.pt)" % args.resume)
    if (args.data_path is None) == (args.feature_path is None):
        check.problem("give either --data-path (images) or --feature-path (features from extract_features.py)")


def training_preview(ema: DiT, vae: AutoencoderKL, latent_size: int, num_classes: int, out_dir: Optional[str],
                     seed: int, log=print) -> PreviewGrid:
    """--preview-every's grid: the EMA model's conditional samples (no guidance) of the first classes, a row each,
    from fixed latent noise, UniPC on training.preview's grid, decoded by the VAE."""
    return PreviewGrid(model=ema, diffusion=create_diffusion(PREVIEW_RESPACING), averaged_state=None,
                       shape=(ema.in_channels, latent_size, latent_size), out_dir=out_dir, seed=seed,
                       labels=preview_labels(num_classes), clip_denoised=False,
                       decode=lambda z: decode_latents(vae, z), log=log)


# ----------------------------------------------------------------------------------------------------------------
# Training checkpoints
# ----------------------------------------------------------------------------------------------------------------


def training_checkpoints(checkpoint_dir: Optional[str], args: argparse.Namespace, guard: RunGuard,
                         log=print) -> CheckpointIO:
    """The checkpoint object of a train.py run: DiT's layout ({step:07d}.pt, phema_<std>_<step>.pt per --ema-std)."""
    names = [ema_std_name(s) for s in parse_ema_stds(getattr(args, "ema_std", ""))]
    return CheckpointIO(checkpoint_dir, DiTLayout(names), guard, log=log, log_each_file=False)


def training_states(model: DiT, ema: DiT, opt: AdamW, args: argparse.Namespace,
                    power_emas: Sequence[EMA] = ()) -> Dict[str, object]:
    """The named states of a train.py checkpoint set: the reference's {"model", "ema", "opt", "args"} and one
    model state dict per power-function EMA (numpy copies; the Vars must be computed already)."""
    states = {
        "model": gd_state_dicts.module_state_dict(model),
        "ema": gd_state_dicts.module_state_dict(ema),
        "opt": opt.state_dict(),
        "args": args,
    }
    names = [n for n, _ in model.named_parameters()]
    for power_ema in power_emas:
        for name, values in power_ema.state().items():
            state = gd_state_dicts.module_state_dict(model)
            state.update((n, np.array(v.numpy(), copy=True)) for n, v in zip(names, values))
            states[name] = state
    return states


def load_training_checkpoint(path: str, model: DiT, ema: DiT, opt: AdamW,
                             power_emas: Sequence[EMA] = (), checkpoints: Optional[CheckpointIO] = None) -> int:
    """Restore model, EMA, optimizer (and the power-function EMAs of its set) from a train.py checkpoint; returns
    the number of steps already trained."""
    if not os.path.isfile(path):
        raise CheckpointError("--resume %s: file not found; give a checkpoint written by train.py "
                              "(results/NNN-model/checkpoints/XXXXXXX.pt)" % path)
    ckpt = gd_checkpoint.load_file(path)
    if not isinstance(ckpt, Mapping) or not all(k in ckpt for k in ("model", "ema", "opt")):
        raise CheckpointError("--resume %s is not a train.py checkpoint (it needs the keys model, ema, opt); "
                              "to start from released weights use sample.py's --ckpt instead" % path)
    gd_state_dicts.load_state_dict_strict(model, ckpt["model"], source="--resume %s (model)" % path)
    gd_state_dicts.load_state_dict_strict(ema, ckpt["ema"], source="--resume %s (ema)" % path)
    opt.load_state_dict(ckpt["opt"], source="--resume %s (opt)" % path)
    step = int(opt.n_step)
    if power_emas and checkpoints is not None:
        checkpoints.check_complete(path, step)
        snapshots = checkpoints.read(path, step)
        names = [n for n, _ in model.named_parameters()]
        for power_ema in power_emas:
            for name in power_ema.names:
                state = snapshots[name]
                missing = [n for n in names if n not in state]
                if missing:
                    raise CheckpointError("%s does not fit the model (missing %s)" % (name, ", ".join(missing[:3])))
                power_ema.load(name, [jt.array(np.asarray(state[n], np.float32)) for n in names])
    return step

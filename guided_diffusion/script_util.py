"""
Flag defaults and factories that turn command-line flags into models and diffusion processes.

Same names, signatures and defaults as guided-diffusion's ``script_util.py``; the additions are a trailing
``num_classes`` keyword (default ``NUM_CLASSES`` = 1000, the reference's constant) on every factory that builds a
class-conditional model or a classifier, with a ``num_classes`` entry in the defaults dicts so that every script
gets ``--num_classes`` (classifier-free models use a ``num_classes + 1`` row label table, the last row being the
null label), and ``free_model_and_diffusion_defaults``.
"""

import argparse
import inspect
from typing import Any, Dict, Iterable, Tuple

from . import gaussian_diffusion as gd
from .errors import UserError
from .respace import SpacedDiffusion, space_timesteps
from .unet import EncoderUNetModel, SuperResModel, UNetModel

NUM_CLASSES = 1000


class FlagError(UserError, ValueError):
    """A model flag has a value the factories cannot build (e.g. an unsupported image size)."""


def diffusion_defaults() -> Dict[str, Any]:
    """Defaults for image and classifier training (the diffusion-process flags)."""
    return dict(
        learn_sigma=False,
        diffusion_steps=1000,
        noise_schedule="linear",
        timestep_respacing="",
        use_kl=False,
        predict_xstart=False,
        rescale_timesteps=False,
        rescale_learned_sigmas=False,
    )


def classifier_defaults() -> Dict[str, Any]:
    """Defaults for the noisy-image classifier flags."""
    return dict(
        image_size=64,
        classifier_use_fp16=False,
        classifier_width=128,
        classifier_depth=2,
        classifier_attention_resolutions="32,16,8",  # 16
        classifier_use_scale_shift_norm=True,  # False
        classifier_resblock_updown=True,  # False
        classifier_pool="attention",
        num_classes=NUM_CLASSES,
    )


def model_and_diffusion_defaults() -> Dict[str, Any]:
    """Defaults for image (diffusion model) training and sampling."""
    res = dict(
        image_size=64,
        num_channels=128,
        num_res_blocks=2,
        num_heads=4,
        num_heads_upsample=-1,
        num_head_channels=-1,
        attention_resolutions="16,8",
        channel_mult="",
        dropout=0.0,
        class_cond=False,
        use_checkpoint=False,
        use_scale_shift_norm=True,
        resblock_updown=False,
        use_fp16=False,
        use_new_attention_order=False,
        num_classes=NUM_CLASSES,
    )
    res.update(diffusion_defaults())
    return res


def free_model_and_diffusion_defaults() -> Dict[str, Any]:
    """Defaults for classifier-free guidance training/sampling (class-conditional CIFAR-10 sized model)."""
    res = model_and_diffusion_defaults()
    res.update(
        image_size=32,
        num_channels=128,
        num_res_blocks=2,
        channel_mult="1,2,2,2",
        attention_resolutions="16",
        num_heads=4,
        dropout=0.1,
        class_cond=True,
        learn_sigma=True,
        noise_schedule="cosine",
        num_classes=10,
    )
    return res


def classifier_and_diffusion_defaults() -> Dict[str, Any]:
    """Defaults for classifier training: classifier flags plus diffusion flags."""
    res = classifier_defaults()
    res.update(diffusion_defaults())
    return res


def create_model_and_diffusion(
    image_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    channel_mult,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    use_new_attention_order,
    num_classes=NUM_CLASSES,
) -> Tuple[UNetModel, SpacedDiffusion]:
    """Build the UNet and its (possibly respaced) diffusion process from the model flags."""
    model = create_model(
        image_size,
        num_channels,
        num_res_blocks,
        channel_mult=channel_mult,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        use_new_attention_order=use_new_attention_order,
        num_classes=num_classes,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    return model, diffusion


def _default_channel_mult(image_size: int, what: str = "image_size") -> tuple:
    """The reference's channel multipliers per resolution, plus 32x32 (CIFAR-10 / digits sized models, which the
    reference rejects) so that classifiers, which have no --channel_mult flag, can be built at 32x32."""
    table = {
        512: (0.5, 1, 1, 2, 2, 4, 4),
        256: (1, 1, 2, 2, 4, 4),
        128: (1, 1, 2, 3, 4),
        64: (1, 2, 3, 4),
        32: (1, 2, 2, 2),
    }
    if image_size not in table:
        raise FlagError(
            f"unsupported image size: {image_size} (--{what}); the built-in channel multipliers exist for "
            f"32, 64, 128, 256 and 512, so pick one of those"
            + (" or pass --channel_mult explicitly, e.g. --channel_mult 1,2,2,2" if what == "image_size" else "")
        )
    return table[image_size]


def _attention_ds(image_size: int, attention_resolutions: str, flag: str) -> tuple:
    """Turn "32,16,8" (resolutions) into the downsample rates where attention is used."""
    try:
        return tuple(image_size // int(res) for res in str(attention_resolutions).split(","))
    except (ValueError, ZeroDivisionError):
        raise FlagError(
            f"--{flag} {attention_resolutions!r} is not a comma-separated list of positive resolutions; "
            f"use e.g. --{flag} 32,16,8"
        ) from None


def create_model(
    image_size,
    num_channels,
    num_res_blocks,
    channel_mult="",
    learn_sigma=False,
    class_cond=False,
    use_checkpoint=False,
    attention_resolutions="16",
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=False,
    dropout=0,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    num_classes=NUM_CLASSES,
) -> UNetModel:
    """Build a UNetModel from the model flags (num_classes sets the label table size when class_cond)."""
    if channel_mult == "":
        channel_mult = _default_channel_mult(image_size)
    elif isinstance(channel_mult, str):
        try:
            channel_mult = tuple(int(ch_mult) for ch_mult in channel_mult.split(","))
        except ValueError:
            raise FlagError(
                f"--channel_mult {channel_mult!r} is not a comma-separated list of integers; use e.g. 1,2,3,4"
            ) from None
    attention_ds = _attention_ds(image_size, attention_resolutions, "attention_resolutions")
    return UNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(3 if not learn_sigma else 6),
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_ds,
        dropout=dropout,
        channel_mult=channel_mult,
        num_classes=(num_classes if class_cond else None),
        use_checkpoint=use_checkpoint,
        use_fp16=use_fp16,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_new_attention_order=use_new_attention_order,
    )


def create_classifier_and_diffusion(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    learn_sigma,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    num_classes=NUM_CLASSES,
) -> Tuple[EncoderUNetModel, SpacedDiffusion]:
    """Build the noisy-image classifier (num_classes outputs) and the diffusion process it is trained against."""
    classifier = create_classifier(
        image_size,
        classifier_use_fp16,
        classifier_width,
        classifier_depth,
        classifier_attention_resolutions,
        classifier_use_scale_shift_norm,
        classifier_resblock_updown,
        classifier_pool,
        num_classes=num_classes,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    return classifier, diffusion


def create_classifier(
    image_size,
    classifier_use_fp16,
    classifier_width,
    classifier_depth,
    classifier_attention_resolutions,
    classifier_use_scale_shift_norm,
    classifier_resblock_updown,
    classifier_pool,
    num_classes=NUM_CLASSES,
) -> EncoderUNetModel:
    """Build the EncoderUNetModel classifier (num_classes outputs: 1000 ImageNet classes) from the classifier flags."""
    channel_mult = _default_channel_mult(image_size)
    attention_ds = _attention_ds(image_size, classifier_attention_resolutions, "classifier_attention_resolutions")
    return EncoderUNetModel(
        image_size=image_size,
        in_channels=3,
        model_channels=classifier_width,
        out_channels=num_classes,
        num_res_blocks=classifier_depth,
        attention_resolutions=attention_ds,
        channel_mult=channel_mult,
        use_fp16=classifier_use_fp16,
        num_head_channels=64,
        use_scale_shift_norm=classifier_use_scale_shift_norm,
        resblock_updown=classifier_resblock_updown,
        pool=classifier_pool,
    )


def sr_model_and_diffusion_defaults() -> Dict[str, Any]:
    """Defaults for super-resolution training/sampling (the arguments of sr_create_model_and_diffusion)."""
    res = model_and_diffusion_defaults()
    res["large_size"] = 256
    res["small_size"] = 64
    arg_names = inspect.getfullargspec(sr_create_model_and_diffusion)[0]
    for k in res.copy().keys():
        if k not in arg_names:
            del res[k]
    return res


def sr_create_model_and_diffusion(
    large_size,
    small_size,
    class_cond,
    learn_sigma,
    num_channels,
    num_res_blocks,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    attention_resolutions,
    dropout,
    diffusion_steps,
    noise_schedule,
    timestep_respacing,
    use_kl,
    predict_xstart,
    rescale_timesteps,
    rescale_learned_sigmas,
    use_checkpoint,
    use_scale_shift_norm,
    resblock_updown,
    use_fp16,
    num_classes=NUM_CLASSES,
) -> Tuple[SuperResModel, SpacedDiffusion]:
    """Build the super-resolution model and its diffusion process from the sr flags."""
    model = sr_create_model(
        large_size,
        small_size,
        num_channels,
        num_res_blocks,
        learn_sigma=learn_sigma,
        class_cond=class_cond,
        use_checkpoint=use_checkpoint,
        attention_resolutions=attention_resolutions,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        dropout=dropout,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
        num_classes=num_classes,
    )
    diffusion = create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=rescale_timesteps,
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing,
    )
    return model, diffusion


def sr_create_model(
    large_size,
    small_size,
    num_channels,
    num_res_blocks,
    learn_sigma,
    class_cond,
    use_checkpoint,
    attention_resolutions,
    num_heads,
    num_head_channels,
    num_heads_upsample,
    use_scale_shift_norm,
    dropout,
    resblock_updown,
    use_fp16,
    num_classes=NUM_CLASSES,
) -> SuperResModel:
    """Build the SuperResModel (channel multipliers chosen by large_size; num_classes label rows when class_cond)."""
    _ = small_size  # the low-resolution size is implied by the input, as in the reference
    if large_size in (512, 256):
        channel_mult = (1, 1, 2, 2, 4, 4)
    elif large_size == 64:
        channel_mult = (1, 2, 3, 4)
    else:
        raise FlagError(f"unsupported large size: {large_size} (--large_size); use 64, 256 or 512")
    attention_ds = _attention_ds(large_size, attention_resolutions, "attention_resolutions")
    return SuperResModel(
        image_size=large_size,
        in_channels=3,
        model_channels=num_channels,
        out_channels=(3 if not learn_sigma else 6),
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_ds,
        dropout=dropout,
        channel_mult=channel_mult,
        num_classes=(num_classes if class_cond else None),
        use_checkpoint=use_checkpoint,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
        num_heads_upsample=num_heads_upsample,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        use_fp16=use_fp16,
    )


def create_gaussian_diffusion(
    *,
    steps=1000,
    learn_sigma=False,
    sigma_small=False,
    noise_schedule="linear",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
    timestep_respacing="",
) -> SpacedDiffusion:
    """Build the (respaced) diffusion process described by the diffusion flags."""
    betas = gd.get_named_beta_schedule(noise_schedule, steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if not timestep_respacing:
        timestep_respacing = [steps]
    return SpacedDiffusion(
        use_timesteps=space_timesteps(steps, timestep_respacing, betas=betas),
        betas=betas,
        model_mean_type=(gd.ModelMeanType.EPSILON if not predict_xstart else gd.ModelMeanType.START_X),
        model_var_type=(
            (gd.ModelVarType.FIXED_LARGE if not sigma_small else gd.ModelVarType.FIXED_SMALL)
            if not learn_sigma
            else gd.ModelVarType.LEARNED_RANGE
        ),
        loss_type=loss_type,
        rescale_timesteps=rescale_timesteps,
    )


def add_dict_to_argparser(parser: argparse.ArgumentParser, default_dict: Dict[str, Any]) -> None:
    """Add a `--key` flag for every entry of default_dict, typed after its default value."""
    for k, v in default_dict.items():
        v_type = type(v)
        if v is None:
            v_type = str
        elif isinstance(v, bool):
            v_type = str2bool
        parser.add_argument(f"--{k}", default=v, type=v_type)


def args_to_dict(args: argparse.Namespace, keys: Iterable[str]) -> Dict[str, Any]:
    """Pick the given keys out of parsed arguments, as a dict (to pass as **kwargs to a factory)."""
    return {k: getattr(args, k) for k in keys}


def str2bool(v) -> bool:
    """Parse a boolean command-line value ("yes"/"true"/"t"/"y"/"1" and their negatives)."""
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    elif v.lower() in ("no", "false", "f", "n", "0"):
        return False
    else:
        raise argparse.ArgumentTypeError("boolean value expected")


def preview_diffusion_from_args(args) -> SpacedDiffusion:
    """The diffusion that --preview_interval's grids walk: the training process on training.preview's grid."""
    from .training.preview import PREVIEW_RESPACING

    return create_gaussian_diffusion(
        steps=args.diffusion_steps, learn_sigma=args.learn_sigma, noise_schedule=args.noise_schedule,
        use_kl=args.use_kl, predict_xstart=args.predict_xstart, rescale_timesteps=args.rescale_timesteps,
        rescale_learned_sigmas=args.rescale_learned_sigmas, timestep_respacing=PREVIEW_RESPACING)

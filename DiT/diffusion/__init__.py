"""
DiT's diffusion factory (DiT ``diffusion/__init__.py``), built on the project's guided_diffusion package.

DiT ships a lightly modified copy of guided-diffusion; the differences that matter for DiT (no timestep rescaling,
the "squaredcos_cap_v2" schedule name, learned-range variance by default) are all expressible with
guided_diffusion's own GaussianDiffusion / SpacedDiffusion, so nothing is copied here.
"""

from typing import Optional, Sequence, Union

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.respace import SpacedDiffusion, space_timesteps


def create_diffusion(
    timestep_respacing: Optional[Union[str, Sequence[int]]],
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> SpacedDiffusion:
    """Build DiT's diffusion: ``timestep_respacing`` "" or None keeps all steps, "250" / "ddim25" respace them."""
    betas = gd.get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = gd.LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = gd.LossType.RESCALED_MSE
    else:
        loss_type = gd.LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        model_var_type = gd.ModelVarType.LEARNED_RANGE
    elif sigma_small:
        model_var_type = gd.ModelVarType.FIXED_SMALL
    else:
        model_var_type = gd.ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=gd.ModelMeanType.START_X if predict_xstart else gd.ModelMeanType.EPSILON,
        model_var_type=model_var_type,
        loss_type=loss_type,
    )

"""
DiT's diffusion factory (DiT ``diffusion/__init__.py``), built on the project's guided_diffusion package.

DiT ships a lightly modified copy of guided-diffusion; the differences that matter for DiT (no timestep rescaling,
the "squaredcos_cap_v2" schedule name, learned-range variance by default) are all expressible with
guided_diffusion's own GaussianDiffusion / SpacedDiffusion, so nothing is copied here.
"""

from typing import Optional, Sequence, Union

from guided_diffusion.respace import SpacedDiffusion
from guided_diffusion.script_util import create_gaussian_diffusion


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
    return create_gaussian_diffusion(
        steps=diffusion_steps,
        learn_sigma=learn_sigma,
        sigma_small=sigma_small,
        noise_schedule=noise_schedule,
        use_kl=use_kl,
        predict_xstart=predict_xstart,
        rescale_timesteps=False,  # DiT always feeds the network the raw timestep
        rescale_learned_sigmas=rescale_learned_sigmas,
        timestep_respacing=timestep_respacing or "",
    )

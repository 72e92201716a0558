"""
The samplers, in one table: each name maps to a walk of GaussianDiffusion (its ``*_sample_loop``), the options the
walk is run with, and the grid it wants. Every sampling script, the flag help, DiT's scripts and the demo read
this table; guidance (classifier gradient, classifier-free guidance, interval, rescale) wraps the model or the
cond_fn before it reaches a walk, so every walk gets every guidance.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from .errors import UserError
from .unipc import UNIPC_ORDERS, UNIPC_VARIANTS


@dataclass(frozen=True)
class SamplerSpec:
    """One entry of the table: the GaussianDiffusion loop, its fixed options, and what it is for."""

    name: str
    loop: str  # the GaussianDiffusion method that runs the walk
    fixed: Mapping[str, Any] = field(default_factory=dict)  # options fixed by the name (e.g. the order of dpm++2m)
    tunable: Tuple[str, ...] = ()  # options set by flags (UniPC: order and variant)
    grid: str = "uniform"  # the grid DiT's --num-sampling-steps N becomes: "uniform" (N) or "logsnr" (logsnrN)
    summary: str = ""


#: name -> sampler. ddpm and ddim are the reference's loops; the others integrate the diffusion ODE in few steps.
SAMPLERS: Dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec("ddpm", "p_sample_loop", summary="the reference's ancestral sampling"),
        SamplerSpec("ddim", "ddim_sample_loop", summary="DDIM, eta 0"),
        SamplerSpec("dpm++2m", "dpm_solver_sample_loop", {"order": 2}, grid="logsnr",
                    summary="DPM-Solver++ multistep, order 2"),
        SamplerSpec("dpm++3m", "dpm_solver_sample_loop", {"order": 3}, grid="logsnr",
                    summary="DPM-Solver++ multistep, order 3"),
        SamplerSpec("unipc", "unipc_sample_loop", tunable=("order", "variant"), grid="logsnr",
                    summary="UniPC predictor-corrector, order --unipc_order (1-3, +1 by the corrector), B(h) "
                            "--unipc_variant (bh1 or bh2)"),
    )
}
SAMPLER_NAMES: Tuple[str, ...] = tuple(SAMPLERS)
#: The UniPC options' defaults (diffusers' UniPCMultistepScheduler: solver_order=2, solver_type="bh2").
UNIPC_DEFAULTS = {"order": 2, "variant": "bh2"}


@dataclass(frozen=True)
class SamplerChoice:
    """A sampler with its options, as the flags chose it; run() walks a diffusion with it."""

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> SamplerSpec:
        """The table entry of this choice."""
        return SAMPLERS[self.name]

    def run(self, diffusion, model_fn, shape: Sequence[int], **loop_kwargs):
        """Run the walk (noise, clip_denoised, denoised_fn, cond_fn, model_kwargs, progress) -> the final x_0."""
        loop = getattr(diffusion, self.spec.loop)
        return loop(model_fn, tuple(int(s) for s in shape), **dict(self.spec.fixed), **dict(self.options),
                    **loop_kwargs)

    def label(self) -> str:
        """A short name for file names and reports, e.g. "unipc-bh2-2" or "dpm++2m"."""
        if self.name == "unipc":
            return "unipc-%s-%d" % (self.options["variant"], self.options["order"])
        return self.name


def resolve_sampler(sampler: str, use_ddim: bool = False) -> str:
    """--sampler with --use_ddim folded in (--use_ddim True means --sampler ddim); unset means ddpm."""
    name = (sampler or "").strip().lower()
    if name and name not in SAMPLERS:
        raise UserError("unknown --sampler %r: choose one of %s" % (sampler, ", ".join(SAMPLER_NAMES)))
    if use_ddim:
        if name and name != "ddim":
            raise UserError("--use_ddim True asks for DDIM but --sampler is %s: give only one of them" % name)
        return "ddim"
    return name or "ddpm"


def sampler_choice(sampler: str, use_ddim: bool = False, unipc_order: Optional[int] = None,
                   unipc_variant: Optional[str] = None, dashed: bool = False) -> SamplerChoice:
    """The sampler and options the flags ask for; bad values raise UserError naming the flag and its choices.

    dashed: name the flags as DiT's scripts spell them (--unipc-order).
    """
    name = resolve_sampler(sampler, use_ddim)
    order = UNIPC_DEFAULTS["order"] if unipc_order is None else unipc_order
    variant = UNIPC_DEFAULTS["variant"] if unipc_variant is None else str(unipc_variant).strip().lower()
    sep = "-" if dashed else "_"
    problems = []
    if order not in UNIPC_ORDERS:
        problems.append("--unipc%sorder must be 1, 2 or 3 (got %r)" % (sep, order))
    if variant not in UNIPC_VARIANTS:
        problems.append("--unipc%svariant must be bh1 or bh2 (got %r)" % (sep, unipc_variant))
    if problems:
        raise UserError("; ".join(problems))
    options = {"order": int(order), "variant": variant} if "order" in SAMPLERS[name].tunable else {}
    return SamplerChoice(name, options)


def choice_from_args(args, dashed: bool = False) -> SamplerChoice:
    """sampler_choice from parsed flags (sampler, use_ddim, unipc_order, unipc_variant; absent ones: defaults)."""
    return sampler_choice(getattr(args, "sampler", ""), getattr(args, "use_ddim", False),
                          getattr(args, "unipc_order", None), getattr(args, "unipc_variant", None), dashed=dashed)


def as_choice(sampler) -> SamplerChoice:
    """A SamplerChoice as given, or the one a sampler name means with the default options."""
    if isinstance(sampler, SamplerChoice):
        return sampler
    return sampler_choice(sampler)


def grid_for_steps(sampler, num_steps: int) -> str:
    """The respacing DiT's scripts use for N steps: "N" (the reference's) or "logsnrN" for the ODE solvers."""
    return ("logsnr%d" % num_steps) if as_choice(sampler).spec.grid == "logsnr" else str(num_steps)


def run_sampler(diffusion, model_fn, shape: Sequence[int], sampler="ddpm", **loop_kwargs):
    """Run `sampler` (a name or a SamplerChoice) on `diffusion`; returns the final x_0 batch."""
    return as_choice(sampler).run(diffusion, model_fn, shape, **loop_kwargs)


def sampler_flag_help() -> str:
    """The --sampler help text, built from the table."""
    names = "; ".join("%s (%s)" % (s.name, s.summary) for s in SAMPLERS.values())
    return ("%s. The ODE solvers need 10-20 steps; recommended: --sampler unipc (order 2, bh2) with "
            "--timestep_respacing logsnrN, N = 10-15 (a grid uniform in log-SNR, as the solvers want; with "
            "classifier guidance at 10 model calls it kept the demo's accuracy at 0.94 where DPM-Solver++ 2M on "
            "ddim10 fell to 0.81, bench/RESULTS.md); unset: ddpm, or ddim with --use_ddim True" % names)

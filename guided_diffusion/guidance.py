"""
Guidance for sampling: classifier guidance (Dhariwal & Nichol) and classifier-free guidance (Ho & Salimans).

classifier_cond_fn builds the cond_fn that classifier_sample.py passes to the diffusion sampling loops;
ClassifierFreeGuidance wraps a conditional model (and an unconditional model or a null label) into one model.
Both take a guidance interval (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample
and Distribution Quality in Diffusion Models"): guidance acts only at timesteps LO <= t <= HI of the original
0..T-1 scale, elsewhere the conditional prediction is used alone. Classifier-free guidance also takes the rescale
of Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed", Eq. 15-16), as diffusers'
rescale_noise_cfg.
"""

from typing import Any, Callable, Optional, Tuple

import jittor as jt
import numpy as np

from .errors import UserError


def _labels_var(y: Any) -> jt.Var:
    """Labels as an int32 Var (numpy arrays and lists are accepted)."""
    if isinstance(y, jt.Var):
        return y
    return jt.array(np.asarray(y).astype(np.int32))


Interval = Optional[Tuple[int, int]]


def parse_guidance_interval(text: str, num_timesteps: int = 1000, flag: str = "--guidance_interval") -> Interval:
    """"LO,HI" -> (LO, HI) with 0 <= LO <= HI <= num_timesteps - 1; "" -> None (guidance at every step)."""
    text = (text or "").strip()
    if not text:
        return None
    parts = text.split(",")
    try:
        lo, hi = (int(p) for p in parts)
    except ValueError:
        raise UserError("%s %r: give two timesteps LO,HI (e.g. %s 0,700), or leave it empty to guide at every "
                        "step" % (flag, text, flag)) from None
    if not 0 <= lo <= hi <= num_timesteps - 1:
        raise UserError("%s %s: LO and HI are timesteps of the original 0..%d scale with LO <= HI (e.g. %s "
                        "0,%d)" % (flag, text, num_timesteps - 1, flag, int(0.7 * num_timesteps)))
    return lo, hi


def timestep_scale(args) -> float:
    """How the model sees timestep t of the flags' diffusion: t * 1000 / T with --rescale_timesteps, else t."""
    if getattr(args, "rescale_timesteps", False):
        return 1000.0 / getattr(args, "diffusion_steps", 1000)
    return 1.0


def interval_mask(t: jt.Var, interval: Interval, timestep_scale: float = 1.0) -> np.ndarray:
    """Per sample, whether its timestep lies in the interval (all True without one). t arrives as the model sees
    it: original timesteps times timestep_scale (1000 / T for models with rescale_timesteps)."""
    steps = np.asarray(t.numpy(), dtype=np.float64).reshape(-1) / timestep_scale
    if interval is None:
        return np.ones(steps.shape, dtype=bool)
    # Rounding undoes the float scaling of rescale_timesteps; integer timesteps are unchanged by it.
    steps = np.round(steps)
    return (steps >= interval[0]) & (steps <= interval[1])


def classifier_cond_fn(classifier: Callable, scale: float, interval: Interval = None,
                       timestep_scale: float = 1.0) -> Callable[..., jt.Var]:
    """Make cond_fn(x, t, y) = scale * d/dx log softmax(classifier(x, t))[y], each sample with its own label y;
    zero (and no classifier call) at timesteps outside `interval`."""

    def cond_fn(x: jt.Var, t: jt.Var, y: Optional[jt.Var] = None, **kwargs) -> jt.Var:
        assert y is not None, "classifier guidance needs the target labels y (model_kwargs['y'])"
        if interval is not None:
            inside = interval_mask(t, interval, timestep_scale)
            if not inside.any():
                return jt.zeros_like(x)
            if not inside.all():
                mask = jt.array(inside.astype(np.float32)).reshape([-1] + [1] * (len(x.shape) - 1))
                return _classifier_gradient(classifier, x, t, y, scale) * mask
        return _classifier_gradient(classifier, x, t, y, scale)

    return cond_fn


def _classifier_gradient(classifier: Callable, x: jt.Var, t: jt.Var, y: Any, scale: float) -> jt.Var:
    """scale * d/dx log softmax(classifier(x, t))[y]."""
    y = _labels_var(y)
    with jt.enable_grad():
        x_in = x.detach()
        x_in.start_grad()
        logits = classifier(x_in, t)
        log_probs = jt.nn.log_softmax(logits.float32(), dim=-1)
        # Row i takes column y[i]: every sample is pushed towards its own class. The samples do not interact
        # in the classifier, so the gradient of the sum is each sample's own gradient.
        selected = jt.gather(log_probs, 1, y.reshape(-1, 1))
        grad = jt.grad(selected.sum(), x_in)
    return grad * scale


class ClassifierFreeGuidance:
    """A model wrapper returning eps = (1 + w) * eps_cond - w * eps_uncond (classifier-free guidance).

    Only the noise prediction (the first C output channels, C = the input channels) is guided; learned-variance
    channels, when present, come from the conditional output. Two modes:

    * two models: ``ClassifierFreeGuidance(cond_model, w, uncond_model=uncond_model)``; the unconditional model is
      called without labels;
    * one model with a null label: ``ClassifierFreeGuidance(model, w, null_label=K)``; the unconditional pass uses
      label K (the extra row of a ``num_classes + 1`` label table). Both passes run as one doubled batch.

    The wrapper is called like a model: ``wrapper(x, t, y=labels, **other_model_kwargs)``. With an `interval`,
    timesteps outside it get the conditional output alone (the unconditional pass is skipped); `rescale` > 0
    rescales the guided noise prediction as diffusers' rescale_noise_cfg.
    """

    def __init__(
        self,
        cond_model: Callable,
        guidance_scale: float,
        *,
        uncond_model: Optional[Callable] = None,
        null_label: Optional[int] = None,
        interval: Interval = None,
        rescale: float = 0.0,
        timestep_scale: float = 1.0,
    ):
        if (uncond_model is None) == (null_label is None):
            raise ValueError("give exactly one of uncond_model (two-model mode) or null_label (one-model mode)")
        self.cond_model = cond_model
        self.uncond_model = uncond_model
        self.null_label = null_label
        self.guidance_scale = float(guidance_scale)
        self.interval = interval
        self.rescale = float(rescale)
        self.timestep_scale = timestep_scale

    def __call__(self, x: jt.Var, t: jt.Var, y: Optional[jt.Var] = None, **kwargs) -> jt.Var:
        assert y is not None, "classifier-free guidance needs the class labels y (model_kwargs['y'])"
        y = _labels_var(y)
        inside = None
        if self.interval is not None:
            inside = interval_mask(t, self.interval, self.timestep_scale)
            if not inside.any():
                return self.cond_model(x, t, y=y, **kwargs)
            inside = None if inside.all() else inside
        if self.uncond_model is not None:
            cond_out = self.cond_model(x, t, y=y, **kwargs)
            uncond_out = self.uncond_model(x, t, **kwargs)
        else:
            n = x.shape[0]
            null = jt.zeros_like(y) + self.null_label
            doubled_kwargs = {k: (jt.concat([v, v], dim=0) if isinstance(v, jt.Var) else v) for k, v in kwargs.items()}
            out = self.cond_model(
                jt.concat([x, x], dim=0), jt.concat([t, t], dim=0), y=jt.concat([y, null], dim=0), **doubled_kwargs
            )
            cond_out, uncond_out = out[:n], out[n:]
        out = guided_output(cond_out, uncond_out, self.guidance_scale, x.shape[1], rescale=self.rescale)
        if inside is not None:  # a batch mixing timesteps in and out of the interval
            mask = jt.array(inside.astype(np.float32)).reshape([-1] + [1] * (len(x.shape) - 1))
            out = mask * out + (1.0 - mask) * cond_out
        return out


def guided_output(cond_out: jt.Var, uncond_out: jt.Var, guidance_scale: float, channels: int,
                  rescale: float = 0.0) -> jt.Var:
    """Combine conditional and unconditional outputs: guide the first `channels` (eps), keep the rest (variance)."""
    w = guidance_scale
    eps = (1.0 + w) * cond_out[:, :channels] - w * uncond_out[:, :channels]
    if rescale:
        eps = rescale_noise_cfg(eps, cond_out[:, :channels], rescale)
    if cond_out.shape[1] == channels:
        return eps
    return jt.concat([eps, cond_out[:, channels:]], dim=1)


def _sample_std(v: jt.Var) -> jt.Var:
    """Per-sample standard deviation over all other axes, with Bessel's correction (torch.std's default)."""
    flat = v.reshape(v.shape[0], -1)
    centred = flat - flat.mean(dim=1, keepdims=True)
    var = (centred * centred).sum(dim=1) / (flat.shape[1] - 1)
    return var.sqrt().reshape([-1] + [1] * (len(v.shape) - 1))


def rescale_noise_cfg(guided: jt.Var, cond: jt.Var, phi: float) -> jt.Var:
    """Lin et al. 2023, Eq. 15-16 (diffusers' rescale_noise_cfg): phi * guided * std(cond) / std(guided) +
    (1 - phi) * guided, the standard deviations taken per sample."""
    rescaled = guided * (_sample_std(cond) / _sample_std(guided))
    return phi * rescaled + (1.0 - phi) * guided

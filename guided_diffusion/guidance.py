"""
Guidance for sampling: classifier guidance (Dhariwal & Nichol) and classifier-free guidance (Ho & Salimans).

classifier_cond_fn builds the cond_fn that classifier_sample.py passes to the diffusion sampling loops;
ClassifierFreeGuidance wraps a conditional model (and an unconditional model or a null label) into one model.
"""

from typing import Any, Callable, Optional

import jittor as jt
import numpy as np


def _labels_var(y: Any) -> jt.Var:
    """Labels as an int32 Var (numpy arrays and lists are accepted)."""
    if isinstance(y, jt.Var):
        return y
    return jt.array(np.asarray(y).astype(np.int32))


def classifier_cond_fn(classifier: Callable, scale: float) -> Callable[..., jt.Var]:
    """Make cond_fn(x, t, y) = scale * d/dx log softmax(classifier(x, t))[y], each sample with its own label y."""

    def cond_fn(x: jt.Var, t: jt.Var, y: Optional[jt.Var] = None, **kwargs) -> jt.Var:
        assert y is not None, "classifier guidance needs the target labels y (model_kwargs['y'])"
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

    return cond_fn


class ClassifierFreeGuidance:
    """A model wrapper returning eps = (1 + w) * eps_cond - w * eps_uncond (classifier-free guidance).

    Only the noise prediction (the first C output channels, C = the input channels) is guided; learned-variance
    channels, when present, come from the conditional output. Two modes:

    * two models: ``ClassifierFreeGuidance(cond_model, w, uncond_model=uncond_model)``; the unconditional model is
      called without labels;
    * one model with a null label: ``ClassifierFreeGuidance(model, w, null_label=K)``; the unconditional pass uses
      label K (the extra row of a ``num_classes + 1`` label table). Both passes run as one doubled batch.

    The wrapper is called like a model: ``wrapper(x, t, y=labels, **other_model_kwargs)``.
    """

    def __init__(
        self,
        cond_model: Callable,
        guidance_scale: float,
        *,
        uncond_model: Optional[Callable] = None,
        null_label: Optional[int] = None,
    ):
        if (uncond_model is None) == (null_label is None):
            raise ValueError("give exactly one of uncond_model (two-model mode) or null_label (one-model mode)")
        self.cond_model = cond_model
        self.uncond_model = uncond_model
        self.null_label = null_label
        self.guidance_scale = float(guidance_scale)

    def __call__(self, x: jt.Var, t: jt.Var, y: Optional[jt.Var] = None, **kwargs) -> jt.Var:
        assert y is not None, "classifier-free guidance needs the class labels y (model_kwargs['y'])"
        y = _labels_var(y)
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
        return guided_output(cond_out, uncond_out, self.guidance_scale, x.shape[1])


def guided_output(cond_out: jt.Var, uncond_out: jt.Var, guidance_scale: float, channels: int) -> jt.Var:
    """Combine conditional and unconditional outputs: guide the first `channels` (eps), keep the rest (variance)."""
    w = guidance_scale
    eps = (1.0 + w) * cond_out[:, :channels] - w * uncond_out[:, :channels]
    if cond_out.shape[1] == channels:
        return eps
    return jt.concat([eps, cond_out[:, channels:]], dim=1)

"""
Flags -> loaded models for the scripts that use trained checkpoints (sampling, bits/dim, the demo).

The checks run before anything heavy is built (so InputCheck can report every problem at once): counts, a
--timestep_respacing that fits --diffusion_steps, checkpoint files that exist, --class_labels in range. The loaders
build the model (and diffusion) or classifier from the script_util flags and load the checkpoint strictly, with a
CheckpointError naming the fitting flags on a mismatch.
"""

import os
from typing import Any, Callable, Iterable, List, Mapping, Optional

import numpy as np

from . import dist_util, script_util, state_dicts
from .errors import CheckpointError, UserError
from .gaussian_diffusion import get_named_beta_schedule
from .respace import space_timesteps


def check_respacing(timestep_respacing: str, diffusion_steps: int, use_ddim: bool = False,
                    noise_schedule: str = "linear") -> None:
    """Refuse a --timestep_respacing that does not fit --diffusion_steps (every sampler takes any spacing)."""
    spacing = (timestep_respacing or "").strip()
    if not spacing:
        return
    try:
        betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    except (NotImplementedError, ValueError):
        raise UserError("unknown --noise_schedule %r: use linear or cosine" % noise_schedule) from None
    try:
        kept = space_timesteps(diffusion_steps, spacing, betas=betas)
    except ValueError as exc:
        raise UserError("--timestep_respacing %r does not fit --diffusion_steps %d (%s); use e.g. 250 or ddim25"
                        % (timestep_respacing, diffusion_steps, exc)) from None
    if not kept:
        raise UserError("--timestep_respacing %r keeps no step; use e.g. 250 or ddim25" % timestep_respacing)


def check_count(value: int, flag: str) -> None:
    """Refuse a count flag (--num_samples, --batch_size, ...) below 1."""
    if value < 1:
        raise UserError("%s must be at least 1 (got %d)" % (flag, value))


def parse_class_labels(spec: str, num_classes: int) -> Optional[List[int]]:
    """--class_labels "1,2,3" -> [1, 2, 3] (checked against the number of classes); "" -> None (random)."""
    spec = (spec or "").strip()
    if not spec:
        return None
    try:
        labels = [int(s) for s in spec.replace(" ", ",").split(",") if s]
    except ValueError:
        raise UserError("--class_labels must be comma-separated class ids such as 1,2,3; got %r" % spec) from None
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad or not labels:
        raise UserError("--class_labels %s: class ids must lie in 0..%d for this model" % (spec, num_classes - 1))
    return labels


def require_file(path: str, *, what: str, flag: str) -> None:
    """Fail early (before building anything) when a checkpoint flag is empty or names no file."""
    if not path:
        raise UserError("%s is required: give the %s checkpoint (.pt)" % (flag, what))
    if "://" not in path and not os.path.isfile(path):
        raise CheckpointError("%s %s: %s file not found; check the path (scripts/download_models.py downloads "
                              "the released checkpoints)" % (flag, path, what))


def load_weights(module, path: str, *, what: str = "model", flag: str = "--model_path") -> None:
    """Load a checkpoint into `module` strictly (a clear CheckpointError naming fitting flags on mismatch)."""
    require_file(path, what=what, flag=flag)
    state = dist_util.load_state_dict(path, map_location="cpu")
    if isinstance(state, Mapping) and not any(isinstance(v, np.ndarray) for v in state.values()):
        for key in ("ema", "model", "state_dict"):  # a training checkpoint holding the state dict inside
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping):
        raise CheckpointError("%s %s does not hold a state dict (found %s)" % (flag, path, type(state).__name__))
    state_dicts.load_state_dict_strict(module, state, source="%s %s" % (flag, path))


def build_from_flags(factory: Callable, kwargs: Mapping[str, Any]):
    """factory(**kwargs) (a script_util builder), with flags that cannot build a model reported as a UserError."""
    try:
        return factory(**kwargs)
    except UserError:
        raise
    except (ValueError, AssertionError) as exc:
        raise UserError("the model flags cannot build a model: %s" % (exc or type(exc).__name__)) from None


def load_model_and_diffusion(args, keys: Iterable[str], *, model_path: str, flag: str = "--model_path",
                             factory: Optional[Callable] = None, **overrides):
    """Build (model, diffusion) from the flags in `keys`, load `model_path` strictly, convert to fp16 if asked."""
    factory = factory or script_util.create_model_and_diffusion
    kwargs = script_util.args_to_dict(args, keys)
    kwargs.update(overrides)
    check_respacing(kwargs.get("timestep_respacing", ""), kwargs.get("diffusion_steps", 1000),
                    noise_schedule=kwargs.get("noise_schedule", "linear"))
    require_file(model_path, what="diffusion model", flag=flag)
    model, diffusion = build_from_flags(factory, kwargs)
    load_weights(model, model_path, what="diffusion model", flag=flag)
    if kwargs.get("use_fp16"):
        model.convert_to_fp16()
    model.eval()
    return model, diffusion


def load_classifier(args):
    """Build the classifier from the classifier_* flags and load --classifier_path strictly."""
    kwargs = script_util.args_to_dict(args, script_util.classifier_defaults().keys())
    require_file(args.classifier_path, what="classifier", flag="--classifier_path")
    classifier = build_from_flags(script_util.create_classifier, kwargs)
    load_weights(classifier, args.classifier_path, what="classifier", flag="--classifier_path")
    if kwargs.get("classifier_use_fp16"):
        classifier.convert_to_fp16()
    classifier.eval()
    return classifier

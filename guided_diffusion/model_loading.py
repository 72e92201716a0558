"""
Flags -> loaded models for the scripts that use trained checkpoints (sampling, bits/dim, the demo).

The checks run before anything heavy is built (so InputCheck can report every problem at once): counts, a
--timestep_respacing that fits --diffusion_steps, checkpoint files that exist, --class_labels in range. The loaders
build the model (and diffusion) or classifier from the script_util flags and load the checkpoint strictly, with a
CheckpointError naming the fitting flags on a mismatch.
"""

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Union

import numpy as np

from . import class_labels, dist_util, script_util, state_dicts
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


@dataclass
class TrainedClasses:
    """The classes a sampling script draws labels from: ids 0..count-1, named by classes.json when there is one."""

    count: int
    names: Optional[List[str]] = None
    source: str = ""  # where the list came from, for the log

    def describe(self) -> str:
        """One log line: how many classes labels are drawn from, and where that number comes from."""
        return "class labels are drawn from %d classes (%s)" % (self.count, self.source)


def trained_classes(model_path: str, num_classes: int, flag: str = "--model_path", levels: int = 1,
                    num_classes_flag: str = "--num_classes") -> TrainedClasses:
    """The classes a checkpoint was trained on: the classes.json beside it (written by the training scripts; levels=2
    also one folder up, DiT's experiment folder) when present, else the label table's --num_classes rows; a
    UserError when classes.json lists more than that."""
    found = class_labels.classes_beside(model_path, levels)
    if found is None:
        return TrainedClasses(num_classes, None, "%s %d; no %s beside %s %s"
                              % (num_classes_flag, num_classes, class_labels.CLASSES_FILE, flag, model_path))
    names = class_labels.read_classes(found)
    if not names:
        raise UserError("%s lists no classes: fix or remove it" % found)
    if len(names) > num_classes:
        raise UserError("%s lists %d classes but the model is built with %s %d: pass %s with the value used in "
                        "training (at least %d)" % (found, len(names), num_classes_flag, num_classes,
                                                    num_classes_flag, len(names)))
    return TrainedClasses(len(names), names, found)


def _class_id(token: str, names: Optional[Sequence[str]], count: int) -> int:
    """One --class_labels entry: a class name of classes.json, or an id; "id:N" / "name:X" say which."""
    if token.startswith("id:"):
        return int(token[3:])
    if token.startswith("name:"):
        token = token[5:]
        if not names or token not in names:
            raise ValueError(token)
        return names.index(token)
    as_int = None
    try:
        as_int = int(token)
    except ValueError:
        pass
    if names and token in names:
        index = names.index(token)
        if as_int is not None and as_int != index and 0 <= as_int < count:
            raise UserError("--class_labels %s is both the class named %r (id %d) and the class id %d: write "
                            "name:%s or id:%s" % (token, token, index, as_int, token, token))
        return index
    if as_int is None:
        raise ValueError(token)
    return as_int


def parse_class_labels(spec: str, num_classes: Union[int, TrainedClasses],
                       flag: str = "--class_labels") -> Optional[List[int]]:
    """--class_labels "1,2,3" -> [1, 2, 3], or class names of classes.json ("cat,dog" -> their ids), checked
    against the classes the model was trained on (an int: that many classes, unnamed); "" -> None (random)."""
    classes = num_classes if isinstance(num_classes, TrainedClasses) else TrainedClasses(int(num_classes))
    spec = (spec or "").strip()
    if not spec:
        return None
    if not classes.names:
        spec = spec.replace(" ", ",")  # "1 2 3" as the reference's scripts took it
    labels = []
    for token in (s.strip() for s in spec.split(",")):
        if not token:
            continue
        try:
            labels.append(_class_id(token, classes.names, classes.count))
        except ValueError:
            if classes.names:
                shown = ", ".join(classes.names[:20]) + (", ..." if len(classes.names) > 20 else "")
                raise UserError("%s %s: %r is neither a class id (0..%d) nor a class name of %s (%s)"
                                % (flag, spec, token, classes.count - 1, classes.source, shown)) from None
            raise UserError("%s must be comma-separated class ids such as 1,2,3; got %r (class names "
                            "need a %s beside the checkpoint)" % (flag, spec, class_labels.CLASSES_FILE)) from None
    bad = [y for y in labels if not 0 <= y < classes.count]
    if bad or not labels:
        raise UserError("%s %s: class ids must lie in 0..%d for this model (%s)"
                        % (flag, spec, classes.count - 1, classes.source or "its classes"))
    return labels


def require_file(path: str, *, what: str, flag: str) -> None:
    """Fail early (before building anything) when a checkpoint flag is empty or names no file."""
    if not path:
        raise UserError("%s is required: give the %s checkpoint (.pt)" % (flag, what))
    if "://" not in path and not os.path.isfile(path):
        raise CheckpointError("%s %s: %s file not found; check the path (scripts/download_models.py downloads "
                              "the released checkpoints)" % (flag, path, what))


def read_state_dict(path: str, flag: str = "--model_path") -> Mapping[str, Any]:
    """The state dict of a checkpoint file: a bare state dict (the released files), or the "ema", "model" or
    "state_dict" entry of a training checkpoint (DiT's {"model", "ema", "opt", "args"}), in that order."""
    state = dist_util.load_state_dict(path, map_location="cpu")
    if isinstance(state, Mapping) and not any(isinstance(v, np.ndarray) for v in state.values()):
        for key in ("ema", "model", "state_dict"):  # a training checkpoint holding the state dict inside
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping):
        raise CheckpointError("%s %s does not hold a state dict (found %s)" % (flag, path, type(state).__name__))
    return state


def load_weights(module, path: str, *, what: str = "model", flag: str = "--model_path") -> None:
    """Load a checkpoint into `module` strictly (a clear CheckpointError naming fitting flags on mismatch)."""
    require_file(path, what=what, flag=flag)
    state = read_state_dict(path, flag)
    state_dicts.load_state_dict_strict(module, state, source="%s %s" % (flag, path))


def finetune_from(module, path: str, *, flag: str = "--finetune_from",
                  log: Optional[Callable[[str], None]] = None) -> state_dicts.FinetuneReport:
    """Start `module` (freshly built, seeded) from a checkpoint with another class count: every tensor whose name
    and shape fit is loaded, the label table / classifier output that does not fit stays fresh
    (state_dicts.load_state_dict_for_finetuning); the report's table is passed to `log`. A CheckpointError names
    the flags when the architectures differ otherwise."""
    require_file(path, what="checkpoint to fine-tune from", flag=flag)
    state = read_state_dict(path, flag)
    report = state_dicts.load_state_dict_for_finetuning(module, state, source="%s %s" % (flag, path))
    if log is not None:
        for line in report.table().split("\n"):
            log(line)
    return report


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

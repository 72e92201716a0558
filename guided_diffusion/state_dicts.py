"""
State dicts of Jittor modules: a numpy copy of a module's weights, the strict loader whose one error lists
missing keys, unexpected keys and shape mismatches, with the command-line flags that would fit where it can tell
(``_flag_hints``: the UNet's and DiT's key names, beside the loader that raises the error), and the fine-tuning
loader (``load_state_dict_for_finetuning``), which lets only the class-dependent tensors differ (the label table,
a classifier's output layer), leaves those as the freshly built model has them, and reports what it did.
"""

import collections
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Set, Tuple

import jittor as jt
import numpy as np

from .errors import CheckpointError

# The parameters of a classifier's output layer (EncoderUNetModel.out), by --classifier_pool.
_CLASSIFIER_OUTPUT_KEYS = {
    "attention": ("out.2.c_proj.weight", "out.2.c_proj.bias"),
    "adaptive": ("out.3.weight", "out.3.bias"),
    "spatial": ("out.2.weight", "out.2.bias"),
    "spatial_v2": ("out.3.weight", "out.3.bias"),
}


def module_state_dict(module) -> "collections.OrderedDict[str, np.ndarray]":
    """A numpy copy of every parameter of a Jittor module, keyed like PyTorch's state_dict()."""
    out = collections.OrderedDict()
    for name, value in module.state_dict().items():
        arr = value.numpy() if hasattr(value, "numpy") else np.asarray(value)
        out[name] = np.array(arr, copy=True)
    return out


# (key, condition on the checkpoint, hint) rules that name the flags a checkpoint was trained with.
def _flag_hints(model_shapes: Mapping[str, tuple], ckpt_shapes: Mapping[str, tuple]) -> List[str]:
    hints: List[str] = []
    if "label_emb.weight" in ckpt_shapes and "label_emb.weight" not in model_shapes:
        n = ckpt_shapes["label_emb.weight"][0]
        hints.append("the checkpoint is class-conditional (label_emb.weight with %d classes): use --class_cond True" % n)
    if "label_emb.weight" in model_shapes and "label_emb.weight" not in ckpt_shapes:
        hints.append("the checkpoint is unconditional (no label_emb.weight): use --class_cond False")
    if "label_emb.weight" in model_shapes and "label_emb.weight" in ckpt_shapes:
        m, c = model_shapes["label_emb.weight"][0], ckpt_shapes["label_emb.weight"][0]
        if m != c:
            hints.append("the checkpoint's label table has %d rows, the model %d: use --num_classes %d (a "
                         "classifier-free model from free_train.py has --num_classes + 1 rows: --num_classes %d "
                         "there)" % (c, m, c, c - 1))
    key = "out.2.c_proj.weight"
    if key in ckpt_shapes and key in model_shapes and ckpt_shapes[key][0] != model_shapes[key][0]:
        hints.append("the checkpoint's classifier has %d outputs, the model %d: use --num_classes %d"
                     % (ckpt_shapes[key][0], model_shapes[key][0], ckpt_shapes[key][0]))
    key = "y_embedder.embedding_table.weight"
    if key in ckpt_shapes and key in model_shapes and ckpt_shapes[key][0] != model_shapes[key][0]:
        hints.append("the DiT checkpoint's label table has %d rows (with the null class), the model %d: use "
                     "--num-classes %d" % (ckpt_shapes[key][0], model_shapes[key][0], ckpt_shapes[key][0] - 1))
    for key in ("out.2.weight", "final_layer.linear.weight"):
        if key in ckpt_shapes and key in model_shapes and ckpt_shapes[key] != model_shapes[key]:
            c0, m0 = ckpt_shapes[key][0], model_shapes[key][0]
            if key == "out.2.weight" and len(ckpt_shapes[key]) == 4:
                if c0 == 2 * m0:
                    hints.append("the checkpoint predicts a variance (%d output channels): use --learn_sigma True" % c0)
                elif m0 == 2 * c0:
                    hints.append("the checkpoint has %d output channels (no learned variance): use --learn_sigma False" % c0)
    if "time_embed.0.weight" in ckpt_shapes and "time_embed.0.weight" in model_shapes:
        c, m = ckpt_shapes["time_embed.0.weight"], model_shapes["time_embed.0.weight"]
        if c != m:
            hints.append("the checkpoint was trained with --num_channels %d (the model has %d)" % (c[1], m[1]))
    if "input_blocks.0.0.weight" in ckpt_shapes and "input_blocks.0.0.weight" in model_shapes:
        c, m = ckpt_shapes["input_blocks.0.0.weight"], model_shapes["input_blocks.0.0.weight"]
        if c[1] != m[1]:
            hints.append("the checkpoint takes %d input channels, the model %d (a super-resolution model takes 6)"
                         % (c[1], m[1]))
    n_in_ckpt = len({k.split(".")[1] for k in ckpt_shapes if k.startswith("input_blocks.")})
    n_in_model = len({k.split(".")[1] for k in model_shapes if k.startswith("input_blocks.")})
    if n_in_ckpt and n_in_model and n_in_ckpt != n_in_model:
        hints.append("the checkpoint has %d input blocks, the model %d: check --image_size, --channel_mult and "
                     "--num_res_blocks (or --classifier_depth)" % (n_in_ckpt, n_in_model))
    attn_ckpt = sorted(k for k in ckpt_shapes if k.endswith(".qkv.weight"))
    attn_model = sorted(k for k in model_shapes if k.endswith(".qkv.weight"))
    if attn_ckpt != attn_model and not hints:
        hints.append("the attention layers differ: check --attention_resolutions (or "
                     "--classifier_attention_resolutions)")
    if "pos_embed" in ckpt_shapes and "pos_embed" in model_shapes and ckpt_shapes["pos_embed"] != model_shapes["pos_embed"]:
        hints.append("the DiT checkpoint has %d tokens, the model %d: check --model and --image-size"
                     % (ckpt_shapes["pos_embed"][1], model_shapes["pos_embed"][1]))
    return hints


def _differences(params: Mapping[str, Any], state_dict: Mapping[str, Any]):
    """(model shapes, checkpoint shapes, missing keys, unexpected keys, keys whose shapes differ)."""
    model_shapes = {k: tuple(v.shape) for k, v in params.items()}
    ckpt_shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    missing = [k for k in params if k not in state_dict]
    unexpected = [k for k in state_dict if k not in params]
    mismatched = [
        k for k in params if k in state_dict and ckpt_shapes[k] != model_shapes[k]
        and not (np.prod(ckpt_shapes[k]) == np.prod(model_shapes[k]) == 1)
    ]
    return model_shapes, ckpt_shapes, missing, unexpected, mismatched


def _assign(var, value, shape) -> None:
    """Copy a numpy value into a parameter, cast to its dtype and shape."""
    value = np.asarray(value)
    target = np.dtype(str(var.dtype)) if str(var.dtype) != "bool" else np.bool_
    var.assign(jt.array(value.astype(target, copy=False).reshape(shape)))


def load_state_dict_strict(module, state_dict: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Copy `state_dict` into `module`, failing with one clear error unless keys and shapes match exactly."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError("%s does not hold a state dict (found %s)" % (source, type(state_dict).__name__))
    params = module.state_dict()
    model_shapes, ckpt_shapes, missing, unexpected, mismatched = _differences(params, state_dict)
    if missing or unexpected or mismatched:
        raise _mismatch_error(source, "does not fit the model built from the flags:", missing, unexpected,
                              mismatched, model_shapes, ckpt_shapes)
    for name, var in params.items():
        _assign(var, state_dict[name], model_shapes[name])


def _mismatch_error(source: str, headline: str, missing: List[str], unexpected: List[str], mismatched: List[str],
                    model_shapes: Mapping[str, tuple], ckpt_shapes: Mapping[str, tuple],
                    footer: str = "") -> CheckpointError:
    """One CheckpointError listing the differences and the flags that would fit (hints from the keys of
    model_shapes/ckpt_shapes)."""
    lines = ["%s %s" % (source, headline)]

    def listing(title, keys, fmt):
        if keys:
            shown = keys[:12]
            lines.append("  %s (%d): %s%s" % (title, len(keys), ", ".join(fmt(k) for k in shown),
                                              ", ..." if len(keys) > len(shown) else ""))

    listing("missing keys", missing, str)
    listing("unexpected keys", unexpected, str)
    listing("shape mismatches", mismatched,
            lambda k: "%s checkpoint %s vs model %s" % (k, ckpt_shapes[k], model_shapes[k]))
    hints = _flag_hints(model_shapes, ckpt_shapes)
    if hints:
        lines.append("  likely fix: " + "; ".join(hints))
    else:
        lines.append("  pass the same model flags that were used to train the checkpoint")
    if footer:
        lines.append("  " + footer)
    return CheckpointError("\n".join(lines))


# ------------------------------------------------------------------------------------------------- fine-tuning


def class_dependent_keys(module) -> Set[str]:
    """The parameter names whose shapes follow the class count, which fine-tuning may re-initialise: the UNet's
    label table (label_emb.weight, also when only the checkpoint or only the model has one), DiT's label table
    (y_embedder.embedding_table.weight), an EncoderUNetModel classifier's output layer (by its pool)."""
    if hasattr(module, "y_embedder"):
        return {"y_embedder.embedding_table.weight"}
    pool = getattr(module, "pool", None)
    if isinstance(pool, str) and pool in _CLASSIFIER_OUTPUT_KEYS:
        return set(_CLASSIFIER_OUTPUT_KEYS[pool])
    return {"label_emb.weight"}


@dataclass
class FinetuneReport:
    """What load_state_dict_for_finetuning did: the tensors loaded, those left as the fresh model has them (with
    why), and the checkpoint's tensors it did not use."""

    source: str
    loaded: List[str] = field(default_factory=list)
    reinitialised: List[Tuple[str, str]] = field(default_factory=list)  # (model key, reason)
    unused: List[Tuple[str, str]] = field(default_factory=list)  # (checkpoint key, reason)
    shapes: Dict[str, Tuple[tuple, tuple]] = field(default_factory=dict)  # key -> (checkpoint shape, model shape)

    def table(self) -> str:
        """The report as aligned text: loaded tensors grouped by top-level module, then every tensor not loaded."""
        groups: "collections.OrderedDict[str, int]" = collections.OrderedDict()
        for key in self.loaded:
            top = key.split(".")[0]
            groups[top] = groups.get(top, 0) + 1
        lines = ["fine-tuning from %s:" % self.source,
                 "  loaded %d tensor(s): %s" % (len(self.loaded), ", ".join("%s (%d)" % kv for kv in groups.items())
                                                 or "none")]
        rows = [(key, "re-initialised", reason) for key, reason in self.reinitialised]
        rows += [(key, "not used", reason) for key, reason in self.unused]
        if rows:
            width = max(len(r[0]) for r in rows)
            lines.append("  %-*s  %-14s  %-24s  %s" % (width, "tensor", "action", "checkpoint -> model", "why"))
            for key, action, reason in rows:
                ckpt, model = self.shapes.get(key, (None, None))
                shapes = "%s -> %s" % (_shape_text(ckpt), _shape_text(model))
                lines.append("  %-*s  %-14s  %-24s  %s" % (width, key, action, shapes, reason))
        else:
            lines.append("  every tensor of the model was loaded")
        return "\n".join(lines)


def _shape_text(shape) -> str:
    return "-" if shape is None else "x".join(str(d) for d in shape) or "scalar"


def load_state_dict_for_finetuning(module, state_dict: Mapping[str, Any],
                                   source: str = "checkpoint") -> FinetuneReport:
    """Load every tensor of `state_dict` whose name and shape fit `module`; the class-dependent tensors that do not
    fit (class_dependent_keys: a label table with another class count, a classifier's output layer) keep the
    values the freshly built module has. Any other difference raises the strict loader's CheckpointError, naming
    the flags that would fit. Returns a FinetuneReport (its table() says what was loaded and what was not)."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError("%s does not hold a state dict (found %s)" % (source, type(state_dict).__name__))
    params = module.state_dict()
    model_shapes, ckpt_shapes, missing, unexpected, mismatched = _differences(params, state_dict)
    allowed = class_dependent_keys(module)
    refused = [k for k in missing + unexpected + mismatched if k not in allowed]
    if refused:
        keep = lambda keys: [k for k in keys if k not in allowed]  # noqa: E731
        raise _mismatch_error(
            source, "differs from the model built from the flags beyond the class-dependent layers (%s), so it "
            "cannot be fine-tuned from:" % ", ".join(sorted(allowed)), keep(missing), keep(unexpected),
            keep(mismatched), {k: v for k, v in model_shapes.items() if k not in allowed},
            {k: v for k, v in ckpt_shapes.items() if k not in allowed},
            footer="fine-tuning keeps every layer but the label table and a classifier's output layer: pass the "
                   "checkpoint's architecture flags and change only --num_classes")
    report = FinetuneReport(source)
    for key in missing:
        report.reinitialised.append((key, "not in the checkpoint: as in a fresh model"))
        report.shapes[key] = (None, model_shapes[key])
    for key in mismatched:
        report.reinitialised.append((key, "the class count differs: as in a fresh model"))
        report.shapes[key] = (ckpt_shapes[key], model_shapes[key])
    for key in unexpected:
        report.unused.append((key, "the model has no such tensor"))
        report.shapes[key] = (ckpt_shapes[key], None)
    for name, var in params.items():
        if name in state_dict and name not in mismatched:
            _assign(var, state_dict[name], model_shapes[name])
            report.loaded.append(name)
    return report

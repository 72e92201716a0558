"""
State dicts of Jittor modules: a numpy copy of a module's weights, and the strict loader whose one error lists
missing keys, unexpected keys and shape mismatches, with the command-line flags that would fit where it can tell
(``_flag_hints``: the UNet's and DiT's key names, beside the loader that raises the error).
"""

import collections
from typing import Any, List, Mapping

import jittor as jt
import numpy as np

from .errors import CheckpointError



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
            hints.append("the checkpoint's label table has %d rows, the model %d (a classifier-free model from "
                         "free_train.py has --num_classes + 1 rows)" % (c, m))
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


def load_state_dict_strict(module, state_dict: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Copy `state_dict` into `module`, failing with one clear error unless keys and shapes match exactly."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError("%s does not hold a state dict (found %s)" % (source, type(state_dict).__name__))
    params = module.state_dict()
    model_shapes = {k: tuple(v.shape) for k, v in params.items()}
    ckpt_shapes = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    missing = [k for k in params if k not in state_dict]
    unexpected = [k for k in state_dict if k not in params]
    mismatched = [
        k for k in params if k in state_dict and ckpt_shapes[k] != model_shapes[k]
        and not (np.prod(ckpt_shapes[k]) == np.prod(model_shapes[k]) == 1)
    ]
    if missing or unexpected or mismatched:
        lines = ["%s does not fit the model built from the flags:" % source]

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
        raise CheckpointError("\n".join(lines))
    for name, var in params.items():
        value = np.asarray(state_dict[name])
        target = np.dtype(str(var.dtype)) if str(var.dtype) != "bool" else np.bool_
        value = value.astype(target, copy=False).reshape(model_shapes[name])
        var.assign(jt.array(value))

"""Tests of guided_diffusion.state_dicts: the strict loader (values, dtypes, one error naming the flags)."""

import guided_diffusion  # noqa: F401  (prepares Jittor before it is imported)
import numpy as np
import pytest
from jittor import nn

from guided_diffusion.errors import CheckpointError
from guided_diffusion.state_dicts import load_state_dict_strict, module_state_dict


class _TinyUNetLike(nn.Module):
    """Parameter names shaped like the UNet's, to exercise the flag hints."""

    def __init__(self, class_cond: bool, out_channels: int):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(4, 8), nn.SiLU(), nn.Linear(8, 8))
        if class_cond:
            self.label_emb = nn.Embedding(10, 8)
        self.out = nn.Sequential(nn.GroupNorm(2, 4), nn.SiLU(), nn.Conv2d(4, out_channels, 3, padding=1))


def test_strict_load_copies_values_and_casts_fp16_to_the_model_dtype():
    src = _TinyUNetLike(True, 6)
    state = {k: v.astype(np.float16) for k, v in module_state_dict(src).items()}
    dst = _TinyUNetLike(True, 6)
    load_state_dict_strict(dst, state)
    for key, value in module_state_dict(dst).items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, state[key].astype(np.float32))


def test_unconditional_checkpoint_into_conditional_model_names_class_cond_flag():
    state = module_state_dict(_TinyUNetLike(False, 6))
    with pytest.raises(CheckpointError) as info:
        load_state_dict_strict(_TinyUNetLike(True, 6), state, source="model.pt")
    message = str(info.value)
    assert "missing keys (1): label_emb.weight" in message
    assert "--class_cond False" in message and "model.pt" in message


def test_conditional_checkpoint_into_unconditional_model_names_class_cond_flag():
    state = module_state_dict(_TinyUNetLike(True, 6))
    with pytest.raises(CheckpointError) as info:
        load_state_dict_strict(_TinyUNetLike(False, 6), state)
    assert "unexpected keys (1): label_emb.weight" in str(info.value)
    assert "--class_cond True" in str(info.value)


def test_learned_sigma_checkpoint_into_fixed_sigma_model_names_learn_sigma_flag():
    state = module_state_dict(_TinyUNetLike(False, 6))
    model = _TinyUNetLike(False, 3)
    before = module_state_dict(model)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_strict(model, state)
    assert "out.2.weight checkpoint (6, 4, 3, 3) vs model (3, 4, 3, 3)" in str(info.value)
    assert "--learn_sigma True" in str(info.value)
    for key, value in module_state_dict(model).items():  # nothing was half-loaded
        np.testing.assert_array_equal(value, before[key])


def test_non_mapping_checkpoint_is_rejected():
    with pytest.raises(CheckpointError, match="does not hold a state dict"):
        load_state_dict_strict(_TinyUNetLike(False, 3), [1, 2, 3])


# ------------------------------------------------------------------------------------------------- fine-tuning

import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from guided_diffusion import model_loading, script_util  # noqa: E402
from guided_diffusion.checkpoint import load_file, save_file  # noqa: E402
from guided_diffusion.seeding import seed_all  # noqa: E402
from guided_diffusion.state_dicts import class_dependent_keys, load_state_dict_for_finetuning  # noqa: E402
from guided_diffusion.unet import EncoderUNetModel  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GD_FIX = os.path.join(ROOT, "tests", "fixtures", "guided_diffusion")
DIT_FIX = os.path.join(ROOT, "tests", "fixtures", "dit")


def _fixture_unet_flags(**changes):
    with open(os.path.join(GD_FIX, "unet64_cond_flags.json")) as f:
        flags = dict(script_util.model_and_diffusion_defaults(), **json.load(f))
    flags.update(changes)
    return flags


def _fresh(build, seed=5):
    """A model built with seeded initial weights (drawn before returning: Jittor draws when ops execute)."""
    import jittor as jt

    seed_all(seed)
    model = build()
    jt.sync_all()
    return model


def _assert_loaded_and_fresh(model, fresh_values, state, fresh_keys):
    for key, value in module_state_dict(model).items():
        if key in fresh_keys:
            np.testing.assert_array_equal(value, fresh_values[key])
        else:
            np.testing.assert_array_equal(value, np.asarray(state[key], dtype=value.dtype).reshape(value.shape))


def test_finetuning_the_fixture_unet_onto_5_classes_keeps_all_but_a_fresh_label_table(tmp_path):
    path = os.path.join(GD_FIX, "unet64_cond.pt")
    state = load_file(path)
    build = lambda: script_util.create_model_and_diffusion(**_fixture_unet_flags(num_classes=5))[0]  # noqa: E731
    fresh = module_state_dict(_fresh(build))
    model = _fresh(build)
    lines = []
    report = model_loading.finetune_from(model, path, log=lines.append)
    assert [k for k, _ in report.reinitialised] == ["label_emb.weight"] and not report.unused
    assert len(report.loaded) == len(fresh) - 1
    _assert_loaded_and_fresh(model, fresh, state, {"label_emb.weight"})
    text = "\n".join(lines)
    assert "label_emb.weight" in text and "1000x128 -> 5x128" in text and "re-initialised" in text
    assert "loaded %d tensor(s): " % (len(fresh) - 1) in text and "input_blocks (" in text


def test_finetuning_an_unconditional_checkpoint_into_a_conditional_model_adds_a_fresh_label_table():
    state = {k: v for k, v in load_file(os.path.join(GD_FIX, "unet64_cond.pt")).items() if k != "label_emb.weight"}
    build = lambda: script_util.create_model_and_diffusion(**_fixture_unet_flags(num_classes=3))[0]  # noqa: E731
    fresh = module_state_dict(_fresh(build))
    model = _fresh(build)
    report = load_state_dict_for_finetuning(model, state)
    assert report.reinitialised == [("label_emb.weight", "not in the checkpoint: as in a fresh model")]
    _assert_loaded_and_fresh(model, fresh, state, {"label_emb.weight"})


def test_finetuning_a_conditional_checkpoint_into_an_unconditional_model_leaves_the_table_unused():
    state = load_file(os.path.join(GD_FIX, "unet64_cond.pt"))
    model = script_util.create_model_and_diffusion(**_fixture_unet_flags(class_cond=False))[0]
    report = load_state_dict_for_finetuning(model, state)
    assert [k for k, _ in report.unused] == ["label_emb.weight"] and not report.reinitialised
    assert "not used" in report.table()


def test_finetuning_refuses_other_architecture_differences_naming_the_flags():
    state = load_file(os.path.join(GD_FIX, "unet64_cond.pt"))
    model = script_util.create_model_and_diffusion(**_fixture_unet_flags(learn_sigma=False, num_classes=5))[0]
    before = module_state_dict(model)
    with pytest.raises(CheckpointError) as info:
        load_state_dict_for_finetuning(model, state, source="--finetune_from x.pt")
    message = str(info.value)
    assert "--learn_sigma True" in message and "out.2.weight" in message
    assert "label_emb" not in message.split("likely fix:")[1]  # the allowed difference is not blamed
    for key, value in module_state_dict(model).items():  # nothing was half-loaded
        np.testing.assert_array_equal(value, before[key])


def test_finetuning_the_fixture_classifier_onto_5_classes_reinitialises_its_output_layer():
    with open(os.path.join(GD_FIX, "classifier64_attention_kwargs.json")) as f:
        kwargs = json.load(f)
    kwargs.update(out_channels=5)
    path = os.path.join(GD_FIX, "classifier64_attention.pt")
    state = load_file(path)
    fresh = module_state_dict(_fresh(lambda: EncoderUNetModel(**kwargs)))
    model = _fresh(lambda: EncoderUNetModel(**kwargs))
    report = model_loading.finetune_from(model, path)
    assert sorted(k for k, _ in report.reinitialised) == ["out.2.c_proj.bias", "out.2.c_proj.weight"]
    _assert_loaded_and_fresh(model, fresh, state, {"out.2.c_proj.bias", "out.2.c_proj.weight"})
    assert class_dependent_keys(model) == {"out.2.c_proj.weight", "out.2.c_proj.bias"}


def test_finetuning_the_fixture_dit_from_a_training_checkpoint_uses_its_ema(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "DiT"))
    from models import DiT

    with open(os.path.join(DIT_FIX, "dit_tiny_p4_kwargs.json")) as f:
        kwargs = json.load(f)
    released = load_file(os.path.join(DIT_FIX, "dit_tiny_p4.pt"))
    # a train.py checkpoint holds the EMA beside the model: fine-tuning starts from the EMA
    training_ckpt = str(tmp_path / "0000100.pt")
    save_file({"model": {k: np.zeros_like(v) for k, v in released.items()}, "ema": released, "args": None},
              training_ckpt)
    kwargs.update(num_classes=5)
    fresh = module_state_dict(_fresh(lambda: DiT(**kwargs)))
    model = _fresh(lambda: DiT(**kwargs))
    report = model_loading.finetune_from(model, training_ckpt, flag="--finetune-from")
    key = "y_embedder.embedding_table.weight"
    assert [k for k, _ in report.reinitialised] == [key]
    assert report.shapes[key] == ((1001, 64), (6, 64))
    _assert_loaded_and_fresh(model, fresh, released, {key})

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

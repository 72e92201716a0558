"""Unit tests of guided_diffusion.model_loading's flag checks (class labels, respacing); loading checkpoints is
exercised by the sampling-script tests (test_image_sample.py and the others)."""

import pytest

from guided_diffusion import model_loading
from guided_diffusion.errors import UserError


def test_parse_class_labels_checks_range():
    assert model_loading.parse_class_labels("", 10) is None
    assert model_loading.parse_class_labels("1,2,3", 10) == [1, 2, 3]
    with pytest.raises(UserError, match="0..9"):
        model_loading.parse_class_labels("3,10", 10)
    with pytest.raises(UserError, match="comma-separated"):
        model_loading.parse_class_labels("cat", 10)


def test_check_respacing_accepts_every_spacing_that_fits_and_rejects_the_rest():
    model_loading.check_respacing("ddim25", 1000, use_ddim=True)
    model_loading.check_respacing("25", 1000, use_ddim=True)
    model_loading.check_respacing("10,15,20", 1000, use_ddim=False)
    model_loading.check_respacing("10,15,20", 1000, use_ddim=True)  # DDIM takes any spacing, as in the reference
    with pytest.raises(UserError, match="does not fit"):
        model_loading.check_respacing("ddim7", 10, use_ddim=True)
    with pytest.raises(UserError, match="does not fit"):
        model_loading.check_respacing("2000", 1000, use_ddim=False)

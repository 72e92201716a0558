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


def test_class_labels_take_names_from_classes_json_beside_the_checkpoint(tmp_path):
    from guided_diffusion.class_labels import write_classes

    write_classes(str(tmp_path), ["cat", "dog", "fox"])
    classes = model_loading.trained_classes(str(tmp_path / "ema_0.9999_000010.pt"), 5)
    assert classes.count == 3 and classes.names == ["cat", "dog", "fox"]
    assert model_loading.parse_class_labels("fox,cat, 1", classes) == [2, 0, 1]
    with pytest.raises(UserError, match="'wolf' is neither a class id \\(0..2\\) nor a class name"):
        model_loading.parse_class_labels("wolf", classes)
    with pytest.raises(UserError, match="must lie in 0..2"):
        model_loading.parse_class_labels("3", classes)  # a row of the table that no data trained


def test_without_classes_json_labels_come_from_the_label_table_rows(tmp_path):
    classes = model_loading.trained_classes(str(tmp_path / "model.pt"), 7)
    assert classes.count == 7 and classes.names is None
    assert model_loading.parse_class_labels("1 6", classes) == [1, 6]
    with pytest.raises(UserError, match="class names need a classes.json"):
        model_loading.parse_class_labels("cat", classes)


def test_classes_json_with_more_classes_than_num_classes_is_refused(tmp_path):
    from guided_diffusion.class_labels import write_classes

    write_classes(str(tmp_path), ["a", "b", "c"])
    with pytest.raises(UserError, match="lists 3 classes but the model is built with --num_classes 2"):
        model_loading.trained_classes(str(tmp_path / "m.pt"), 2)


def test_a_numeric_class_name_that_is_another_id_must_be_disambiguated(tmp_path):
    names = [str(i) for i in range(11)]  # sorted as strings: "0", "1", "10", "2", ...
    classes = model_loading.TrainedClasses(11, sorted(names), "classes.json")
    assert model_loading.parse_class_labels("0,1", classes) == [0, 1]
    with pytest.raises(UserError, match="write name:10 or id:10"):
        model_loading.parse_class_labels("10", classes)
    assert model_loading.parse_class_labels("name:10,id:10", classes) == [2, 10]

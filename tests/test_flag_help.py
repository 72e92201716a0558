"""Tests of guided_diffusion.flag_help: one help text per flag, per-script overrides, defaults shown the same way in
every ADM script's --help."""

import argparse
import importlib.util
import os

import pytest

from guided_diffusion.flag_help import FLAG_HELP, TRAINING_FLAG_HELP, attach_flag_help
from guided_diffusion.script_util import add_dict_to_argparser
from sampling_helpers import REPO

ADM_SCRIPTS = ["image_train.py", "classifier_train.py", "free_train.py", "scripts/super_res_train.py",
               "classifier_sample.py", "free_sample.py", "scripts/image_sample.py", "scripts/super_res_sample.py",
               "scripts/image_nll.py"]


def _parser(formatter=argparse.HelpFormatter, **defaults):
    parser = argparse.ArgumentParser(formatter_class=formatter)
    add_dict_to_argparser(parser, defaults)
    return parser


def _help_of(parser, dest):
    return next(a for a in parser._actions if a.dest == dest).help % {"default": parser.get_default(dest)}


def test_table_text_and_default_are_attached():
    parser = _parser(lr=1e-4, sampler="")
    attach_flag_help(parser)
    text = " ".join(parser.format_help().split())
    assert FLAG_HELP["lr"] + " (default: 0.0001)" in text
    assert "(default: '')" in text


def test_extra_overrides_the_table_and_unknown_flags_still_show_their_default():
    parser = _parser(batch_size=4, p_unknown=3)
    attach_flag_help(parser, TRAINING_FLAG_HELP)
    text = " ".join(parser.format_help().split())
    assert TRAINING_FLAG_HELP["batch_size"] + " (default: 4)" in text
    assert FLAG_HELP["batch_size"] not in text
    assert "--p_unknown P_UNKNOWN default: 3" in text


@pytest.mark.parametrize("formatter", [argparse.HelpFormatter, argparse.ArgumentDefaultsHelpFormatter,
                                       argparse.RawDescriptionHelpFormatter])
def test_any_formatter_shows_the_default_once_and_a_percent_sign_survives(formatter):
    parser = _parser(formatter, w=3.0)
    attach_flag_help(parser, {"w": "weight in % of the guidance"})
    text = " ".join(parser.format_help().split())
    assert text.count("(default: 3.0)") == 1 and "weight in % of the guidance" in text


@pytest.mark.parametrize("script", ADM_SCRIPTS)
def test_every_flag_of_every_adm_script_has_a_text_and_its_default(script):
    spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3], os.path.join(REPO, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parser = module.create_argparser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            shown = _help_of(parser, action.dest)
            assert shown.endswith("(default: %r)" % (parser.get_default(action.dest),)), (script, action.dest)
            assert not shown.startswith("default:"), (script, action.dest, "has no help text")

"""Tests for guided_diffusion.errors: InputCheck names every problem at once; run_cli's exit statuses."""

import pytest

from guided_diffusion.errors import DataError, InputCheck, UserError, run_cli


def _fails(message):
    raise DataError(message)


def test_input_check_collects_every_problem_and_raises_them_together():
    check = InputCheck()
    assert check(lambda: 5) == 5
    assert check(_fails, "first: fix A") is None
    check.problem("second: fix B")
    check.problem("second: fix B")  # the same problem twice is listed once
    with pytest.raises(UserError) as info:
        check.done()
    text = str(info.value)
    assert text.startswith("2 problems with this command:")
    assert "1. first: fix A" in text and "2. second: fix B" in text


def test_input_check_with_one_problem_raises_it_as_is_and_with_none_passes():
    InputCheck().done()
    check = InputCheck()
    check(_fails, "the only one")
    with pytest.raises(UserError, match="^the only one$"):
        check.done()


def test_input_check_lets_other_exceptions_through():
    with pytest.raises(ZeroDivisionError):
        InputCheck()(lambda: 1 / 0)


def test_run_cli_exits_2_on_user_errors(capsys):
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: _fails("bad flag: use --x"))
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: bad flag: use --x\n"

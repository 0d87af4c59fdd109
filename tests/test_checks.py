"""remap_tf.checks: the one place integers, numbers and choices are validated."""

import numpy as np
import pytest

from remap_tf.checks import check_choice, check_int, check_number
from remap_tf.errors import InvalidInputError


@pytest.mark.parametrize(
    "value, kwargs, expected",
    [(3, {"minimum": 1}, 3), (np.int64(0), {"minimum": 0}, 0), (None, {"allow_none": True}, None)],
)
def test_check_int_accepts(value, kwargs, expected):
    result = check_int("n", value, **kwargs)
    assert result == expected and (result is None or type(result) is int)


@pytest.mark.parametrize(
    "value, kwargs, message",
    [
        (0, {"minimum": 1}, "n must be an integer >= 1, got 0."),
        (True, {"minimum": 0}, "n must be an integer >= 0, got True."),
        (2.0, {}, "n must be an integer, got 2.0."),
        (11, {"minimum": 1, "maximum": 10}, "n must be an integer from 1 to 10, got 11."),
        ("3", {"maximum": 10}, "n must be an integer <= 10, got '3'."),
        (None, {"minimum": 1}, "n must be an integer >= 1, got None."),
    ],
)
def test_check_int_refuses_in_one_style(value, kwargs, message):
    with pytest.raises(InvalidInputError) as raised:
        check_int("n", value, **kwargs)
    assert str(raised.value) == message


def test_check_number_bounds_and_non_finite():
    assert check_number("x", 1, minimum=0, open_minimum=True) == 1.0
    assert check_number("x", np.float32(0.5), minimum=0, maximum=1) == 0.5
    for bad, message in [
        (0, "x must be a number > 0, got 0."),
        (float("nan"), "x must be a number > 0, got nan."),
        (float("inf"), "x must be a number > 0, got inf."),
        (False, "x must be a number > 0, got False."),
    ]:
        with pytest.raises(InvalidInputError) as raised:
            check_number("x", bad, minimum=0, open_minimum=True)
        assert str(raised.value) == message
    with pytest.raises(InvalidInputError, match=r"x must be a number from 0 to 1, got 1.5\."):
        check_number("x", 1.5, minimum=0, maximum=1)


def test_check_choice_suggests_the_closest():
    assert check_choice("backbone", "resnet50", ("resnet50", "vgg16")) == "resnet50"
    with pytest.raises(InvalidInputError) as raised:
        check_choice("backbone", "resnet5O", ("resnet50", "vgg16"))
    assert str(raised.value) == (
        "backbone must be one of ['resnet50', 'vgg16'], got 'resnet5O'. Did you mean 'resnet50'?"
    )

"""The ground floor: ConvSpec's one declaration of nn.Conv2d's arguments and the validators."""

from __future__ import annotations

import inspect

import pytest
from torch import nn

from dynaconv.layers import CondConv2d, DOConv2d
from dynaconv.spec import (
    CONV_ARGUMENTS,
    LAYER_ARGUMENTS,
    check_divisible,
    check_int,
    check_number,
    check_pair,
)


def test_the_declaration_is_nn_conv2d_s_arguments():
    conv = inspect.signature(nn.Conv2d).parameters
    ours = LAYER_ARGUMENTS.parameters
    assert list(ours) == list(conv)
    assert all(ours[name].default == conv[name].default for name in conv)
    assert list(CONV_ARGUMENTS.parameters) == list(conv)[:-2]


def test_layers_show_the_declaration_then_their_options():
    for cls in (DOConv2d, CondConv2d):
        parameters = list(inspect.signature(cls).parameters)
        assert parameters[: len(LAYER_ARGUMENTS.parameters)] == list(LAYER_ARGUMENTS.parameters)
    layer = DOConv2d(4, 8, 3, 2, 1, 1, 1, False, "zeros", None, None)
    assert layer.stride == (2, 2) and layer.bias is None
    with pytest.raises(TypeError):
        DOConv2d(4, 8, 3, 2, 1, 1, 1, False, "zeros", None, None, 9)


@pytest.mark.parametrize("value", [0, -1, True, 1.0, "2", None])
def test_check_int_refuses(value):
    with pytest.raises(ValueError, match="width must be a positive int"):
        check_int(value, "width")


def test_validators_accept_and_name_the_rule():
    assert check_int(0, "n", minimum=0) == 0
    with pytest.raises(ValueError, match="n must be a non-negative int, got -1"):
        check_int(-1, "n", minimum=0)
    with pytest.raises(ValueError, match="n must be an int >= 9"):
        check_int(8, "n", minimum=9)
    assert check_int(4, "n", minimum=0, maximum=4) == 4
    with pytest.raises(ValueError, match=r"n must be an int in \[0, 4\], got 5"):
        check_int(5, "n", minimum=0, maximum=4)
    with pytest.raises(ValueError, match=r"n must be below 5, got 5"):
        check_int(5, "n", 0, "below 5", maximum=4)
    check_divisible(12, "out_channels", 4, "heads")
    with pytest.raises(ValueError, match=r"out_channels \(10\) must be divisible by heads \(4\)"):
        check_divisible(10, "out_channels", 4, "heads")
    assert check_number(0.5, "p", lambda p: 0 <= p < 1, "in [0, 1)") == 0.5
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got True"):
        check_number(True, "p", lambda p: 0 <= p < 1, "in [0, 1)")
    assert check_pair(3, "k") == (3, 3) and check_pair([1, 2], "k") == (1, 2)
    with pytest.raises(ValueError, match="k must be an int or a pair of ints"):
        check_pair((1, True), "k")

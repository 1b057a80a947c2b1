"""The public API: ``dynaconv.__all__`` names what users need, and each name is there."""

from __future__ import annotations

import types

import dynaconv
from dynaconv import profiling


def test_all_names_exist_and_are_the_user_facing_ones():
    assert len(dynaconv.__all__) == len(set(dynaconv.__all__))
    for name in dynaconv.__all__:
        assert getattr(dynaconv, name) is not None, name
    for layer in dynaconv.METHODS.values():
        assert layer.__name__ in dynaconv.__all__
    for internal in ("ConvSpec", "fold_batchnorm", "GatherWorkspace", "condconv2d", "Deployable"):
        assert internal not in dynaconv.__all__
        assert hasattr(dynaconv.layers, internal)  # still importable from its module


def test_profile_is_the_function_and_profiling_the_module():
    assert isinstance(dynaconv.profile, types.FunctionType)
    assert dynaconv.profile is profiling.profile
    assert isinstance(profiling, types.ModuleType)
    assert dynaconv.MacCount(3, 1) == (3, 1)
    assert dynaconv.MacCount(3, 1)._fields == ("dense", "active")

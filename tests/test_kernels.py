"""The kernel helpers shared by every family."""

from __future__ import annotations

import torch

from dynaconv.kernels import autotune_configs, interpreting, triton_preferred, triton_usable


def test_autotune_configs_all_or_first(monkeypatch):
    configs = ["a", "b", "c"]
    monkeypatch.setenv("DYNACONV_TRITON_AUTOTUNE", "0")
    assert autotune_configs(configs) == ["a"]
    monkeypatch.setenv("DYNACONV_TRITON_AUTOTUNE", "1")
    assert autotune_configs(configs) == configs
    monkeypatch.delenv("DYNACONV_TRITON_AUTOTUNE")
    assert autotune_configs(configs) == configs


def test_interpreter_runs_cpu_tensors_but_is_never_preferred():
    x = torch.randn(2, 3)
    if interpreting():
        assert triton_usable(x)
    assert not triton_preferred(x)  # the interpreter is for tests, never an automatic choice

"""dynaconv.dispatch: the impl vocabulary, its aliases, the rules and the measured-choice cache."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import assert_close64
from dynaconv import CondConv2d, DynamicGroupConv2d, GroupableConv2d, dispatch
from dynaconv.dispatch import (
    ALIASES,
    FAMILY_IMPLS,
    IMPLS,
    MeasuredChoices,
    clear_measured_choices,
    measured_choices,
    resolve_impl,
    tracing,
)
from dynaconv.functional.dgc import dense_masked_conv, gate_dense
from dynaconv.layers import dgc_deployed
from dynaconv.layers.condconv import choose_form


def test_every_family_name_is_in_the_vocabulary_and_aliases_point_into_it():
    for names in FAMILY_IMPLS.values():
        assert "auto" in names and "torch" in names and "triton" in names
        assert set(names) <= set(IMPLS)
    assert set(ALIASES.values()) <= set(IMPLS)
    assert not set(ALIASES) & set(IMPLS)


def test_resolve_impl_canonicalises_and_refuses_with_the_valid_values():
    valid = FAMILY_IMPLS["dgc"]
    assert resolve_impl("dense", valid) == "masked"
    assert resolve_impl("sparse", valid) == "bmm"
    assert resolve_impl("grouped", valid) == "batch_grouped"
    assert resolve_impl("bmm", valid) == "bmm"
    with pytest.raises(ValueError, match=r"impl must be one of 'auto', 'torch', 'masked'"):
        resolve_impl("loop", valid)
    with pytest.raises(ValueError, match=r"'sparse' \(= 'bmm'\)"):
        resolve_impl("fast", valid)
    with pytest.raises(ValueError, match="form must be one of"):
        resolve_impl(None, valid, "form")
    with pytest.raises(ValueError, match="impl must be one of"):  # alias of a name not valid
        resolve_impl("grouped", FAMILY_IMPLS["dgconv"])


@pytest.mark.parametrize(
    "build",
    [
        lambda impl: CondConv2d(4, 6, 3, impl=impl),
        lambda impl: DynamicGroupConv2d(8, 8, 3, impl=impl),
        lambda impl: GroupableConv2d(4, 4, 3, impl=impl),
    ],
)
def test_layers_refuse_unknown_impl_naming_the_argument(build):
    with pytest.raises(ValueError, match=r"impl must be one of .*'auto'.*'triton'"):
        build("fastest")


def _dgc_layer(**options) -> DynamicGroupConv2d:
    torch.manual_seed(0)
    layer = DynamicGroupConv2d(8, 8, 3, padding=1, heads=2, dtype=torch.float64, **options)
    with torch.no_grad():
        layer.fc2_bias.normal_()
    layer.set_progress(1.0)
    return layer


@pytest.mark.parametrize(
    "old,new", [("dense", "masked"), ("sparse", "bmm"), ("grouped", "batch_grouped")]
)
def test_dgc_old_spellings_compute_what_the_canonical_names_do(old, new):
    layer = _dgc_layer().eval()
    x = torch.randn(3, 8, 6, 6, dtype=torch.float64)
    layer.impl = new
    expected = layer(x)
    layer.impl = old  # assigned directly, as older code does
    assert_close64(layer(x), expected)
    assert _dgc_layer(impl=old).impl == old  # accepted by the constructor too
    assert_close64(_dgc_layer(impl=old).eval()(x), expected)
    if old != "dense":  # the deployed module takes the sparse forms only
        deployed = layer.deploy()
        deployed.impl = old
        assert_close64(deployed(x), expected)


def test_condconv_old_spelling_and_torch_policy():
    torch.manual_seed(0)
    layer = CondConv2d(4, 6, 3, padding=1, num_experts=3, impl="grouped", dtype=torch.float64)
    assert layer.impl == "batch_grouped"
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    expected = layer(x)
    for impl in ("loop", "torch", "auto", "grouped"):
        layer.impl = impl
        assert_close64(layer(x), expected)
    assert layer.deploy(impl="torch").impl in FAMILY_IMPLS["condconv"]
    assert layer.deploy(impl="torch").impl not in ("auto", "torch", "triton")


def test_dgc_torch_policy_equals_auto():
    layer = _dgc_layer().train()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    expected = layer(x)
    layer.impl = "torch"
    assert_close64(layer(x), expected)


@pytest.mark.parametrize(
    "args,kwargs",
    [
        ((16, 16, 3), {"padding": 1}),
        ((16, 16, 3), {"groups": 2}),
        ((16, 16, 1), {}),
        ((16, 16, 3), {"groups": 16}),
        ((4, 6, 5), {"stride": 2}),
    ],
)
def test_condconv_deploy_fixes_the_form_an_eval_forward_runs(args, kwargs):
    """``inference_form`` (what ``deploy()`` fixes) and the per-call choice are one rule."""
    layer = CondConv2d(*args, num_experts=3, **kwargs).eval()
    x = torch.randn(2, args[0], 9, 9)
    with torch.no_grad():
        runs = choose_form(layer.spec, x, layer.weight, needs_grad=False)
    assert layer.inference_form() == runs
    assert layer.deploy().impl == runs


def test_tracing_is_one_answer_for_every_capture():
    assert not tracing()
    seen = []

    def record(x):
        seen.append(tracing())
        return x + 1

    torch.jit.trace(record, torch.randn(2), check_trace=False)
    assert seen == [True]
    seen.clear()

    class Record(nn.Module):
        def forward(self, x):
            return record(x)

    torch.export.export(Record(), (torch.randn(2),))
    assert seen and all(seen)
    assert not tracing()


def test_measured_choices_keep_the_fastest_and_skip_failures():
    cache = MeasuredChoices()
    runs: list[str] = []
    timings = {"slow": 3.0, "fast": 1.0}

    def run(candidate):
        runs.append(candidate)
        if candidate == "broken":
            raise RuntimeError("cannot run here")

    def timer(call, repeat):
        call()
        return timings[runs[-1]]

    assert cache.choose("k", ["slow", "broken", "fast"], run, timer=timer) == "fast"
    assert "k" in cache and len(cache) == 1
    count = len(runs)
    assert cache.choose("k", ["slow", "fast"], run, timer=timer) == "fast"
    assert len(runs) == count  # looked up, not measured again
    assert cache.choose("other", ["broken"], run, timer=timer, fallback="safe") == "safe"
    assert "other" not in cache  # nothing cached when nothing ran
    cache.clear()
    assert len(cache) == 0


def test_deployed_dgc_measures_once_per_shape_and_stays_exact(monkeypatch):
    """``impl="auto"`` inference measures every candidate once per shape (on the CPU always),
    keeps the fastest and then only looks it up; the layer's and the module's choices are
    kept apart (their forms cost differently)."""
    clear_measured_choices()
    layer = _dgc_layer().eval()
    deployed = layer.deploy()
    x = torch.randn(3, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        expected = dense_masked_conv(
            x,
            layer.weight,
            gate_dense(layer.saliency(x), layer.inactive_channels),
            layer.spec,
            layer.heads,
        ) + layer.bias.reshape(1, -1, 1, 1)
    ran = []
    run = deployed._run
    monkeypatch.setattr(deployed, "_run", lambda impl, *args: ran.append(impl) or run(impl, *args))
    assert_close64(deployed(x), expected)
    candidates = dgc_deployed.inference_candidates(x, deployed.spec)
    assert {"head_grouped", "batch_grouped", "masked"} <= set(candidates)
    assert set(candidates) <= set(ran)  # every candidate was timed
    keys = [k for k in measured_choices if k[0] == "dgc_inference"]
    assert len(keys) == 1 and measured_choices.get(keys[0]) in candidates
    ran.clear()
    assert_close64(deployed(x), expected)
    assert ran == [measured_choices.get(keys[0])]  # looked up: one run, no measuring
    assert_close64(deployed(x[:1]), expected[:1])  # another shape: measured anew
    with torch.no_grad():
        assert_close64(layer(x), expected)  # the layer's eval forward: its own key
    assert len(measured_choices) == 3
    clear_measured_choices()
    assert len(measured_choices) == 0


def test_dgc_auto_inference_runs_what_was_measured_fastest(monkeypatch):
    """Whatever the timings, ``auto`` runs the candidate measured fastest."""
    layer = _dgc_layer().eval()
    deployed = layer.deploy()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    run = deployed._run
    ran: list[str] = []
    monkeypatch.setattr(deployed, "_run", lambda impl, *args: ran.append(impl) or run(impl, *args))
    for fastest in ("masked", "head_grouped", "batch_grouped"):
        clear_measured_choices()
        ran.clear()

        def timer(call, repeat, fastest=fastest):
            call()
            return 1.0 if ran[-1] == fastest else 2.0

        monkeypatch.setattr(dgc_deployed, "median_host_timer", timer)
        deployed(x)
        ran.clear()
        deployed(x)
        assert ran == [fastest]
    clear_measured_choices()


@pytest.mark.skipif(
    torch.cuda.is_available() or not dispatch.triton_available(),
    reason="runs the kernel in Triton's interpreter on CPU",
)
def test_deployed_lgc_measures_triton_against_torch_once(monkeypatch):
    """The measured path of ``impl="auto"`` (CUDA with cudnn.benchmark), forced on CPU with
    the kernel in the interpreter: both candidates run, the choice is kept, outputs agree."""
    from dynaconv import LearnedGroupConv2d
    from dynaconv.layers import lgc_deployed

    torch.manual_seed(0)
    layer = LearnedGroupConv2d(16, 8, 1, learned_groups=2)
    layer.set_progress(0.3)
    deployed = layer.deploy().eval()
    x = torch.randn(2, 16, 3, 4)
    with torch.no_grad():
        expected = deployed.forward_torch(x)
    monkeypatch.setattr(dispatch, "triton_preferred", lambda *tensors: True)
    monkeypatch.setattr(lgc_deployed, "measuring", lambda *tensors: True)
    ran = []
    run_form = deployed._run_form
    monkeypatch.setattr(
        deployed, "_run_form", lambda form, x: ran.append(form) or run_form(form, x)
    )
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), expected, rtol=1e-4, atol=1e-4)
        assert {"triton", "torch"} <= set(ran)
        keys = [k for k in measured_choices if k[0] == "lgc_deployed"]
        assert len(keys) == 1 and measured_choices.get(keys[0]) in ("triton", "torch")
        ran.clear()
        torch.testing.assert_close(deployed(x), expected, rtol=1e-4, atol=1e-4)
    assert ran == [measured_choices.get(keys[0])]  # looked up: one run, no measuring

"""dynaconv.dispatch and the one selection sequence (dynaconv.layers.ChoosesForm): the impl
vocabulary, its aliases, the families' declared forms, measured choices and their switch."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import io
import os
import subprocess
import sys
import time
import tokenize

import pytest
import torch
from torch import nn

import dynaconv
from conftest import assert_close64
from dynaconv import CondConv2d, DynamicGroupConv2d, GroupableConv2d, dispatch
from dynaconv.dispatch import (
    ALIASES,
    IMPLS,
    MeasuredChoices,
    clear_measured_choices,
    measured_choices,
    resolve_impl,
    tracing,
)
from dynaconv.layers import ChoosesForm, SparseDynamicGroupConv2d, _base
from dynaconv.layers.dgc import cpu as dgc_cpu
from dynaconv.layers.dgconv import layer as dgconv_module
from dynaconv.layers.lgc.deployed import CondensedGroupConv2d


@pytest.fixture(autouse=True)
def _measure_at_the_first_call():
    """These tests look at measuring itself: from a key's first call on (default: third);
    choices are final at once unless a test switches the recheck on."""
    with dispatch.measuring(True, after=0, recheck=0):
        yield


#: Every class that declares execution forms.
FORM_CLASSES = [
    CondConv2d,
    DynamicGroupConv2d,
    GroupableConv2d,
    SparseDynamicGroupConv2d,
    CondensedGroupConv2d,
]


def test_every_family_name_is_in_the_vocabulary_and_aliases_point_into_it():
    for cls in FORM_CLASSES:
        assert issubclass(cls, ChoosesForm)
        names = cls.forms.impls
        assert names[:2] == ("auto", "torch") and "triton" in names
        assert set(names) <= set(IMPLS)
        assert any(cls.forms[name].triton for name in cls.forms)
        export = [n for n in cls.forms if cls.forms[n].traceable]
        assert export, f"{cls.__name__} declares no traceable form to export"
    assert set(ALIASES.values()) <= set(IMPLS)
    assert not set(ALIASES) & set(IMPLS)


def test_dispatch_never_names_a_family():
    """The vocabulary and switches are shared; forms and rules are declared by the families
    (the code names no family; the vocabulary's descriptions say where a name is used)."""
    source = io.StringIO(inspect.getsource(dispatch))
    names = {t.string.lower() for t in tokenize.generate_tokens(source.readline) if t.type == 1}
    for family in ("condconv", "dgconv", "dgc", "lgc", "doconv"):
        assert not {name for name in names if family in name}


def test_resolve_impl_canonicalises_and_refuses_with_the_valid_values():
    valid = DynamicGroupConv2d.forms.impls
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
        resolve_impl("grouped", GroupableConv2d.forms.impls)


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
    layer = build("auto")
    with pytest.raises(ValueError, match=r"impl must be one of .*'auto'.*'triton'"):
        layer.impl = "fastest"  # refused when set, not at the next call
    assert layer.impl == "auto"


def test_impl_is_canonicalised_once_when_set():
    layer = CondConv2d(4, 6, 3, impl="grouped")
    assert layer.impl == "batch_grouped"
    layer.impl = "sparse"
    assert layer.impl == "bmm" and layer.__dict__["_impl"] == "bmm"
    deployed = _dgc_layer(impl="dense").deploy()
    assert deployed.impl == "auto"  # deploying a masked layer measures the sparse forms
    deployed.impl = "grouped"
    assert deployed.impl == "batch_grouped"
    deployed.impl = "dense"
    assert deployed.impl == "masked"
    with pytest.raises(ValueError, match="impl must be one of"):
        deployed.impl = "loop"
    with pytest.raises(AttributeError, match="single execution form"):
        dynaconv.DOConv2d(4, 4, 3).impl = "torch"


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
    assert _dgc_layer(impl=old).impl == new  # accepted by the constructor too, canonical
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
    assert layer.deploy(impl="torch").impl == "torch"
    assert layer.deploy(impl="grouped").impl == "batch_grouped"


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
@pytest.mark.parametrize("measure", [True, False])
def test_condconv_deploy_fixes_the_form_an_eval_forward_runs(args, kwargs, measure, monkeypatch):
    """The deployed copy runs, per input shape, the form the eval-mode layer runs: with or
    without gradients, measured or by the rule."""
    torch.manual_seed(0)
    layer = CondConv2d(*args, num_experts=3, **kwargs).eval()
    x = torch.randn(2, args[0], 9, 9)
    ran = _record_forms(monkeypatch, CondConv2d)
    with dispatch.measuring(measure):
        with torch.no_grad():
            layer(x)
        layer(x).sum().backward()  # eval mode with gradients: the same form
        deployed = layer.deploy()
        with torch.no_grad():
            y = deployed(x)
        deployed(x.requires_grad_())
        assert [module for module, _ in ran] == [layer, layer, deployed, deployed]
        assert len({form for _, form in ran}) == 1
        assert layer.inference_form(x) == ran[0][1] == deployed.inference_form(x)
    with torch.no_grad():
        torch.testing.assert_close(y, layer(x))


def _count_runs(monkeypatch, cls: type) -> list[str]:
    """Every run of one of ``cls``'s forms from now on (measuring included), by name."""
    ran: list[str] = []

    def counted(name, form):
        def run(module, *args):
            ran.append(name)
            return form.run(module, *args)

        return dataclasses.replace(form, run=run)

    forms = {name: counted(name, form) for name, form in cls.forms.forms.items()}
    monkeypatch.setattr(cls, "forms", dataclasses.replace(cls.forms, forms=forms))
    return ran


def _record_forms(monkeypatch, cls: type) -> list[tuple[ChoosesForm, str]]:
    """``(module, form)`` for every forward of a ``cls`` from now on."""
    ran: list[tuple[ChoosesForm, str]] = []
    choose = cls.choose_form

    def recording(self, x, *args):
        ran.append((self, choose(self, x, *args)))
        return ran[-1][1]

    monkeypatch.setattr(cls, "choose_form", recording)
    return ran


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


def _fake_timer(runs: list[str], timings: dict[str, float]):
    """A timer whose calls take ``timings[candidate]`` ms each (``repeat`` calls per sample)."""

    def timer(call, repeat):
        for _ in range(repeat):
            call()
        return timings[runs[-1]] * repeat

    return timer


def test_measured_choices_keep_the_fastest_and_skip_failures():
    cache = MeasuredChoices()
    runs: list[str] = []
    timings = {"slow": 3.0, "fast": 1.0, "close": 1.2, "glacial": 10.0}

    def run(candidate):
        runs.append(candidate)
        if candidate == "broken":
            raise RuntimeError("cannot run here")

    timer = _fake_timer(runs, timings)
    candidates = ["slow", "broken", "close", "fast", "glacial"]
    assert cache.choose("k", candidates, run, timer=timer, min_rounds=3, budget_ms=0) == "fast"
    assert runs.count("glacial") == 2  # over 4x the fastest timed call: not sampled again
    assert runs.count("slow") == 2  # warm-up and one timed call: pruned (over 2x the fastest)
    assert runs.count("fast") == runs.count("close") == 2 + 3  # screen, then 3 rounds
    assert "k" in cache
    runs.clear()  # calls are sampled until each has run budget_ms (or max_rounds)
    assert cache.choose("k2", ["close", "fast"], run, timer=timer, budget_ms=5.5) == "fast"
    assert runs.count("fast") == 2 + 6  # screen, then 6 samples of 1.0 ms
    runs.clear()
    cache.choose("k3", ["close", "fast"], run, timer=timer, budget_ms=1e9, max_rounds=5)
    assert runs.count("fast") == 2 + 5
    count = len(runs)
    assert cache.choose("k", ["slow", "fast"], run, timer=timer) == "fast"
    assert len(runs) == count  # looked up, not measured again
    assert cache.choose("other", ["broken"], run, timer=timer, fallback="safe") == "safe"
    assert "other" not in cache  # nothing cached when nothing ran
    assert len(cache) == 3 and cache.measured == 3 and cache.spent_ms > 0
    cache.clear()
    assert len(cache) == 0


def test_close_runners_up_make_a_provisional_choice_that_a_recheck_settles():
    """With ``recheck_within``, forms measured within that factor of the chosen one are kept
    as contenders; :meth:`recheck` measures only those again (after two warm-up calls each)
    and its choice is final. A far-off form is not a contender; without ``recheck_within``
    (or with no close runner-up) the choice is final at once."""
    cache = MeasuredChoices()
    runs: list[str] = []
    timings = {"a": 2.0, "b": 2.6, "c": 3.8}
    timer = _fake_timer(runs, timings)
    options = dict(timer=timer, min_rounds=3, budget_ms=0)
    assert cache.choose("k", ["c", "b", "a"], runs.append, recheck_within=1.5, **options) == "a"
    assert cache.provisional("k") and cache.measured == 1
    timings["b"] = 1.6  # the settled process: "b" is faster now
    runs.clear()
    assert cache.recheck("k", runs.append, timer=timer) == "b"
    assert set(runs) == {"a", "b"}  # only the contenders, "c" (1.9x) is not one
    assert runs.count("a") == runs.count("b") >= 2 + 1 + 3  # 2 warm-ups, screen, rounds
    assert cache.get("k") == "b" and not cache.provisional("k")
    assert cache.rechecked == 1 and cache.measured == 1
    runs.clear()
    assert cache.recheck("k", runs.append, timer=timer) == "b" and runs == []  # final
    assert cache.choose("k2", ["a", "b"], runs.append, **options) in ("a", "b")
    assert not cache.provisional("k2")  # no recheck_within: final
    timings.update(a=2.0, b=5.0)
    cache.choose("k3", ["a", "b"], runs.append, recheck_within=1.5, **options)
    assert not cache.provisional("k3")  # the runner-up is 2.5x: final
    cache.clear()
    assert not cache.provisional("k")


def test_a_layers_provisional_choice_is_rechecked_after_its_next_calls(monkeypatch):
    """A layer whose measured forms were close runs its choice for the key's next
    ``recheck`` calls (without making it its memo), then measures the close ones again
    and keeps that choice; the outputs never change (every form is exact)."""
    torch.manual_seed(0)
    layer = CondConv2d(8, 8, 3, padding=1, num_experts=3).eval().double()
    ran = _count_runs(monkeypatch, CondConv2d)
    speed = dict.fromkeys(CondConv2d.forms.forms, 5.0)
    first, second = "expert_sum", "batch_grouped"
    speed.update({first: 1.0, second: 1.2})

    def timer(call, repeat):
        for _ in range(repeat):
            call()
        return speed[ran[-1]] * repeat

    monkeypatch.setattr(_base, "choice_timer", lambda device: timer)
    x = torch.randn(3, 8, 6, 6, dtype=torch.float64)
    with dispatch.measuring(True, after=0, recheck=3), torch.no_grad():
        out = layer(x)
        (key,) = list(measured_choices)
        assert measured_choices.get(key) == first and measured_choices.provisional(key)
        speed[second] = 0.5  # settled: the runner-up is faster now
        for _ in range(3):
            ran.clear()
            assert_close64(layer(x), out)
            assert ran == [first]  # the provisional choice, nothing measured
        ran.clear()
        assert_close64(layer(x), out)  # the recheck
        assert set(ran[:-1]) == {first, second} and ran[-1] == second
        assert measured_choices.get(key) == second and not measured_choices.provisional(key)
        assert measured_choices.rechecked >= 1
        ran.clear()
        layer(x)
        assert ran == [second]


def test_recheck_settings_are_validated_and_zero_makes_choices_final():
    with pytest.raises(ValueError, match="recheck must be None or an int >= 0"):
        dispatch.set_measuring(True, recheck=-1)
    with pytest.raises(ValueError, match="recheck"), dispatch.measuring(True, recheck=True):
        pass
    with dispatch.measuring(True, recheck=5):
        assert dispatch.recheck_after() == 5
    assert dispatch.recheck_after() == 0  # restored (this file's fixture)


def test_short_forms_are_sampled_over_back_to_back_calls_in_rotated_rounds():
    """A sample of a sub-millisecond form times ``sample_ms`` of back-to-back calls (a single
    0.1 ms call is mostly the clock's and the scheduler's grain); each round starts with
    another candidate."""
    cache = MeasuredChoices()
    runs: list[str] = []
    repeats: list[tuple[str, int]] = []
    timings = {"a": 0.1, "b": 0.15, "c": 0.12}

    def timer(call, repeat):
        for _ in range(repeat):
            call()
        repeats.append((runs[-1], repeat))
        return timings[runs[-1]] * repeat

    chosen = cache.choose(
        "k", ["a", "b", "c"], runs.append, timer=timer, min_rounds=3, budget_ms=0, sample_ms=1.0
    )
    assert chosen == "a"
    sampled = repeats[6:]  # after the screen (a warm-up and one timed call each)
    assert all(repeat == 1 for _, repeat in repeats[:6])
    assert {name: repeat for name, repeat in sampled} == {"a": 10, "b": 7, "c": 9}
    firsts = [sampled[3 * r][0] for r in range(3)]
    assert firsts == ["a", "b", "c"]  # the order rotates every round


def test_a_near_tie_is_sampled_again_and_decided_on_paired_ratios():
    """Two forms whose medians are within 15% get more alternating rounds, and the one faster
    in the median of the per-round ratios is chosen (not the lowest single sample)."""
    cache = MeasuredChoices()
    runs: list[str] = []
    # "b" has the lowest sample (0.99) and a median 3% over "a"'s: a near tie, which "a" wins
    # in most rounds.
    sequences = {"a": iter([1.0] * 20), "b": iter([2.0, 0.99] + [1.03] * 20)}

    def timer(call, repeat):
        call()
        return next(sequences[runs[-1]])

    chosen = cache.choose(
        "k", ["a", "b"], runs.append, timer=timer, warmup=0, min_rounds=3, budget_ms=0
    )
    assert chosen == "a"
    assert runs.count("a") == runs.count("b") == 1 + 3 + 2  # screen, 3 rounds, 2 tie rounds
    runs.clear()  # clearly apart (20%): no tie rounds
    sequences = {"a": iter([1.0] * 20), "b": iter([1.2] * 20)}
    cache.choose("k2", ["a", "b"], runs.append, timer=timer, warmup=0, min_rounds=3, budget_ms=0)
    assert runs.count("a") == runs.count("b") == 1 + 3


def test_deployed_dgc_measures_once_per_shape_and_stays_exact(monkeypatch):
    clear_measured_choices()
    layer = _dgc_layer().eval()
    deployed = layer.deploy()
    x = torch.randn(3, 8, 6, 6, dtype=torch.float64)
    expected = layer(x)
    ran = _count_runs(monkeypatch, SparseDynamicGroupConv2d)
    assert_close64(deployed(x), expected)
    # (a 3x3 layer: ``bmm`` is measured for 1x1 kernels only, see the deployed DGC's FORMS;
    # the compiled kernel where it builds)
    candidates = {"head_grouped", "batch_grouped", "masked"}
    if dgc_cpu.unusable_reason(x) is None:
        candidates.add("cpu_kernel")
    assert set(ran) == candidates  # every candidate was timed
    keys = [k for k in measured_choices if k[0] == "SparseDynamicGroupConv2d"]
    assert len(keys) == 1 and measured_choices.get(keys[0]) in candidates
    ran.clear()
    assert_close64(deployed(x), expected)
    assert ran == [measured_choices.get(keys[0])]  # looked up: one run, no measuring
    assert {k[0] for k in measured_choices} == {"SparseDynamicGroupConv2d", "DynamicGroupConv2d"}
    assert len(measured_choices) == 2  # the layer's eval forward and the deployed module's
    clear_measured_choices()
    assert len(measured_choices) == 0


def test_dgc_auto_inference_runs_what_was_measured_fastest(monkeypatch):
    """Whatever the timings, ``auto`` runs the candidate measured fastest."""
    layer = _dgc_layer().eval()
    deployed = layer.deploy()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    ran = _count_runs(monkeypatch, SparseDynamicGroupConv2d)
    for fastest in ("masked", "head_grouped", "batch_grouped", "cpu_kernel"):
        clear_measured_choices()
        ran.clear()

        def timer(call, repeat, fastest=fastest):
            call()
            return 1.0 if ran[-1] == fastest else 2.0

        monkeypatch.setattr(_base, "choice_timer", lambda device, timer=timer: timer)
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
    """The measured path of ``impl="auto"`` with the Triton form (CUDA), forced on CPU with
    the kernel in the interpreter: both candidates run, the choice is kept, outputs agree."""
    from dynaconv import LearnedGroupConv2d
    from dynaconv.layers.lgc import deployed as lgc_deployed

    torch.manual_seed(0)
    layer = LearnedGroupConv2d(16, 8, 1, learned_groups=2)
    layer.set_progress(0.3)
    deployed = layer.deploy().eval()
    x = torch.randn(2, 16, 3, 4)
    with torch.no_grad():
        expected = deployed.forward_torch(x)
    monkeypatch.setattr(_base, "triton_preferred", lambda *tensors: True)
    ran = _count_runs(monkeypatch, lgc_deployed.CondensedGroupConv2d)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), expected, rtol=1e-4, atol=1e-4)
        assert {"triton", "torch"} <= set(ran)
        keys = [k for k in measured_choices if k[0] == "CondensedGroupConv2d"]
        assert len(keys) == 1 and measured_choices.get(keys[0]) in ("triton", "torch")
        ran.clear()
        torch.testing.assert_close(deployed(x), expected, rtol=1e-4, atol=1e-4)
    assert ran == [measured_choices.get(keys[0])]  # looked up: one run, no measuring


# ------------------------------------------------------------------------------------------
# measured choices: cached per key, without side effects; the switch and the rule


def test_measured_choice_is_cached_per_key(monkeypatch):
    torch.manual_seed(0)
    layer = CondConv2d(8, 8, 3, padding=1, num_experts=3)
    twin = CondConv2d(8, 8, 3, padding=1, num_experts=3)  # same configuration
    ran = _count_runs(monkeypatch, CondConv2d)
    x = torch.randn(4, 8, 6, 6)
    layer(x)
    assert len(set(ran)) == len(CondConv2d.forms.impls) - 3  # every PyTorch form was timed
    assert len(measured_choices) == 1
    for module, training, measured in (
        (layer, True, False),  # looked up
        (twin, True, False),  # looked up by the twin too
        (layer, False, True),  # eval: another key (inference), measured once
        (twin, False, False),
    ):
        ran.clear()
        module.train(training)(torch.randn(4, 8, 6, 6))
        assert (len(ran) > 1) == measured
    assert len(measured_choices) == 2
    ran.clear()
    with torch.no_grad():
        layer(torch.randn(5, 8, 6, 6))  # another shape: measured
        assert len(ran) > 1
        ran.clear()
        layer(torch.randn(5, 8, 6, 6))
    assert len(ran) == 1 and len(measured_choices) == 3
    layer.double()(torch.randn(5, 8, 6, 6, dtype=torch.float64))  # another dtype
    assert len(measured_choices) == 4
    keys = list(measured_choices)
    assert all(k[0] == "CondConv2d" for k in keys)
    assert {(k[2], k[4], k[6]) for k in keys} == {
        ((4, 8, 6, 6), torch.float32, True),
        ((4, 8, 6, 6), torch.float32, False),
        ((5, 8, 6, 6), torch.float32, False),
        ((5, 8, 6, 6), torch.float64, False),
    }


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    grads = {
        f"{n}.grad": p.grad.clone() for n, p in module.named_parameters() if p.grad is not None
    }
    return state | grads


@pytest.mark.parametrize("family", ["condconv", "dgc"])
def test_measuring_leaves_outputs_state_and_gradients_untouched(family):
    """A measured call gives bit for bit what its chosen form gives alone: same output,
    gradients, buffers, lasso term and random number stream (CondConv's routing dropout)."""
    torch.manual_seed(0)
    if family == "condconv":
        layer = CondConv2d(6, 8, 3, padding=1, num_experts=3, routing_dropout=0.5)
    else:
        layer = DynamicGroupConv2d(8, 8, 3, padding=1, heads=2, squeeze_rate=2)
        with torch.no_grad():
            layer.fc2_weight.normal_()
        layer.set_progress(0.5)
    layer.train()
    explicit = copy.deepcopy(layer)
    x = torch.randn(3, layer.in_channels, 7, 7)
    for step in range(2):  # the second step accumulates into .grad
        torch.manual_seed(step)
        x1 = x.clone().requires_grad_()
        y = layer(x1)
        (y.square().mean() + layer.aux_loss()).backward()
        after = torch.get_rng_state()
        (key,) = [k for k in measured_choices if k[6]]  # the training step's measurement
        explicit.impl = measured_choices.get(key)
        torch.manual_seed(step)
        x2 = x.clone().requires_grad_()
        y2 = explicit(x2)
        (y2.square().mean() + explicit.aux_loss()).backward()
        assert torch.equal(torch.get_rng_state(), after)
        assert torch.equal(y, y2) and torch.equal(x1.grad, x2.grad)
        assert torch.equal(layer.aux_loss(), explicit.aux_loss())
        mine, theirs = _snapshot(layer), _snapshot(explicit)
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), name
    with torch.no_grad():  # inference: measured too, output as the chosen form's
        layer.eval(), explicit.eval()
        y = layer(x)
        (key,) = [k for k in measured_choices if not k[6]]
        explicit.impl = measured_choices.get(key)
        assert torch.equal(y, explicit(x))


def test_switched_off_auto_runs_the_rule_and_measures_nothing(monkeypatch):
    torch.manual_seed(0)
    layer = _dgc_layer().train()
    x = torch.randn(3, 8, 6, 6, dtype=torch.float64)
    ran = _count_runs(monkeypatch, DynamicGroupConv2d)
    rule = DynamicGroupConv2d.forms.rule
    assert dispatch.measuring_enabled()
    with dispatch.measuring(False):
        assert not dispatch.measuring_enabled()
        layer(x)
        with torch.no_grad():
            layer.eval()(x)
    assert dispatch.measuring_enabled()  # restored
    call = layer.form_call(x, None)
    assert ran == [rule(layer, call._replace(train=True))[0], rule(layer, call)[0]]
    assert ran == ["batch_grouped", "batch_grouped"]  # CPU, 3x3, some channels inactive
    assert len(measured_choices) == 0
    dispatch.set_measuring(False)
    try:
        layer(x)
        assert len(measured_choices) == 0
    finally:
        dispatch.set_measuring(True)
    torch.use_deterministic_algorithms(True)
    try:
        assert not dispatch.measuring_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    with pytest.raises(ValueError, match="enabled must be a bool"):
        dispatch.set_measuring("no")
    with pytest.raises(ValueError, match="after must be"):
        dispatch.set_measuring(True, after=-1)


def test_a_key_is_measured_from_its_third_call_by_default(monkeypatch):
    layer = CondConv2d(8, 8, 3, padding=1, num_experts=3).eval()
    ran = _count_runs(monkeypatch, CondConv2d)
    x = torch.randn(2, 8, 5, 5)
    rule = CondConv2d.forms.rule(layer, layer.form_call(x))[0]
    with dispatch.measuring(True, after=2), torch.no_grad():
        assert dispatch.measure_after() == 2
        for _ in range(2):
            layer(x)
        assert ran == [rule, rule] and len(measured_choices) == 0  # the rule, twice
        layer(x)  # the third call measures
        assert len(ran) > 3 and len(measured_choices) == 1
    assert dispatch.measure_after() == 0  # restored (this file's fixture)


def test_a_layer_reuses_its_last_final_choice_until_the_cache_or_the_switch_changes(
    monkeypatch,
):
    """The per-call path of ``auto``: a layer called again with the same signature (input
    shape, strides, dtype, device, mode, configuration) runs its last final choice without
    building the measured choice's key; a cleared cache, the switch, deterministic algorithms
    and another shape or configuration all choose again."""
    torch.manual_seed(0)
    layer = DynamicGroupConv2d(8, 8, 3, padding=1, heads=2, squeeze_rate=2).eval()
    keys: list[int] = []
    form_key = ChoosesForm.form_key

    def counted_key(self, *args):
        keys.append(1)
        return form_key(self, *args)

    monkeypatch.setattr(ChoosesForm, "form_key", counted_key)
    ran = _count_runs(monkeypatch, DynamicGroupConv2d)
    x = torch.randn(2, 8, 5, 5)
    layer.set_inactive_channels(3)
    with torch.no_grad():
        layer(x)  # measures (from the first call in this file)
        (key,) = measured_choices
        measured = measured_choices.get(key)
        keys.clear(), ran.clear()
        for _ in range(3):
            layer(x)
        assert keys == [] and ran == [measured] * 3  # no key built, nothing looked up
        layer(torch.randn(3, 8, 5, 5))  # another shape: its own measurement
        assert keys and len(measured_choices) == 2
        layer.set_inactive_channels(7)  # another configuration (k_off bucket)
        layer(torch.randn(3, 8, 5, 5))
        assert len(measured_choices) == 3
        clear_measured_choices()
        ran.clear()
        layer(x)
        assert len(ran) > 1  # measured again, not the memo
        rule = DynamicGroupConv2d.forms.rule(layer, layer.form_call(x))[0]
        for switched_off in (
            lambda: dispatch.measuring(False),
            lambda: _deterministic_algorithms(),
        ):
            with switched_off():
                ran.clear()
                layer(x)
                assert ran == [rule]
            ran.clear()
            layer(x)
            assert len(ran) == 1 and len(measured_choices) == 1  # the measured choice again


@contextlib.contextmanager
def _deterministic_algorithms():
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def test_the_rule_of_a_keys_first_calls_is_not_kept(monkeypatch):
    """Before a key is measured (its first ``measure_after()`` calls) the rule runs; that
    choice is not final, so the call that measures still comes."""
    layer = CondConv2d(8, 8, 3, padding=1, num_experts=3).eval()
    ran = _count_runs(monkeypatch, CondConv2d)
    x = torch.randn(2, 8, 5, 5)
    with dispatch.measuring(True, after=3), torch.no_grad():
        for _ in range(3):
            layer(x)
        assert len(ran) == 3 and len(measured_choices) == 0
        layer(x)
        assert len(ran) > 4 and len(measured_choices) == 1


def test_cpu_choices_time_the_threads_cpu_time_with_one_torch_thread():
    """With one torch thread a CPU choice reads the thread's CPU time: time spent waiting for
    a core (other processes' load; here a sleep) does not count. With more threads the wall
    clock (the work runs on several threads); CUDA events on CUDA."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert dispatch.choice_timer(torch.device("cpu")) is dispatch.thread_timer
        torch.set_num_threads(2)
        assert dispatch.choice_timer(torch.device("cpu")) is dispatch.host_timer
    finally:
        torch.set_num_threads(threads)
    assert dispatch.choice_timer(torch.device("cuda")) is dispatch.cuda_timer
    assert dispatch.thread_timer(lambda: time.sleep(0.05), 2) < 20  # ms, against 100 slept
    assert dispatch.host_timer(lambda: time.sleep(0.05), 2) >= 100
    busy = dispatch.thread_timer(lambda: sum(range(200_000)), 1)
    assert busy > 0


def test_the_environment_variable_switches_measuring_off():
    code = "from dynaconv import dispatch; print(dispatch.measuring_enabled())"
    for value, expected in (("0", "False"), ("1", "True")):
        env = {**os.environ, dispatch.MEASURE_ENV: value}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == expected


def test_an_unusable_triton_form_is_an_error_never_a_fallback(monkeypatch):
    monkeypatch.setattr(_base, "triton_unusable_reason", lambda *tensors: "no GPU here")
    x = torch.randn(2, 8, 5, 5)
    for layer in (
        GroupableConv2d(8, 8, 3, padding=1, impl="triton"),
        CondConv2d(8, 8, 3, impl="triton"),
        DynamicGroupConv2d(8, 8, 3, impl="triton"),
    ):
        with pytest.raises(ValueError, match="impl='triton' cannot run this call: no GPU here"):
            layer(x)
        layer.impl = "auto"
        assert layer.choose_form(x) != "triton"  # auto on CPU never picks a Triton form
    with pytest.raises(ValueError, match="no GPU"):
        monkeypatch.setattr(dgconv_module, "triton_unusable_reason", lambda *t: "no GPU")
        GroupableConv2d(8, 8, 3, impl="triton").weight


def test_dgc_schedule_steps_share_measurements_within_an_eighth_of_the_channels():
    """k_off changes nearly every step of the schedule's ramp: keyed on it exactly, every step
    would measure anew. Counts within one eighth of the channels share one measurement; no
    inactive channel (the masked form's case) is a key of its own."""
    torch.manual_seed(0)
    layer = DynamicGroupConv2d(64, 64, 3, padding=1, heads=4).train()
    x = torch.randn(2, 64, 5, 5)
    for count in (0, 1, 7, 8, 9, 40):
        layer.set_inactive_channels(count)
        layer(x)
    buckets = sorted(k[1][3] for k in measured_choices)
    assert buckets == [0, 1, 2, 6]  # {0}, {1, 7}, {8, 9}, {40}

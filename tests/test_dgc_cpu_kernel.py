"""The deployed DGC layer's compiled CPU kernel (``impl="cpu_kernel"``) against the gathered
reference form in float64, its refusals, and the build machinery of :mod:`dynaconv.native`."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaconv import native
from dynaconv.layers.dgc import cpu
from dynaconv.layers.dgc.functional import (
    dense_masked_conv,
    gate_dense,
    gathered_conv,
    select_kept,
)
from dynaconv.layers.dgc.layer import DynamicGroupConv2d
from dynaconv.spec import ConvSpec

pytestmark = pytest.mark.skipif(
    cpu.unusable_reason(torch.zeros(1)) is not None,
    reason=f"the compiled kernel cannot be built here: {cpu.unusable_reason(torch.zeros(1))}",
)


def _selection(batch: int, heads: int, cin: int, keep: int, generator: torch.Generator):
    """Random kept channels (distinct per example and head) and scales, some of them 0 (the
    reference's ties at the threshold)."""
    index = torch.stack(
        [torch.randperm(cin, generator=generator)[:keep] for _ in range(batch * heads)]
    ).reshape(batch, heads, keep)
    scale = torch.rand(batch, heads, keep, generator=generator, dtype=torch.float64) + 0.25
    scale[..., -1:] *= torch.randint(0, 2, (batch, heads, 1), generator=generator)
    return index, scale


shapes = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 3),
        "heads": st.sampled_from([1, 2, 3, 4]),
        "cin": st.integers(2, 10),
        # per head: 1 to 5 vectors of 8 float64 values (the direct tiles take 2 or 3)
        "cout_per_head": st.sampled_from([1, 3, 8, 9, 16, 20, 24, 33]),
        "kernel": st.sampled_from([1, 3, 5, (3, 1), (1, 3)]),
        "stride": st.sampled_from([1, 2, (2, 1)]),
        "dilation": st.sampled_from([1, 2]),
        "padding": st.sampled_from([0, 1, 2, (2, 0)]),
        # short rows (packed tiles) and rows of 8-20 positions (direct tiles)
        "size": st.sampled_from([(4, 4), (5, 7), (8, 8), (9, 17), (6, 20), (18, 16)]),
        "bias": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


def _case(cfg, dtype=torch.float64):
    generator = torch.Generator().manual_seed(cfg["seed"])
    heads, cin = cfg["heads"], cfg["cin"]
    spec = ConvSpec.create(
        cin,
        heads * cfg["cout_per_head"],
        cfg["kernel"],
        cfg["stride"],
        cfg["padding"],
        cfg["dilation"],
        1,
        cfg["bias"],
    )
    weight = torch.randn(spec.out_channels, cin, *spec.kernel_size, generator=generator)
    weight = weight.to(torch.float64)
    x = torch.randn(cfg["batch"], cin, *cfg["size"], generator=generator, dtype=torch.float64)
    keep = int(torch.randint(1, cin + 1, (1,), generator=generator))
    index, scale = _selection(cfg["batch"], heads, cin, keep, generator)
    bias = torch.randn(spec.out_channels, generator=generator, dtype=torch.float64)
    return spec, weight, x, index, scale, bias if cfg["bias"] else None


def _fits(spec: ConvSpec, size) -> bool:
    out_h, out_w = spec.output_size(*size)
    return out_h > 0 and out_w > 0


@settings(max_examples=120, deadline=None)
@given(cfg=shapes)
def test_cpu_kernel_equals_the_gathered_reference_float64(cfg):
    spec, weight, x, index, scale, bias = _case(cfg)
    if not _fits(spec, cfg["size"]):
        return
    expected = gathered_conv(x, weight, index, scale, spec, cfg["heads"])
    if bias is not None:
        expected = expected + bias.reshape(1, -1, 1, 1)
    rows = cpu.kernel_layout(weight, cfg["heads"])
    got = cpu.gathered_conv_cpu(x, rows, index, scale, spec, cfg["heads"], bias)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # float32: the same selection, float32 arithmetic (tolerance of its rounding)
    got32 = cpu.gathered_conv_cpu(
        x.float(),
        cpu.kernel_layout(weight.float(), cfg["heads"]),
        index,
        scale.float(),
        spec,
        cfg["heads"],
        None if bias is None else bias.float(),
    )
    torch.testing.assert_close(got32.double(), expected, rtol=1e-4, atol=1e-4)


def _deployed(cin=16, cout=32, size_kwargs=None, heads=4, bias=True):
    torch.manual_seed(0)
    layer = DynamicGroupConv2d(
        cin, cout, 3, padding=1, bias=bias, heads=heads, gate_factor=0.5, dtype=torch.float64
    )
    with torch.no_grad():
        layer.fc2_bias.normal_()  # saliencies mostly positive: the kept channels matter
    layer.set_progress(1.0)
    layer.eval()
    return layer, layer.deploy().eval()


@pytest.mark.parametrize("size", [(4, 4), (8, 8), (16, 16), (19, 23)])
@pytest.mark.parametrize("batch", [1, 3])
def test_deployed_cpu_kernel_equals_the_layer_float64(size, batch):
    """Through the deployed module (bias fused in the kernel), on maps that take packed and
    direct tiles, contiguous and channels-last inputs."""
    layer, deployed = _deployed()
    deployed.impl = "cpu_kernel"
    x = torch.rand(batch, 16, *size, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)
        torch.testing.assert_close(deployed(x), expected, rtol=1e-12, atol=1e-12)
        channels_last = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(deployed(channels_last), expected, rtol=1e-12, atol=1e-12)
    assert deployed.form(x) == "cpu_kernel"


def test_auto_measures_the_cpu_kernel_and_refuses_it_with_gradients():
    _, deployed = _deployed()
    x = torch.rand(1, 16, 8, 8, dtype=torch.float64)
    from dynaconv.layers._base import FormCall

    with torch.no_grad():
        call = FormCall(x, False, False)
        assert "cpu_kernel" in deployed.form_candidates(call)
    deployed.impl = "cpu_kernel"
    needs_grad = x.clone().requires_grad_()
    with pytest.raises(ValueError, match=r"cpu_kernel.*no gradient"):
        deployed(needs_grad)
    deployed.impl = "auto"  # auto runs another form, and the gradient flows
    deployed(needs_grad).sum().backward()
    assert needs_grad.grad is not None and needs_grad.grad.abs().sum() > 0


def test_the_kernel_refuses_what_it_cannot_compute():
    spec = ConvSpec.create(4, 8, 3, 1, 1, 1, 1, False)
    weight = torch.randn(8, 4, 3, 3)
    index = torch.tensor([[[0, 2], [1, 3]]])
    scale = torch.ones(1, 2, 2)
    with pytest.raises(ValueError, match="float32 or float64"):
        cpu.gathered_conv_cpu(
            torch.randn(1, 4, 5, 5).bfloat16(),
            cpu.kernel_layout(weight, 2).bfloat16(),
            index,
            scale.bfloat16(),
            spec,
            2,
        )
    with pytest.raises(ValueError, match="no gradient"):
        cpu.gathered_conv_cpu(
            torch.randn(1, 4, 5, 5, requires_grad=True),
            cpu.kernel_layout(weight, 2),
            index,
            scale,
            spec,
            2,
        )


def test_select_kept_feeds_the_kernel_the_reference_gate():
    """The deployed form's whole path on random saliencies: ``select_kept`` then the kernel
    equals the masked reference (ties with the threshold included)."""
    layer, _ = _deployed(cin=12, cout=8, heads=2, bias=False)
    x = torch.rand(2, 12, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        g = (layer.saliency(x) * 2).round() / 2  # quantised: many ties
        index, scale = select_kept(g, int(layer.inactive_channels))
        got = cpu.gathered_conv_cpu(
            x, cpu.kernel_layout(layer.weight, 2), index, scale, layer.spec, 2
        )
        gate = gate_dense(g, layer.inactive_channels)
        expected = dense_masked_conv(x, layer.weight, gate, layer.spec, 2)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


# --- dynaconv.native -------------------------------------------------------------------------

_PROBE = textwrap.dedent(
    """
    import sys
    from dynaconv import native
    library = native.load(sys.argv[1])
    print(library is not None, native.unavailable_reason(sys.argv[1]))
    """
)


def _probe(source, env):
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, str(source)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.strip()


def test_native_builds_once_into_the_cache_and_reports_failures(tmp_path):
    source = tmp_path / "answer.cpp"
    source.write_text('extern "C" int answer(void) { return 42; }\n')
    env = {"DYNACONV_CACHE_DIR": str(tmp_path / "cache"), "DYNACONV_NATIVE": "1"}
    assert _probe(source, env) == "True None"
    built = list((tmp_path / "cache" / "native").glob("answer-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    assert _probe(source, env) == "True None"  # a second process loads the cached library
    assert built[0].stat().st_mtime_ns == stamp
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    assert _probe(broken, env).startswith("False broken.cpp did not compile:")
    assert _probe(source, {**env, "DYNACONV_NATIVE": "0"}) == (
        "False compiled kernels are switched off (DYNACONV_NATIVE=0)"
    )
    assert _probe(source, {**env, "CXX": "no-such-compiler-here"}).startswith(
        "False no C++ compiler"
    )


def test_native_load_returns_a_working_library(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNACONV_CACHE_DIR", str(tmp_path))
    source = tmp_path / "twice.cpp"
    source.write_text(
        "#ifdef TIMES_THREE\n"
        'extern "C" long scaled(long value) { return 3 * value; }\n'
        "#else\n"
        'extern "C" long scaled(long value) { return 2 * value; }\n'
        "#endif\n"
    )
    library = native.load(source)
    assert library is not None and library.scaled(21) == 42
    assert native.load(source) is library  # one build and load per process
    tripled = native.load(source, ("TIMES_THREE",))  # each set of defines: its own library
    assert tripled is not None and tripled is not library and tripled.scaled(21) == 63
    assert len(list((tmp_path / "native").glob("twice*.so"))) == 2


@settings(max_examples=80, deadline=None)
@given(cfg=shapes, ties=st.booleans(), nan=st.booleans())
def test_selection_inside_the_kernel_equals_select_kept_float64(cfg, ties, nan):
    """``selected_conv_cpu`` (the selection made in C) against ``select_kept`` then the
    kernel, on saliencies with many ties at the threshold (quantised) or NaNs (ranked above
    everything, as ``torch.topk`` ranks them)."""
    spec, weight, x, _, _, bias = _case(cfg)
    if not _fits(spec, cfg["size"]):
        return
    heads, cin = cfg["heads"], cfg["cin"]
    generator = torch.Generator().manual_seed(cfg["seed"] + 1)
    g = torch.rand(heads, cfg["batch"], cin, generator=generator, dtype=torch.float64)
    g = g.transpose(0, 1)  # strided like the saliency generator's output
    if ties:
        g = (g * 3).round() / 3
    if nan:
        g = g.clone()
        g[0, 0, 0] = float("nan")
    keep = int(torch.randint(1, cin + 1, (1,), generator=generator))
    rows = cpu.kernel_layout(weight, heads)
    index, scale = select_kept(g, cin - keep)
    expected = cpu.gathered_conv_cpu(x, rows, index, scale, spec, heads, bias)
    got = cpu.selected_conv_cpu(x, g, keep, rows, spec, heads, bias)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_without_the_kernel_auto_runs_the_pytorch_forms_and_the_explicit_impl_says_why(
    monkeypatch,
):
    monkeypatch.setattr(cpu, "_entries", lambda dtype: None)
    monkeypatch.setattr(native, "unavailable_reason", lambda *source: "no C++ compiler (test)")
    # a configuration no other test measures: the per-configuration candidate cache is fresh
    layer, deployed = _deployed(cin=24, cout=12, heads=3)
    x = torch.rand(1, 24, 7, 7, dtype=torch.float64)
    from dynaconv.layers._base import FormCall

    with torch.no_grad():
        assert "cpu_kernel" not in deployed.form_candidates(FormCall(x, False, False))
        torch.testing.assert_close(deployed(x), layer(x), rtol=1e-12, atol=1e-12)
        assert deployed.form(x) != "cpu_kernel"
        deployed.impl = "cpu_kernel"
        with pytest.raises(ValueError, match=r"impl='cpu_kernel'.*no C\+\+ compiler \(test\)"):
            deployed(x)


def test_settled_choice_frees_the_layouts_no_settled_form_reads():
    """``auto`` measures every candidate (each caches its weight layout); once its choice is
    settled, only the layouts of settled forms stay, and later calls stay exact (another
    input shape rebuilds what its form needs)."""
    from dynaconv.layers.dgc.deployed import FORM_LAYOUTS

    layer, deployed = _deployed(cin=32, cout=32)
    x = torch.rand(1, 32, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)
        for _ in range(14):  # measured, rechecked, settled
            torch.testing.assert_close(deployed(x), expected, rtol=1e-12, atol=1e-12)
        chosen = deployed.form(x)
        assert set(deployed._layouts) <= set(FORM_LAYOUTS[chosen])
        assert deployed.__dict__["_settled_forms"] == {chosen}
        batch = torch.rand(5, 32, 8, 8, dtype=torch.float64)
        for _ in range(14):
            torch.testing.assert_close(deployed(batch), layer(batch), rtol=1e-12, atol=1e-12)
        reads = set().union(*(FORM_LAYOUTS[form] for form in deployed._settled_forms))
        assert set(deployed._layouts) <= reads  # the second shape's measuring freed too
        torch.testing.assert_close(deployed(x), expected, rtol=1e-12, atol=1e-12)


def test_bad_arguments_get_a_clear_error_naming_them():
    """The public calls check what the kernel would read out of bounds or misread."""
    spec = ConvSpec.create(4, 8, 3, 1, 1, 1, 1, False)
    weight = torch.randn(8, 4, 3, 3)
    rows = cpu.kernel_layout(weight, 2)
    x = torch.randn(1, 4, 5, 5)
    index = torch.tensor([[[0, 2], [1, 3]]])
    scale = torch.ones(1, 2, 2)
    g = torch.rand(1, 2, 4)
    cases = [
        (lambda: cpu.gathered_conv_cpu(x, rows, index + 2, scale, spec, 2), "index must hold"),
        (lambda: cpu.gathered_conv_cpu(x, rows, index - 1, scale, spec, 2), "index must hold"),
        (lambda: cpu.gathered_conv_cpu(x, rows, index.float(), scale, spec, 2), "integers"),
        (lambda: cpu.gathered_conv_cpu(x, rows, index[:, :1], scale, spec, 2), "index must be"),
        (lambda: cpu.gathered_conv_cpu(x, rows, index, scale[..., :1], spec, 2), "scale must"),
        (lambda: cpu.gathered_conv_cpu(x[:, :3], rows, index, scale, spec, 2), "x must be"),
        (lambda: cpu.gathered_conv_cpu(x, rows[:4], index, scale, spec, 2), "rows must be"),
        (lambda: cpu.gathered_conv_cpu(x, rows, index, scale, spec, 3), "divisible by heads"),
        (
            lambda: cpu.gathered_conv_cpu(x, rows, index, scale, spec, 2, torch.ones(3)),
            "bias must be",
        ),
        (lambda: cpu.selected_conv_cpu(x, g, 0, rows, spec, 2), "keep must be"),
        (lambda: cpu.selected_conv_cpu(x, g, 5, rows, spec, 2), "keep must be"),
        (lambda: cpu.selected_conv_cpu(x, g[..., :3], 2, rows, spec, 2), "g must have"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
    good = cpu.gathered_conv_cpu(x, rows, index, scale, spec, 2)  # the same call, well formed
    assert good.shape == (1, 8, 5, 5) and good.abs().sum() > 0


def test_under_autocast_the_output_follows_autocast_like_every_other_form():
    """A choice settled without autocast is not reused under it (the choice is per autocast
    state, and the kernel is no candidate there): the output follows autocast (bfloat16, like
    ``masked``); an explicit ``impl="cpu_kernel"`` refuses."""
    layer, deployed = _deployed(cin=32, cout=32)
    layer, deployed = layer.float(), deployed.float()
    x = torch.rand(1, 32, 8, 8)
    masked = copy.deepcopy(deployed)
    masked.impl = "masked"
    with torch.no_grad():
        for _ in range(14):
            expected = deployed(x)
        assert deployed.form(x) == "cpu_kernel"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = deployed(x)
            reference = masked(x)
        assert low.dtype == reference.dtype == torch.bfloat16
        torch.testing.assert_close(low, reference)
        torch.testing.assert_close(low.float(), expected, rtol=5e-2, atol=5e-2)
        deployed.impl = "cpu_kernel"
        with (
            torch.autocast("cpu", dtype=torch.bfloat16),
            pytest.raises(ValueError, match="autocast"),
        ):
            deployed(x)

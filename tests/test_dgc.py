"""DGC: reference fixtures, schedule, lasso, dense == sparse == Triton, deploy, export, counts."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import dynaconv
from conftest import assert_close64, load_fixture
from dynaconv import DynamicGroupConv2d
from dynaconv.compat import layer_from_reference, model_from_reference
from dynaconv.layers.dgc.deployed import traced_inference_form
from dynaconv.layers.dgc.functional import gathered_conv, head_grouped_conv, kernel_rows
from dynaconv.layers.dgc.kernels import GatedHeadsConv
from dynaconv.layers.dgc.layer import (
    SparseDynamicGroupConv2d,
    gate_dense,
    inactive_channels_at,
    lasso,
    reference_squeeze_rate,
    select_kept,
)
from dynaconv.models import DigitsCNN, dydensenet86, dyresnet18

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer_fixture():
    data = load_fixture("dgc", "layer_public.pt")
    module = layer_from_reference("dgc", data["config"], data["state_dict"]).double()
    return data, module


# ------------------------------------------------------------------------------ fixtures
@pytest.mark.parametrize("impl", ["dense", "sparse"])
def test_layer_fixture_eval(impl):
    data, module = _layer_fixture()
    module.eval()
    module.conv.impl = impl
    x = data["x"].double()
    assert module.conv.inactive_channels.item() == data["eval"]["inactive_channels"] == 48
    with torch.no_grad():
        assert_close64(module(x), data["eval"]["y"])
        g = module.conv.saliency(module.relu(module.norm(x)))
    assert math.isclose(lasso(g).item(), data["eval"]["lasso"], rel_tol=1e-12)
    deployed = dynaconv.deploy(module, example_input=x)
    assert isinstance(deployed.conv, SparseDynamicGroupConv2d)
    assert deployed.conv.kept == 16
    with torch.no_grad():
        assert_close64(deployed(x), data["eval"]["y"])


@pytest.mark.parametrize("impl", ["dense", "sparse"])
def test_layer_fixture_train_after_set_progress(impl):
    data, module = _layer_fixture()
    module.train()
    module.conv.impl = impl
    assert float(module.conv.aux_loss()) == 0.0  # no training forward yet
    dynaconv.set_progress(module, data["train"]["progress"])
    assert module.conv.inactive_channels.item() == data["train"]["inactive_channels_after"] == 30
    y = module(data["x"].double())
    assert_close64(y, data["train"]["y"])
    assert math.isclose(dynaconv.aux_loss(module).item(), data["train"]["lasso"], rel_tol=1e-12)
    assert module.conv.aux_loss().requires_grad


def test_dydensenet86_fixture_and_deployed_form():
    data = load_fixture("dgc", "dydensenet86_cifar10.pt")
    net = model_from_reference("dydensenet", data["config"], data["state_dict"]).double().eval()
    x = data["x"].double()
    saliency_means = []

    def record(layer, inputs):
        saliency_means.append(lasso(layer.saliency(inputs[0])))

    layers = [m for m in net.modules() if isinstance(m, DynamicGroupConv2d)]
    assert len(layers) == 42
    assert all(m.kept_channels * 4 == m.in_channels for m in layers)
    handles = [m.register_forward_pre_hook(record) for m in layers]
    with torch.no_grad():
        y = net(x)
    for handle in handles:
        handle.remove()
    assert_close64(y, data["y"])
    assert math.isclose(torch.stack(saliency_means).sum().item(), data["lasso_sum"], rel_tol=1e-12)
    deployed = dynaconv.deploy(net, verify=False)  # verified against the fixture below
    assert not any(isinstance(m, DynamicGroupConv2d) for m in deployed.modules())
    with torch.no_grad():
        assert_close64(deployed(x), data["y"])


def test_reference_counts_dydensenet86():
    data = load_fixture("dgc", "counts.pt")["counts"]["dydensenet86_cifar10"]
    net = dydensenet86()
    dynaconv.set_progress(net, 1.0)
    prof = dynaconv.profile(net, (1, 3, 32, 32), convention="reference", deployed=False)
    assert prof["macs_active"] == data["measure_model"]["flops"] == 71037118
    assert prof["params"] == data["measure_model"]["params"] == 4264810
    # The honest (dense convention) count: the head convs at 1/4, no ReLU/pool ops.
    dense = dynaconv.profile(net, (1, 3, 32, 32))
    assert dense["macs_active"] < prof["macs_active"] < dense["macs"]


def test_reference_counts_dyresnet18():
    data = load_fixture("dgc", "counts.pt")["counts"]["dyresnet18_imagenet_h4_g045"]
    net = dyresnet18()
    size = data["image_size"]
    prof = dynaconv.profile(net, (1, 3, size, size), convention="reference", deployed=False)
    # The reference counter's total is fractional (heads at gate_factor); counts are ints.
    assert prof["macs_active"] == round(data["measure_model"]["flops"]) == 890396782
    assert isinstance(prof["macs_active"], int) and isinstance(prof["macs"], int)
    assert "MACs" in str(prof)  # the rows are ints too (a fraction broke the table)
    assert prof["params"] == data["measure_model"]["params"] == 12335144
    assert dyresnet18(num_classes=7).fc.out_features == 7


def _reference_dgc_keys(layer: DynamicGroupConv2d, prefix: str, generator) -> dict:
    """Random tensors under the reference DynamicMultiHeadConv's key names."""
    heads, hidden, cin = layer.fc1_weight.shape
    cout_h = layer.out_channels // heads
    keys = {f"{prefix}_inactive_channels": torch.tensor([float(cin // 2)])}
    for name in ("weight", "bias", "running_mean"):
        keys[f"{prefix}norm.{name}"] = torch.randn(cin, generator=generator)
    keys[f"{prefix}norm.running_var"] = torch.rand(cin, generator=generator) + 0.5
    keys[f"{prefix}norm.num_batches_tracked"] = torch.tensor(3)
    for i in range(heads):
        head = f"{prefix}headconv_{i}."
        keys[head + "conv.weight"] = torch.randn(
            cout_h, cin, *layer.kernel_size, generator=generator
        )
        keys[head + "fc1.weight"] = torch.randn(hidden, cin, generator=generator)
        keys[head + "fc2.weight"] = torch.randn(cin, hidden, generator=generator)
        keys[head + "fc2.bias"] = torch.randn(cin, generator=generator)
    return keys


def test_dyresnet18_loader_places_reference_tensors():
    generator = torch.Generator().manual_seed(0)
    template = dyresnet18(num_classes=5)
    reference = {
        "conv1.weight": torch.randn(64, 3, 7, 7, generator=generator),
        "fc.weight": torch.randn(5, 512, generator=generator),
        "fc.bias": torch.randn(5, generator=generator),
    }
    for name, module in template.named_modules():
        if isinstance(module, DynamicGroupConv2d):
            ref_name = name.removesuffix(".conv")  # native unit: BN-ReLU-DGC under one name
            reference |= _reference_dgc_keys(module, ref_name + ".", generator)
        elif isinstance(module, nn.BatchNorm2d) and not name.endswith(".norm"):
            ref_name = name.replace("downsample.1", "downsample.1.norm")
            for key, value in module.state_dict().items():
                reference[f"{ref_name}.{key}"] = torch.randn_like(value.double()).to(value.dtype)
    net = model_from_reference("dyresnet18", {"heads": 4, "gate_factor": 0.45}, reference)
    assert net.fc.out_features == 5
    dgc = net.layer2[0].downsample[0].conv
    assert dgc.kernel_size == (1, 1) and dgc.stride == (2, 2)
    ref = "layer2.0.downsample.0."
    for i in range(4):  # output channel j*h + i comes from head i
        torch.testing.assert_close(dgc.weight[i::4], reference[f"{ref}headconv_{i}.conv.weight"])
        torch.testing.assert_close(dgc.fc2_bias[i], reference[f"{ref}headconv_{i}.fc2.bias"])
    torch.testing.assert_close(
        net.layer2[0].downsample[0].norm.weight, reference[ref + "norm.weight"]
    )
    torch.testing.assert_close(
        net.layer2[0].downsample[1].weight, reference["layer2.0.downsample.1.norm.weight"]
    )
    assert dgc.inactive_channels.item() == 32
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 5)


# ------------------------------------------------------------------------------ schedule
@pytest.mark.parametrize("cin,gate_factor", [(64, 0.25), (100, 0.45), (24, 1.0)])
def test_schedule_formula(cin, gate_factor):
    layer = DynamicGroupConv2d(cin, 8, 1, gate_factor=gate_factor)
    previous = 0
    for step in range(0, 101):
        p = step / 100
        layer.set_progress(p)
        expected = 0
        if 1 / 12 < p < 3 / 4:
            expected = round(cin * (1 - gate_factor) * 1.5 * (p - 1 / 12))
        elif p >= 3 / 4:
            expected = round(cin * (1 - gate_factor))
        assert layer.inactive_channels.item() == expected == layer._inactive
        assert expected >= previous
        previous = expected
    assert layer.kept_channels == cin - round(cin * (1 - gate_factor))
    assert inactive_channels_at(0.5, 64, 0.25) == 30


def test_eval_forward_changes_no_state():
    layer = DynamicGroupConv2d(16, 8, 3, padding=1).eval()
    layer.set_progress(0.9)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(torch.randn(2, 16, 5, 5))
    assert layer._last_lasso is None
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key])


def test_reference_squeeze_rate():
    assert reference_squeeze_rate(64, 16) == 8
    assert reference_squeeze_rate(80, 16) == 16


# ------------------------------------------------------------------------------ exactness
def _padding(cfg) -> int | str:
    natural = cfg["kernel"] // 2 * cfg["dilation"]
    choice = cfg.get("padding", "natural")
    if choice == "same" and cfg["stride"] == 1:
        return "same"
    # "over": more than the kernel's reach, so a transposed conv would need negative padding.
    return {"none": 0, "over": natural + 1}.get(choice, natural)


def _random_layer(cfg) -> DynamicGroupConv2d:
    torch.manual_seed(cfg["seed"])
    cin = cfg["cin"]
    layer = DynamicGroupConv2d(
        cin,
        cfg["cout_per_head"] * cfg["heads"],
        cfg["kernel"],
        stride=cfg["stride"],
        padding=_padding(cfg),
        dilation=cfg["dilation"],
        bias=cfg["bias"],
        padding_mode=cfg["padding_mode"],
        heads=cfg["heads"],
        squeeze_rate=2,
        gate_factor=cfg["gate_factor"],
        dtype=torch.float64,
    )
    with torch.no_grad():
        layer.fc2_bias.normal_()
        if cfg["ties"]:  # duplicated saliencies: channel pairs get identical generators
            half = cin // 2
            layer.fc2_weight[:, half : 2 * half] = layer.fc2_weight[:, :half]
            layer.fc2_bias[:, half : 2 * half] = layer.fc2_bias[:, :half]
    layer.set_progress(cfg["progress"])
    return layer


layer_configs = st.fixed_dictionaries(
    {
        "cin": st.integers(4, 12),
        "cout_per_head": st.integers(1, 3),
        "heads": st.sampled_from([1, 2, 4]),
        "kernel": st.sampled_from([1, 3]),
        "stride": st.integers(1, 2),
        "dilation": st.integers(1, 2),
        "bias": st.booleans(),
        "padding_mode": st.sampled_from(["zeros", "reflect", "circular"]),
        "padding": st.sampled_from(["natural", "none", "over", "same"]),
        "gate_factor": st.sampled_from([0.25, 0.5, 0.75, 1.0]),
        "progress": st.sampled_from([0.0, 0.3, 0.5, 1.0]),
        "ties": st.booleans(),
        "batch": st.integers(1, 3),
        # examples repeated at the end of the batch: they keep the same channels as the
        # first ones (the head-grouped form shares their kernels)
        "repeats": st.integers(0, 2),
        "seed": st.integers(0, 2**16),
    }
)


def _batch(cfg, height: int, width: int, requires_grad: bool = False) -> torch.Tensor:
    x = torch.rand(cfg["batch"], cfg["cin"], height, width, dtype=torch.float64)
    x = torch.cat([x, x[: cfg.get("repeats", 0)]])
    return x.requires_grad_(requires_grad)


SPARSE_FORMS = ["sparse", "grouped", "head_grouped"]
DEPLOYED_FORMS = ["auto", "torch", "masked", "bmm", "batch_grouped", "head_grouped", "cpu_kernel"]


def _outputs(layer, x, impls):
    outs = {}
    for impl in impls:
        layer.impl = impl
        outs[impl] = layer(x)
    return outs


@given(cfg=layer_configs)
def test_dense_equals_sparse_float64(cfg):
    layer = _random_layer(cfg)
    x = _batch(cfg, 6, 5)
    for mode in ("eval", "train"):
        layer.train(mode == "train")
        outs = _outputs(layer, x, ["dense", *SPARSE_FORMS])
        for impl in SPARSE_FORMS:
            assert_close64(outs[impl], outs["dense"], rtol=1e-12, atol=1e-13)
    with torch.no_grad():  # the measured inference forms of the layer itself
        for impl in ("auto", "torch"):
            layer.impl = impl
            assert_close64(layer(x), outs["dense"], rtol=1e-12, atol=1e-13)
    deployed = layer.eval().deploy()
    with torch.no_grad():
        for impl in DEPLOYED_FORMS:
            deployed.impl = impl
            assert_close64(deployed(x), outs["dense"], rtol=1e-12, atol=1e-13)


@given(cfg=layer_configs, share=st.booleans())
def test_inference_forms_equal_the_masked_reference_float64(cfg, share):
    """Every standalone inference form against the masked reference, with examples that keep
    the same channels (``share``: input-independent saliencies; repeated examples) or not;
    and the head-grouped form with shared kept sets but per-example scales."""
    from dynaconv.layers.dgc.deployed import FORMS, run_inference_form

    layer = _random_layer(cfg).eval()
    if share:  # saliency = relu(fc2 bias): the same kept set for every example
        with torch.no_grad():
            layer.fc2_weight.zero_()
    x = _batch(cfg, 7, 6)
    with torch.no_grad():
        g = layer.saliency(x)
        inactive = int(layer.inactive_channels)
        expected = dynaconv.layers.dgc.functional.dense_masked_conv(
            x, layer.weight, gate_dense(g, layer.inactive_channels), layer.spec, layer.heads
        )
        forms = set(FORMS) - {"triton"}  # every PyTorch form of the deployed module
        for form in sorted(forms):
            out = run_inference_form(form, x, g, inactive, layer.weight, layer.spec, layer.heads)
            assert_close64(out, expected, rtol=1e-12, atol=1e-13)
        index, _ = select_kept(g, inactive)
        index = index[:1].expand_as(index)  # one kept set per head for all examples
        scale = torch.rand(index.shape, dtype=torch.float64) + 0.5
        rows = kernel_rows(layer.weight, layer.heads, layer.spec)
        assert_close64(
            head_grouped_conv(x, rows, index, scale, layer.spec, layer.heads),
            gathered_conv(x, layer.weight, index, scale, layer.spec, layer.heads),
            rtol=1e-12,
            atol=1e-13,
        )


@given(
    cfg=layer_configs,
    extra=st.integers(0, 12),
    ties=st.booleans(),
)
def test_padded_selection_adds_zero_scaled_channels_only(cfg, extra, ties):
    """``select_kept`` with a ``width`` beyond ``K``: the first ``K`` entries are the unpadded
    selection, the rest distinct further channels with scale 0, and the gate it implies is the
    reference's (ties included)."""
    layer = _random_layer(cfg).eval()
    x = _batch(cfg, 5, 4)
    with torch.no_grad():
        g = layer.saliency(x)
        if ties:  # quantised saliencies: many ties with the threshold
            g = (g * 2).round() / 2
        inactive = int(layer.inactive_channels)
        keep = cfg["cin"] - inactive
        index, scale = select_kept(g, inactive)
        padded_index, padded_scale = select_kept(g, inactive, keep + extra)
    width = cfg["cin"] if inactive == 0 else min(keep + extra, cfg["cin"])
    assert padded_index.shape[-1] == width
    assert not padded_scale[..., keep:].any()
    distinct = padded_index.sort(dim=-1).values.diff(dim=-1)
    assert (distinct > 0).all()
    # (top-k orders tied saliencies arbitrarily: the gates agree, not the index order)
    gate_from_kept = dynaconv.layers.dgc.functional.gate_from_kept
    gated = gate_from_kept(g, padded_index, padded_scale)
    assert torch.equal(gated, gate_from_kept(g, index, scale))
    assert torch.equal(gated, gate_dense(g, torch.tensor(inactive)))


def test_gather_width_rounds_up_within_the_channels():
    from dynaconv.layers.dgc.deployed import padded_width
    from dynaconv.layers.dgc.functional import gather_width

    assert [gather_width(k, 64) for k in (1, 16, 17, 29, 58)] == [16, 16, 32, 32, 64]
    assert gather_width(29, 30) == 30 and gather_width(230, 512) == 240
    assert gather_width(29, 64, multiple=8) == 32
    spec3 = DynamicGroupConv2d(64, 64, 3, padding=1, heads=4).spec
    spec1 = DynamicGroupConv2d(64, 64, 1, heads=4).spec
    assert padded_width(spec3, 29) == 32 and padded_width(spec1, 29) == 29


@given(cfg=layer_configs, seed=st.integers(0, 2**16))
def test_batch_one_head_grouped_with_a_reused_workspace_float64(cfg, seed):
    """The deployed batch-1 form gathers its kernels into one reused workspace: different
    inputs in turn (the workspace holds the other input's kernels) each equal the masked
    reference, on maps where it runs a grouped convolution and where a matrix product."""
    layer = _random_layer(cfg).eval()
    deployed = layer.deploy()
    deployed.impl = "head_grouped"
    torch.manual_seed(seed)
    # 6x5: a grouped convolution; 5x5 strided or unpadded (at most 16 output positions): the
    # matrix product
    inputs = [torch.rand(1, cfg["cin"], *size, dtype=torch.float64) for size in ((6, 5), (5, 5))]
    inputs += [torch.rand_like(x) for x in inputs]
    with torch.no_grad():
        expected = [layer(x) for x in inputs]
    for _ in range(2):  # grad mode on, nothing requires a gradient: the workspace too
        for x, reference in zip(inputs, expected):
            assert_close64(deployed(x), reference, rtol=1e-12, atol=1e-13)
    if layer.kept_channels < cfg["cin"] and cfg["kernel"] > 1:
        assert deployed._workspaces, "batch 1 without gradients gathers into a workspace"
    x = inputs[0].clone().requires_grad_()  # differentiable: no workspace, gradients flow
    deployed(x).sum().backward()
    reference = inputs[0].clone().requires_grad_()
    layer.eval()(reference).sum().backward()
    assert_close64(x.grad, reference.grad, rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_batch_one_matrix_product_form_on_small_maps_float64(padding_mode):
    """4x4 maps at batch 1 run :func:`head_gemm_single` (one bmm per call): equal to the
    masked reference in float64, and it is what runs."""
    from dynaconv.layers.dgc import functional

    torch.manual_seed(0)
    layer = DynamicGroupConv2d(
        24, 8, 3, padding=1, padding_mode=padding_mode, heads=4, gate_factor=0.45
    )
    layer = layer.double().eval()
    layer.set_progress(1.0)
    deployed = layer.deploy()
    deployed.impl = "head_grouped"
    calls = []
    original = functional.head_gemm_single
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            dynaconv.layers.dgc.deployed,
            "head_gemm_single",
            lambda *a: calls.append(1) or original(*a),
        )
        with torch.no_grad():
            for _ in range(2):
                x = torch.rand(1, 24, 4, 4, dtype=torch.float64)
                assert_close64(deployed(x), layer(x), rtol=1e-12, atol=1e-13)
    assert len(calls) == 2


def test_deployed_auto_candidates_leave_out_forms_that_never_measured_fastest():
    """On the CPU: at batch 1 a 3x3 layer measures ``head_grouped`` against ``masked`` and the
    compiled kernel where it builds (not
    ``batch_grouped``, the same computation there, nor ``bmm``, whose unfold copies the input
    9 times); at batch 16 ``batch_grouped`` is measured on a large map (small kernel copy per
    example) and not on a small one; 1x1 kernels keep every form."""
    from dynaconv.layers._base import FormCall

    def candidates(layer, x):
        return layer.form_candidates(FormCall(x, False, False))

    conv3 = DynamicGroupConv2d(64, 64, 3, padding=1, heads=4, gate_factor=0.45).eval().deploy()
    conv1 = DynamicGroupConv2d(64, 64, 1, heads=4, gate_factor=0.45).eval().deploy()
    from dynaconv.layers.dgc import cpu

    compiled = ["cpu_kernel"] if cpu.unusable_reason(torch.rand(1)) is None else []
    assert candidates(conv3, torch.rand(1, 64, 32, 32)) == ["head_grouped", "masked", *compiled]
    assert "batch_grouped" in candidates(conv3, torch.rand(16, 64, 32, 32))
    small = candidates(conv3, torch.rand(16, 64, 4, 4))
    assert "batch_grouped" not in small and "masked" in small
    assert {"head_grouped", "masked", "bmm"} <= set(candidates(conv1, torch.rand(1, 64, 8, 8)))


def test_deployed_layer_follows_a_changed_impl_after_settling(monkeypatch):
    """The deployed layer remembers its form per input signature; a changed ``impl`` is
    still followed."""
    from dynaconv.layers.dgc import deployed as dgc_deployed

    layer = DynamicGroupConv2d(8, 8, 3, padding=1, heads=2, gate_factor=0.5).eval()
    layer.set_progress(1.0)
    deployed = layer.deploy()
    deployed.impl = "head_grouped"
    x = torch.rand(1, 8, 5, 5)
    ran = []
    run = dgc_deployed.run_inference_form
    monkeypatch.setattr(
        dgc_deployed, "run_inference_form", lambda form, *a: ran.append(form) or run(form, *a)
    )
    with torch.no_grad():
        for _ in range(6):
            deployed(x)
        deployed.impl = "masked"
        deployed(x)
    assert ran == ["head_grouped"] * 6 + ["masked"]


def test_ties_zero_more_channels_in_both_paths():
    cfg = dict(cin=8, cout_per_head=2, heads=2, kernel=1, stride=1, dilation=1, bias=False)
    cfg |= dict(padding_mode="zeros", gate_factor=0.5, progress=1.0, ties=True, seed=3)
    layer = _random_layer(cfg)
    with torch.no_grad():
        layer.fc2_weight.zero_()
        layer.fc2_bias.copy_(torch.tensor([1.0, 2, 2, 2, 3, 4, 5, 6]).expand(2, 8))
    x = torch.rand(2, 8, 3, 3, dtype=torch.float64)
    # k_off = 2: the 2nd smallest saliency is 2, tied three times, so four channels go.
    layer.set_inactive_channels(2)
    expected = nn.functional.conv2d(
        x * torch.tensor([0, 0, 0, 0, 3.0, 4, 5, 6], dtype=torch.float64).reshape(1, 8, 1, 1),
        layer.weight,
    )
    outs = _outputs(layer.eval(), x, ["dense", *SPARSE_FORMS])
    for out in outs.values():
        assert_close64(out, expected, rtol=1e-12, atol=1e-13)


@given(cfg=layer_configs)
def test_sparse_training_gradients_equal_dense(cfg):
    layer = _random_layer(cfg).train()
    x = _batch(cfg, 5, 5, requires_grad=True)
    grads = {}
    for impl in ("dense", *SPARSE_FORMS):
        layer.impl = impl
        layer.zero_grad()
        x.grad = None
        out = layer(x)
        loss = (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum()
        (loss + layer.aux_loss()).backward()
        grads[impl] = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    for impl in SPARSE_FORMS:
        for dense, other in zip(grads["dense"], grads[impl]):
            assert_close64(other, dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("impl", ["dense", "sparse", "grouped"])
def test_cpu_training_gradients_are_bitwise_reproducible_with_threads(impl, kernel):
    """The same step twice gives the same gradients bit for bit with several threads.

    Many examples keep the same channel, so the weight gradient sums their contributions; a
    CPU kernel that accumulates with atomics (``index_put_`` with ``accumulate``, the backward
    of advanced indexing) sums them in a different order on every run.
    """
    torch.set_num_threads(4)  # the autouse fixture restores the thread count
    torch.manual_seed(0)
    layer = DynamicGroupConv2d(32, 32, kernel, padding=kernel // 2, heads=4, gate_factor=0.5)
    layer.impl = impl
    layer.set_progress(1.0)
    layer.train()
    x = torch.randn(128, 32, 7, 7, requires_grad=True)
    weights = torch.randn(128, 32, 7, 7)
    runs = []
    for _ in range(4):
        layer.zero_grad()
        x.grad = None
        ((layer(x) * weights).sum() + layer.aux_loss()).backward()
        runs.append([x.grad.clone()] + [p.grad.clone() for p in layer.parameters()])
    for other in runs[1:]:
        for first, again in zip(runs[0], other, strict=True):
            assert torch.equal(first, again)


def _training_grads(layer, x, run):
    layer.zero_grad()
    x.grad = None
    out = run()
    weights = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)
    ((out * weights).sum() + layer.aux_loss()).backward()
    return [out.detach(), x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]


@given(cfg=layer_configs.filter(lambda c: c["padding_mode"] == "zeros"))
def test_gated_heads_training_function_equals_dense(cfg):
    """The backward of the Triton training path (head by head, batch chunks), run with the
    per-head conv forward so that it is checked on every shape without the interpreter."""
    layer = _random_layer(cfg).train()
    x = torch.rand(cfg["batch"] * 3, cfg["cin"], 6, 5, dtype=torch.float64, requires_grad=True)
    layer.impl = "dense"
    expected = _training_grads(layer, x, lambda: layer(x))

    def function_path():
        g = layer.saliency(x)
        layer._last_lasso = lasso(g)
        gated = gate_dense(g, layer.inactive_channels)
        index = select_kept(g, layer._inactive)[0]
        out = GatedHeadsConv.apply(
            x, gated, layer.weight, index, layer.spec, layer.heads, False, cfg["seed"] % 3 + 1
        )
        return out if layer.bias is None else out + layer.bias.reshape(1, -1, 1, 1)

    for actual, reference in zip(_training_grads(layer, x, function_path), expected):
        assert_close64(actual, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kernel,stride", [(3, 1), (1, 2)])
def test_triton_training_path_gradients_equal_dense(kernel, stride):
    pytest.importorskip("triton")
    cfg = dict(cin=8, cout_per_head=2, heads=2, kernel=kernel, stride=stride, dilation=1)
    cfg |= dict(bias=True, padding_mode="zeros", gate_factor=0.5, progress=1.0, ties=True, seed=5)
    layer = _random_layer(cfg).train()
    x = torch.rand(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)
    if not dynaconv.kernels.triton_usable(x):
        pytest.skip("Triton cannot run on CPU tensors here (no interpreter)")
    layer.impl = "dense"
    expected = _training_grads(layer, x, lambda: layer(x))
    layer.impl = "triton"
    for actual, reference in zip(_training_grads(layer, x, lambda: layer(x)), expected):
        assert_close64(actual, reference, rtol=1e-10, atol=1e-12)


@given(
    cfg=layer_configs.filter(lambda c: c["padding_mode"] == "zeros" or c["kernel"] == 1),
)
def test_triton_kernel_equals_dense_float64(cfg):
    pytest.importorskip("triton")
    cfg = dict(cfg, batch=min(cfg["batch"], 2))
    layer = _random_layer(cfg).eval()
    x = torch.rand(cfg["batch"], cfg["cin"], 5, 5, dtype=torch.float64)
    if not dynaconv.kernels.triton_usable(x):
        pytest.skip("Triton cannot run on CPU tensors here (no interpreter)")
    with torch.no_grad():
        outs = _outputs(layer, x, ["dense", "triton"])
    assert_close64(outs["triton"], outs["dense"], rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------------------ lifecycle
def test_export_of_deployed_layer():
    torch.manual_seed(0)
    layer = DynamicGroupConv2d(16, 8, 3, stride=2, padding=1, heads=4).eval()
    layer.set_progress(1.0)
    deployed = layer.deploy().eval()
    deployed.impl = "sparse"
    x = torch.randn(2, 16, 9, 9)
    program = torch.export.export(deployed, (x,))
    x2 = torch.randn(2, 16, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x2), layer(x2), rtol=1e-5, atol=1e-6)


def test_export_of_auto_deployed_layer_keeps_a_dynamic_batch():
    """``auto`` runs the grouped form eagerly on CPU, whose group count depends on the batch;
    under ``torch.export`` it must switch to the batch-independent form."""
    torch.manual_seed(0)
    layer = DynamicGroupConv2d(16, 8, 3, padding=1, heads=4).eval()
    layer.set_progress(1.0)
    deployed = layer.deploy().eval()
    assert deployed.impl == "auto"
    batch = torch.export.Dim("batch", min=1, max=64)
    x = torch.randn(3, 16, 9, 9)
    program = torch.export.export(deployed, (x,), dynamic_shapes={"x": {0: batch}})
    x2 = torch.randn(5, 16, 9, 9)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x2), layer(x2), rtol=1e-5, atol=1e-6)


def _onnxruntime_output(model: nn.Module, x: torch.Tensor, path, dynamic: bool = False):
    """Export ``model`` with ``torch.onnx.export(dynamo=True)`` (static shapes unless
    ``dynamic``), load the file in onnxruntime and run it on ``x``."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    shapes = ({0: torch.export.Dim("batch", min=1, max=64)},) if dynamic else None
    torch.onnx.export(model, (x,), str(path), dynamo=True, dynamic_shapes=shapes, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(y)


@pytest.mark.parametrize("impl,batch", [("bmm", 1), ("auto", 2)])
def test_deployed_1x1_layer_on_a_1x1_map_exports_a_graph_onnxruntime_runs(tmp_path, impl, batch):
    """Issue: a 4->96 1x1 layer keeping one channel, on a 1x1 input, exported at a static
    shape, gave a MatMul that onnxruntime refused (onnxscript's optimiser dropped a reshape of
    the gathered columns)."""
    torch.manual_seed(0)
    layer = DynamicGroupConv2d(4, 96, 1, heads=4, gate_factor=0.25).eval()
    layer.set_progress(1.0)
    deployed = layer.deploy().eval()
    deployed.impl = impl
    x = torch.randn(batch, 4, 1, 1)
    with torch.no_grad():
        expected = layer(x)
    actual = _onnxruntime_output(deployed, x, tmp_path / "layer.onnx")
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_deployed_network_exports_at_batch_one_to_gathers_and_grouped_convs(tmp_path):
    """A deployed DGC network exported at a static batch of 1 runs the head-grouped form (a
    kernel-row gather and one grouped (transposed) conv per layer: stride 1, stride 2, 1x1
    stride 2) on maps large enough, equal to eager in onnxruntime."""
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    network = nn.Sequential(
        DynamicGroupConv2d(8, 16, 3, padding=1, heads=4, gate_factor=0.5),
        nn.ReLU(),
        DynamicGroupConv2d(16, 16, 3, stride=2, padding=1, heads=4, gate_factor=0.5),
        nn.ReLU(),
        DynamicGroupConv2d(16, 8, 1, stride=2, heads=2, gate_factor=0.5),
    ).eval()
    dynaconv.set_progress(network, 1.0)
    deployed = dynaconv.deploy(network)
    x = torch.randn(1, 8, 32, 32)
    assert [traced_inference_form(x, layer.spec) for layer in deployed[::2]] == ["head_grouped"] * 3
    with torch.no_grad():
        expected = network(x)
    actual = _onnxruntime_output(deployed, x, tmp_path / "b1.onnx")
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
    ops = {node.op_type for node in onnx.load(str(tmp_path / "b1.onnx")).graph.node}
    assert {"Gather", "ConvTranspose", "Conv"} <= ops


def test_deployed_dyresnet18_folds_the_batchnorm_after_each_dgc_layer_float64():
    """``dynaconv.deploy`` of DyResNet-18: each BatchNorm after a DGC layer is folded into
    the deployed layer's kernels and bias (only the stem's and the pre-activation ones stay),
    the output equal to the network's in float64 (BatchNorm statistics not the identity)."""
    torch.manual_seed(0)
    network = dyresnet18(num_classes=5).double()
    dynaconv.set_progress(network, 1.0)
    with torch.no_grad():
        for module in network.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    network.eval()
    x = torch.rand(2, 3, 40, 40, dtype=torch.float64)
    deployed = dynaconv.deploy(network, example_input=x)
    layers = [m for m in deployed.modules() if isinstance(m, SparseDynamicGroupConv2d)]
    norms = [m for m in deployed.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(layers) == 19 and all(layer.bias is not None for layer in layers)
    assert len(norms) == 1 + 19  # the stem's and one before each DGC layer
    with torch.no_grad():
        for batch in (x, x[:1]):
            assert_close64(deployed(batch), network(batch), rtol=1e-10, atol=1e-11)


def test_fold_batchnorm_refuses_a_training_norm_and_a_wrong_width():
    layer = DynamicGroupConv2d(8, 8, 3, padding=1, heads=2).eval().deploy()
    with pytest.raises(ValueError, match="eval mode"):
        layer.fold_batchnorm(nn.BatchNorm2d(8).train())
    with pytest.raises(ValueError, match="features"):
        layer.fold_batchnorm(nn.BatchNorm2d(4).eval())


def test_traced_form_rule_gathers_where_it_pays_and_masks_elsewhere():
    """Batch 1: gathered kernels on maps large enough (stride 1 from 8x8 outputs, strided
    kxk from 16x16, 1x1 always), the masked form on smaller maps and at any other batch."""

    def form(cin, kernel, stride, size, batch=1):
        layer = DynamicGroupConv2d(cin, cin, kernel, stride, kernel // 2, heads=4)
        return traced_inference_form(torch.empty(batch, cin, size, size), layer.spec)

    assert form(8, 3, 1, 8) == "head_grouped" and form(8, 3, 1, 4) == "masked"
    assert form(8, 3, 2, 32) == "head_grouped" and form(8, 3, 2, 16) == "masked"
    assert form(8, 1, 2, 4) == "head_grouped"
    assert form(8, 3, 1, 32, batch=2) == "masked"


@pytest.mark.slow
def test_deployed_network_exports_with_a_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    network = nn.Sequential(
        DynamicGroupConv2d(8, 16, 3, padding=1, heads=4, gate_factor=0.5),
        nn.ReLU(),
        DynamicGroupConv2d(16, 8, 1, stride=2, heads=2, gate_factor=0.5),
    ).eval()
    dynaconv.set_progress(network, 1.0)
    deployed = dynaconv.deploy(network)
    x = torch.randn(3, 8, 11, 10)
    with torch.no_grad():
        expected = network(x)
    actual = _onnxruntime_output(deployed, x, tmp_path / "dynamic.onnx", dynamic=True)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip():
    torch.manual_seed(1)
    layer = DynamicGroupConv2d(12, 8, 3, padding=1, heads=2, squeeze_rate=4).eval()
    layer.set_progress(0.6)
    other = DynamicGroupConv2d(12, 8, 3, padding=1, heads=2, squeeze_rate=4).eval()
    other.load_state_dict(layer.state_dict())
    assert other.kept_channels == layer.kept_channels < 12
    x = torch.randn(3, 12, 6, 6)
    for impl in ("dense", "sparse"):
        other.impl = impl
        torch.testing.assert_close(other(x), layer(x))
    assert set(layer.state_dict()) == {
        "weight",
        "bias",
        "fc1_weight",
        "fc2_weight",
        "fc2_bias",
        "inactive_channels",
    }


def test_errors():
    with pytest.raises(ValueError, match="groups"):
        DynamicGroupConv2d(8, 8, 3, groups=2)
    with pytest.raises(ValueError, match="heads"):
        DynamicGroupConv2d(8, 6, 3, heads=4)
    with pytest.raises(ValueError, match="gate_factor"):
        DynamicGroupConv2d(8, 8, 3, gate_factor=0.0)
    with pytest.raises(ValueError, match="gate_factor"):
        DynamicGroupConv2d(8, 8, 3, gate_factor=1.5)
    with pytest.raises(ValueError, match="keeps no channel"):
        DynamicGroupConv2d(1, 8, 3, gate_factor=0.25)
    with pytest.raises(ValueError, match="squeeze_rate"):
        DynamicGroupConv2d(8, 8, 3, squeeze_rate=0)
    with pytest.raises(ValueError, match="impl"):
        DynamicGroupConv2d(8, 8, 3, impl="fast")
    layer = DynamicGroupConv2d(8, 8, 3, padding=1, padding_mode="reflect", impl="triton")
    if dynaconv.kernels.triton_usable(torch.zeros(1)):
        with pytest.raises(ValueError, match="zero padding"):
            layer(torch.randn(1, 8, 4, 4))
    with pytest.raises(ValueError, match="input channels"):
        DynamicGroupConv2d(8, 8, 3)(torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match="inactive channel count"):
        DynamicGroupConv2d(8, 8, 3).set_inactive_channels(8)
    with pytest.raises(ValueError, match="progress"):
        DynamicGroupConv2d(8, 8, 3).set_progress(1.5)
    with pytest.raises(ValueError, match=r"heads must be a positive int, got True"):
        DynamicGroupConv2d(8, 8, 3, heads=True)
    with pytest.raises(
        ValueError, match=r"saliency_mode must be one of \('reference', 'neutral'\)"
    ):
        DynamicGroupConv2d(8, 8, 3, saliency_mode="fast")
    with pytest.raises(ValueError, match=r"hidden_width must be None or an int >= 0, got -1"):
        DynamicGroupConv2d(8, 8, 3, hidden_width=-1)
    with pytest.raises(ValueError, match=r"inactive channel count must be an int in \[0, in_.*8\)"):
        DynamicGroupConv2d(8, 8, 3).set_inactive_channels(True)
    state = DynamicGroupConv2d(8, 8, 3).state_dict() | {"inactive_channels": torch.tensor(9)}
    model = nn.Sequential(DynamicGroupConv2d(8, 8, 3))
    with pytest.raises(ValueError, match=r"0.inactive_channels must be an int in .*, got 9"):
        model.load_state_dict({f"0.{key}": value for key, value in state.items()})
    layer = DynamicGroupConv2d(8, 8, 3)
    tensors = (layer.weight, layer.bias, layer.fc1_weight, layer.fc2_weight, layer.fc2_bias)
    for kept in (0, 9, 2.0):
        with pytest.raises(
            ValueError, match=rf"kept must be an int in \[1, in_channels=8\], got {kept}"
        ):
            SparseDynamicGroupConv2d(layer.spec, 4, kept, *tensors)
    with pytest.raises(ValueError, match="saliency_mode must be one of"):
        SparseDynamicGroupConv2d(layer.spec, 4, 2, *tensors, saliency_mode="fast")


def test_convert_digits_cnn_trains_and_deploys():
    torch.manual_seed(0)
    model, report = dynaconv.convert(DigitsCNN(), "dgc", return_report=True)
    assert "features.0" in report.skipped  # 1 input channel: nothing to select
    assert len(report.converted) == 5
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    x, labels = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    for step in range(4):
        dynaconv.set_progress(model, step / 3)
        loss = nn.functional.cross_entropy(model(x), labels) + 1e-5 * dynaconv.aux_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(m.kept_channels * 4 == m.in_channels for _, m in dynaconv.dynaconv_layers(model))
    deployed = dynaconv.deploy(model, example_input=x)
    prof = dynaconv.profile(model, (1, 1, 8, 8))
    assert prof["macs_active"] < prof["macs"]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), model(x), rtol=1e-4, atol=1e-5)


def test_from_conv_keeps_weights_and_gate_factor_one_is_the_conv_scaled():
    conv = nn.Conv2d(8, 8, 3, padding=1, dtype=torch.float64)
    layer = DynamicGroupConv2d.from_conv(conv, gate_factor=1.0).eval()
    layer.set_progress(1.0)
    assert layer.kept_channels == 8
    x = torch.rand(2, 8, 5, 5, dtype=torch.float64)
    g = layer.saliency(x)  # (B, h, Cin): every head scales every channel
    heads = [
        nn.functional.conv2d(x * g[:, i, :, None, None], conv.weight[i::4], conv.bias[i::4], 1, 1)
        for i in range(4)
    ]
    expected = torch.stack(heads, dim=2).flatten(1, 2)  # interleaved: channel j*h + i
    assert_close64(layer(x), expected, rtol=1e-12, atol=1e-13)


def test_dydensenet86_builds_and_trains_one_step():
    torch.manual_seed(0)
    net = dydensenet86(num_classes=10)
    assert sum(p.numel() for p in net.parameters()) == 4264810
    dynaconv.set_progress(net, 0.5)
    out = net(torch.randn(2, 3, 32, 32))
    loss = out.square().mean() + 1e-5 * dynaconv.aux_loss(net)
    loss.backward()
    assert out.shape == (2, 10)
    assert net.features.init_conv.weight.grad is not None


@pytest.mark.slow
def test_torch_compile_training_and_deployed():
    torch.manual_seed(0)
    layer = DynamicGroupConv2d(16, 8, 3, padding=1).train()
    layer.set_progress(0.5)
    compiled = torch.compile(layer)
    x = torch.randn(2, 16, 6, 6)
    out = compiled(x)
    (out.sum() + compiled.aux_loss()).backward()
    torch.testing.assert_close(out, layer(x), rtol=1e-5, atol=1e-5)
    layer.set_progress(0.7)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-5, atol=1e-5)
    deployed = torch.compile(layer.eval().deploy())
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), layer(x), rtol=1e-5, atol=1e-5)


def test_profile_of_deployed_layer_counts_kept_channels():
    layer = DynamicGroupConv2d(32, 16, 3, padding=1, bias=False, squeeze_rate=8)
    layer.set_progress(1.0)
    layer_counts = dynaconv.profile(layer, (2, 32, 8, 8))
    deployed = dynaconv.profile(layer.deploy(), (2, 32, 8, 8), deployed=False)
    dense_conv = 2 * 16 * 32 * 9 * 64
    fcs = 2 * 4 * 2 * 32 * 4
    assert layer_counts["macs"] == dense_conv + fcs
    assert layer_counts["macs_active"] == deployed["macs_active"] == dense_conv // 4 + fcs


# ------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "shape", [(256, 14, 3, 1), (64, 56, 3, 1), (128, 16, 1, 1), (64, 15, 3, 2)]
)
def test_triton_on_gpu_matches_float64(shape):
    cin, size, kernel, stride = shape
    torch.manual_seed(0)
    layer = DynamicGroupConv2d(cin, cin, kernel, stride, kernel // 2, bias=False).cuda().eval()
    layer.set_progress(1.0)
    x = torch.randn(8, cin, size, size, device="cuda")
    reference = layer.double()
    with torch.no_grad():
        reference.impl = "dense"
        expected = reference(x.double())
        fast = layer.float()
        fast.impl = "triton"
        actual = fast(x)
    torch.testing.assert_close(
        actual.double(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item()
    )
    if torch.cuda.get_device_capability()[0] >= 8:  # float64 tl.dot
        with torch.no_grad():
            exact = layer.double()(x.double())
        assert_close64(exact, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dydensenet_fixture_deployed_on_gpu():
    data = load_fixture("dgc", "dydensenet86_cifar10.pt")
    net = model_from_reference("dydensenet", data["config"], data["state_dict"]).cuda().eval()
    deployed = dynaconv.deploy(net, example_input=data["x"].cuda())
    with torch.no_grad():
        y = deployed(data["x"].cuda())
    # float32 with TF32 through 86 layers: a loose bound; the float64 run below is exact.
    torch.testing.assert_close(y.double().cpu(), data["y"], rtol=1e-2, atol=1e-2)
    if torch.cuda.get_device_capability()[0] >= 8:  # float64 tl.dot
        with torch.no_grad():
            exact = deployed.double()(data["x"].cuda().double())
        assert_close64(exact.cpu(), data["y"], rtol=1e-9, atol=1e-11)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_triton_training_path_on_gpu_matches_dense(chunks):
    torch.manual_seed(0)
    layer = DynamicGroupConv2d(64, 64, 3, 1, 1).cuda().train()
    layer.set_progress(1.0)
    layer.backward_chunks = chunks
    x = torch.randn(8, 64, 14, 14, device="cuda", requires_grad=True)
    results = {}
    for impl in ("dense", "triton"):
        layer.impl = impl
        layer.zero_grad()
        x.grad = None
        out = layer(x)
        (out.square().mean() + layer.aux_loss()).backward()
        results[impl] = [out.detach(), x.grad.clone()] + [
            p.grad.clone() for p in layer.parameters()
        ]
    for actual, expected in zip(results["triton"], results["dense"]):
        scale = expected.abs().max().item()
        torch.testing.assert_close(actual, expected, rtol=2e-2, atol=2e-2 * scale)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # mixed precision runs
        layer.impl = "auto"
        layer(x).float().square().mean().backward()

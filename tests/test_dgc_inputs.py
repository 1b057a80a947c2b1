"""DGC on unusual inputs and reference layouts: empty batches, half precision, the reference
code's zero-width saliency generators, float64 checkpoints and malformed state dicts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import dynaconv
from conftest import assert_close64, load_fixture
from dynaconv import DynamicGroupConv2d
from dynaconv.compat import layer_from_reference, model_from_reference
from dynaconv.models import DyDenseNet, dyresnet18

IMPLS = ["dense", "sparse", "grouped", "triton", "auto"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _skip_unusable_triton(impl: str, dtype: torch.dtype = torch.float32) -> None:
    if impl != "triton":
        return
    pytest.importorskip("triton")
    if not dynaconv.kernels.triton_usable(torch.zeros(1)):
        pytest.skip("Triton cannot run on CPU tensors here (no interpreter)")
    if dtype == torch.bfloat16 and dynaconv.kernels.interpreting():
        pytest.skip(
            "Triton's interpreter multiplies bfloat16 bit patterns in tl.dot (it stores them as "
            "uint16): bfloat16 kernels are checked on a GPU only"
        )


# ------------------------------------------------------------------------------ empty batch
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kernel,stride", [(1, 1), (3, 1), (3, 2)])
def test_empty_batch_gives_an_empty_output(impl, kernel, stride):
    _skip_unusable_triton(impl)
    torch.manual_seed(0)
    layer = DynamicGroupConv2d(8, 6, kernel, stride, kernel // 2, heads=2, impl=impl)
    layer.set_progress(1.0)
    x = torch.randn(0, 8, 7, 5, requires_grad=True)
    expected_shape = (0, 6, *layer.spec.output_size(7, 5))
    for training in (True, False):
        layer.train(training)
        out = layer(x)
        assert out.shape == expected_shape and out.dtype == x.dtype
        out.sum().backward()  # the graph holds: empty gradients
        assert x.grad is not None and x.grad.shape == x.shape
        if training:
            assert float(layer.aux_loss().detach()) == 0.0  # the lasso of no example, not NaN
    if impl != "dense":
        deployed = layer.eval().deploy()
        deployed.impl = impl if impl != "dense" else "auto"
        with torch.no_grad():
            assert deployed(x).shape == expected_shape


# ------------------------------------------------------------------------------ half precision
#: Relative error (to the largest output) of a layer run in low precision against the same
#: layer, weights and input in float32. Every product rounds its inputs (x, the kernel, the
#: saliency scale: 3 roundings of unit u) and the output rounds once: about 4u of the summed
#: magnitudes, which are within a small factor of the largest output here; 8u allows for that
#: factor. u = 2^-11 (float16) and 2^-8 (bfloat16).
LOW_PRECISION_RTOL = {torch.float16: 8 * 2.0**-11, torch.bfloat16: 8 * 2.0**-8}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kernel", [1, 3])
def test_half_precision_layer_computes_in_its_dtype(dtype, impl, kernel):
    _skip_unusable_triton(impl, dtype)
    torch.manual_seed(1)
    reference = DynamicGroupConv2d(16, 8, kernel, padding=kernel // 2, heads=2, impl=impl)
    reference.set_progress(1.0)
    low = copy.deepcopy(reference).to(dtype)
    rounded = {k: v.float() if v.is_floating_point() else v for k, v in low.state_dict().items()}
    reference.load_state_dict(rounded)  # the same (rounded) weights
    x = torch.randn(2, 16, 6, 5).to(dtype)
    assert low.saliency(x).dtype == torch.float32  # the selection is made in float32
    for training in (True, False):
        low.train(training)
        reference.train(training)
        out = low(x)
        assert out.dtype == dtype
        expected = reference(x.float())
        error = ((out.float() - expected).abs().max() / expected.abs().max()).item()
        assert error <= LOW_PRECISION_RTOL[dtype], (impl, training, error)
    low.eval()
    with torch.no_grad():
        deployed = low.deploy()
        assert deployed(x).dtype == dtype


# ------------------------------------------------------------------------------ compat
def _to_float64(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in state.items()}


def test_reference_layer_keeps_a_float64_state_dict_in_float64():
    data = load_fixture("dgc", "layer_public.pt")
    module = layer_from_reference("dgc", data["config"], _to_float64(data["state_dict"]))
    assert {p.dtype for p in module.parameters()} == {torch.float64}
    module.eval()
    with torch.no_grad():  # no .double(): the module is float64 as loaded
        assert_close64(module(data["x"].double()), data["eval"]["y"])
    float32 = layer_from_reference("dgc", data["config"], data["state_dict"])
    assert {p.dtype for p in float32.parameters()} == {torch.float32}


def test_reference_networks_keep_a_float64_state_dict_in_float64():
    data = load_fixture("dgc", "dydensenet86_cifar10.pt")
    net = model_from_reference("dydensenet", data["config"], _to_float64(data["state_dict"]))
    assert {p.dtype for p in net.parameters()} == {torch.float64}
    with torch.no_grad():
        assert_close64(net.eval()(data["x"].double()), data["y"])

    template = dyresnet18(num_classes=3).double()
    reference = _dyresnet18_reference_state(template)
    loaded = model_from_reference("dyresnet18", {}, reference)
    assert {p.dtype for p in loaded.parameters()} == {torch.float64}
    assert torch.equal(loaded.conv1.weight, reference["conv1.weight"])


def _dyresnet18_reference_state(template) -> dict[str, Tensor]:
    """A reference DyResNet-18 state dict (the reference's key names) from a native model."""
    native = template.state_dict()
    reference: dict[str, Tensor] = {}
    for key, value in native.items():
        name = key
        if ".conv." in key or key.endswith("conv.inactive_channels"):
            unit, _, rest = key.rpartition(".conv.")
            if rest == "weight":
                heads = 4
                for i in range(heads):
                    reference[f"{unit}.headconv_{i}.conv.weight"] = value[i::heads]
                continue
            if rest in ("fc1_weight", "fc2_weight", "fc2_bias"):
                part = {"fc1_weight": "fc1.weight", "fc2_weight": "fc2.weight"}.get(
                    rest, "fc2.bias"
                )
                for i in range(value.shape[0]):
                    reference[f"{unit}.headconv_{i}.{part}"] = value[i]
                continue
            if rest == "inactive_channels":
                reference[f"{unit}._inactive_channels"] = value.reshape(1).double()
                continue
        if "downsample.1." in key:
            name = key.replace("downsample.1.", "downsample.1.norm.")
        reference[name] = value
    return reference


def _zero_width_reference(x: Tensor, state: dict[str, Tensor], heads: int, inactive: int):
    """The reference layer with zero-width fcs, by hand: BN-ReLU; every head's saliency is
    relu(fc2 bias), whatever the input; zero the ``inactive`` smallest (ties included); conv."""
    eps = 1e-5
    mean, var = state["norm.running_mean"], state["norm.running_var"]
    y = (x - mean[:, None, None]) / torch.sqrt(var[:, None, None] + eps)
    y = torch.relu(y * state["norm.weight"][:, None, None] + state["norm.bias"][:, None, None])
    outs = []
    for i in range(heads):
        g = torch.relu(state[f"headconv_{i}.fc2.bias"])
        threshold = g.sort().values[inactive - 1]
        g = torch.where(g <= threshold, torch.zeros_like(g), g)
        kernel = state[f"headconv_{i}.conv.weight"]
        outs.append(F.conv2d(y * g[:, None, None], kernel, padding=1))
    return torch.stack(outs, dim=2).flatten(1, 2)


def _reference_layer_state(cin, cout, heads, hidden, inactive, generator, dtype=torch.float64):
    state = {"_inactive_channels": torch.tensor([float(inactive)], dtype=dtype)}
    state["norm.weight"] = torch.randn(cin, generator=generator, dtype=dtype)
    state["norm.bias"] = torch.randn(cin, generator=generator, dtype=dtype)
    state["norm.running_mean"] = torch.randn(cin, generator=generator, dtype=dtype)
    state["norm.running_var"] = torch.rand(cin, generator=generator, dtype=dtype) + 0.5
    state["norm.num_batches_tracked"] = torch.tensor(7)
    for i in range(heads):
        head = f"headconv_{i}."
        state[head + "conv.weight"] = torch.randn(
            cout // heads, cin, 3, 3, generator=generator, dtype=dtype
        )
        state[head + "fc1.weight"] = torch.randn(hidden, cin, generator=generator, dtype=dtype)
        state[head + "fc2.weight"] = torch.randn(cin, hidden, generator=generator, dtype=dtype)
        state[head + "fc2.bias"] = torch.randn(cin, generator=generator, dtype=dtype)
    return state


def test_reference_layer_with_a_zero_width_saliency_generator():
    """Cin = 6 < squeeze_rate / 2 = 8: the reference's fc1 is ``Linear(6, 0)``."""
    generator = torch.Generator().manual_seed(0)
    config = {"in_channels": 6, "out_channels": 4, "kernel_size": 3, "padding": 1, "heads": 2}
    state = _reference_layer_state(6, 4, 2, 0, 3, generator)
    module = layer_from_reference("dgc", config, state).eval()
    assert module.conv.fc1_weight.shape == (2, 0, 6)
    x = torch.randn(3, 6, 5, 5, generator=generator, dtype=torch.float64)
    expected = _zero_width_reference(x, state, heads=2, inactive=3)
    for impl in ("dense", "sparse", "grouped"):
        module.conv.impl = impl
        with torch.no_grad():
            assert_close64(module(x), expected, rtol=1e-12, atol=1e-13)
    assert_close64(dynaconv.deploy(module, example_input=x)(x), expected, rtol=1e-12, atol=1e-13)
    # The layer's own default keeps a hidden width of at least one.
    assert DynamicGroupConv2d(6, 4, 3, heads=2, squeeze_rate=16).fc1_weight.shape == (2, 1, 6)


def test_paper_networks_use_the_reference_zero_width():
    net = DyDenseNet([2], [2], bottleneck=2, group_3x3=1, heads=2)  # Cin 4 and 6 < 8
    widths = [m.hidden for m in net.modules() if isinstance(m, DynamicGroupConv2d)]
    assert widths == [0, 0]
    dynaconv.set_progress(net, 1.0)
    out = net.eval()(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10) and bool(out.isfinite().all())
    native = DyDenseNet([2], [2], bottleneck=2, group_3x3=1, heads=2, reference_squeeze=False)
    assert [m.hidden for m in native.modules() if isinstance(m, DynamicGroupConv2d)] == [1, 1]


def test_reference_layer_names_missing_and_unexpected_keys():
    generator = torch.Generator().manual_seed(1)
    config = {"in_channels": 8, "out_channels": 4, "kernel_size": 3, "padding": 1, "heads": 2}
    state = _reference_layer_state(8, 4, 2, 1, 2, generator)
    missing = {k: v for k, v in state.items() if k != "headconv_1.fc2.bias"}
    with pytest.raises(ValueError, match=r"missing key\(s\) \['headconv_1.fc2.bias'\]"):
        layer_from_reference("dgc", config, missing)
    extra = state | {"headconv_2.conv.weight": state["headconv_0.conv.weight"], "scale": 1.0}
    with pytest.raises(
        ValueError, match=r"unexpected key\(s\) \['headconv_2.conv.weight', 'scale'\]"
    ):
        layer_from_reference("dgc", config, extra)
    with pytest.raises(ValueError, match=r"missing reference DynamicMultiHeadConv argument"):
        layer_from_reference("dgc", {"in_channels": 8, "kernel_size": 3}, state)
    with pytest.raises(ValueError, match=r"unknown reference DynamicMultiHeadConv argument"):
        layer_from_reference("dgc", config | {"groups": 2}, state)
    without_count = {k: v for k, v in state.items() if k != "norm.num_batches_tracked"}
    layer_from_reference("dgc", config, without_count)  # optional, as in PyTorch's BN


def test_reference_networks_name_missing_and_unexpected_keys():
    data = load_fixture("dgc", "dydensenet86_cifar10.pt")
    state = dict(data["state_dict"])
    key = "features.denseblock_2.denselayer_3.conv_1.headconv_1.fc1.weight"
    with pytest.raises(ValueError, match=f"missing key.*{key}"):
        model_from_reference(
            "dydensenet", data["config"], {k: v for k, v in state.items() if k != key}
        )
    with pytest.raises(ValueError, match=r"unexpected key\(s\).*\['features.extra.weight'\]"):
        model_from_reference(
            "dydensenet", data["config"], state | {"features.extra.weight": state[key]}
        )

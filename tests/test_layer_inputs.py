"""Layers under hostile and careless input: dtypes, routing weights, weight edits, loading,
empty batches, DGC's reference layouts. Each property states what a user may rely on; bad input
raises ValueError naming the argument (or state-dict key) and the rule.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call

import dynaconv
from conftest import assert_close64, load_fixture
from dynaconv import (
    CondConv2d,
    DOConv2d,
    DynamicGroupConv2d,
    GroupableConv2d,
    LearnedGroupConv2d,
)
from dynaconv.compat import layer_from_reference, model_from_reference
from dynaconv.layers.condconv.layer import FORMS, condconv2d
from dynaconv.layers.lgc.layer import CondensedGroupConv2d
from dynaconv.models import DyDenseNet, dyresnet18

pytestmark = pytest.mark.usefixtures("one_thread")

# ------------------------------------------------------------------------------ DGConv dtypes

#: Gate values whose sign decides the mask, many of them too small for float16.
NEAR_ZERO = [1e-8, -1e-8, 1e-30, -1e-30, 1e-45, -1e-45, 6e-8, -6e-8, 1e-3, -1e-3, 0.0, 2.5, -2.5]
LOW_PRECISION = [torch.float16, torch.bfloat16]


def _dgconv(gates: list[float], sort: bool, **kwargs) -> GroupableConv2d:
    layer = GroupableConv2d(2 ** len(gates), 2 ** len(gates), 3, padding=1, sort=sort, **kwargs)
    with torch.no_grad():
        layer.gate.copy_(torch.tensor(gates, dtype=torch.float64))
    return layer


def _converted(layer: GroupableConv2d, how: str, dtype: torch.dtype) -> GroupableConv2d:
    if how == "method":
        return layer.half() if dtype == torch.float16 else layer.bfloat16()
    if how == "to":
        return layer.to(dtype)
    return nn.Sequential(layer).to(dtype)[0]  # converted as part of a model


@given(
    gates=st.lists(st.sampled_from(NEAR_ZERO), min_size=1, max_size=4),
    sort=st.booleans(),
    dtype=st.sampled_from(LOW_PRECISION),
    how=st.sampled_from(["method", "to", "parent"]),
)
def test_dgconv_low_precision_keeps_the_binary_mask(gates, sort, dtype, how):
    reference = _dgconv(gates, sort)
    expected_mask = reference.mask().detach()
    expected_groups = reference.num_groups
    layer = _converted(_dgconv(gates, sort), how, dtype)
    assert layer.dense_weight.dtype == dtype
    assert layer.gate.dtype == torch.float32  # never rounded to the layer's dtype
    assert torch.equal(layer.gate, reference.gate)
    assert torch.equal(layer.mask().detach(), expected_mask)
    if 0.0 not in gates:  # (a gate exactly 0 is the reference's 0.5 factor)
        assert set(layer.mask().unique().tolist()) <= {0.0, 1.0}
    assert layer.num_groups == expected_groups
    masked = layer.weight.detach()
    assert masked.dtype == dtype
    assert torch.equal(
        masked == 0, (reference.dense_weight.to(dtype) * expected_mask[..., None, None]) == 0
    )


@given(
    gates=st.lists(st.sampled_from(NEAR_ZERO), min_size=1, max_size=3),
    dtype=st.sampled_from(LOW_PRECISION),
)
def test_dgconv_low_precision_constructor_and_state_dict(gates, dtype):
    reference = _dgconv(gates, False)
    built = _dgconv(gates, False, dtype=dtype)
    assert built.gate.dtype == torch.float32 and built.dense_weight.dtype == dtype
    assert torch.equal(built.mask(), reference.mask())
    # a low-precision model's checkpoint keeps the gates exactly
    clone = GroupableConv2d(2 ** len(gates), 2 ** len(gates), 3, padding=1).to(dtype)
    clone.load_state_dict(built.state_dict())
    assert torch.equal(clone.gate, reference.gate)
    assert torch.equal(clone.mask(), reference.mask())


@given(
    gates=st.lists(st.sampled_from(NEAR_ZERO), min_size=1, max_size=3),
    sort=st.booleans(),
    dtype=st.sampled_from(LOW_PRECISION),
)
def test_dgconv_autocast_uses_the_float32_mask(gates, sort, dtype):
    torch.manual_seed(0)
    layer = _dgconv(gates, sort)
    x = torch.randn(2, layer.in_channels, 5, 5)
    expected = F.conv2d(
        x.to(dtype), layer.masked_weight().detach().to(dtype), layer.bias.detach().to(dtype), 1, 1
    )
    with torch.autocast("cpu", dtype=dtype):
        assert torch.equal(layer.mask(), _dgconv(gates, sort).mask())
        y = layer(x)
    assert y.dtype == dtype
    torch.testing.assert_close(y, expected)


def test_dgconv_float64_keeps_float64_gates():
    layer = _dgconv([1e-300, -1e-300], False, dtype=torch.float64)
    assert layer.gate.dtype == torch.float64
    assert _dgconv([1.0], False).double().gate.dtype == torch.float64
    assert layer.mask().tolist() == _dgconv([1.0, -1.0], False).double().mask().tolist()


# ------------------------------------------------------------------------------ CondConv routing


def _condconv(kernel: int, experts: int, impl: str = "auto", **kwargs) -> CondConv2d:
    return CondConv2d(
        4,
        6,
        kernel,
        padding=kernel // 2,
        num_experts=experts,
        impl=impl,
        dtype=torch.float64,
        **kwargs,
    )


bad_routing = st.one_of(
    # wrong batch size (broadcast or ignored before)
    st.tuples(st.just("batch"), st.integers(0, 5)),
    # wrong number of experts
    st.tuples(st.just("experts"), st.integers(1, 6)),
    # wrong dimensionality
    st.tuples(st.just("dims"), st.sampled_from([1, 3])),
    # not floating point
    st.tuples(
        st.just("dtype"), st.sampled_from([torch.int64, torch.int32, torch.bool, torch.complex64])
    ),
    st.tuples(st.just("type"), st.just(None)),
)


def _bad_routing(kind: str, value, batch: int, experts: int):
    if kind == "batch":
        rows = value if value != batch else batch + 1
        return torch.rand(rows, experts, dtype=torch.float64)
    if kind == "experts":
        columns = value if value != experts else experts + 1
        return torch.rand(batch, columns, dtype=torch.float64)
    if kind == "dims":
        return (
            torch.rand(batch * experts, dtype=torch.float64)
            if value == 1
            else torch.rand(batch, experts, 1, dtype=torch.float64)
        )
    if kind == "dtype":
        return torch.ones(batch, experts).to(value)
    return [[0.5] * experts] * batch


@given(
    impl=st.sampled_from(["auto", *FORMS]),
    kernel=st.sampled_from([1, 3]),
    batch=st.integers(1, 3),
    experts=st.integers(1, 4),
    bad=bad_routing,
    shared=st.booleans(),
)
def test_condconv_rejects_routing_weights_that_do_not_fit(
    impl, kernel, batch, experts, bad, shared
):
    layer = _condconv(kernel, experts, impl, shared_routing=shared)
    x = torch.randn(batch, 4, 5, 5, dtype=torch.float64)
    routing = _bad_routing(*bad, batch, experts)
    with pytest.raises(ValueError, match="routing_weights"):
        layer(x, routing_weights=routing)
    with pytest.raises(ValueError, match="routing_weights"):
        layer.deploy()(x, routing_weights=routing)
    with pytest.raises(ValueError, match="routing_weights"):
        condconv2d(layer.spec, x, layer.weight, layer.bias, routing, impl=impl)


@settings(max_examples=10)
@given(kernel=st.sampled_from([1, 3]), batch=st.integers(1, 3), experts=st.integers(1, 4))
def test_condconv_routing_weights_that_fit_give_the_same_output_in_every_form(
    kernel, batch, experts
):
    torch.manual_seed(batch * 10 + experts)
    layer = _condconv(kernel, experts)
    x = torch.randn(batch, 4, 5, 5, dtype=torch.float64)
    routing = torch.rand(batch, experts, dtype=torch.float64)
    expected = condconv2d(layer.spec, x, layer.weight, layer.bias, routing, impl="loop")
    for form in ("grouped", "expert_sum", "bmm"):
        layer.impl = form
        torch.testing.assert_close(layer(x, routing_weights=routing), expected)


# ------------------------------------------------------------------------------ weight edits

#: Every way a user changes weights; none may leave an eval forward on the old weights.
EDITS = [
    "data_inplace",
    "data_assign",
    "copy_no_grad",
    "load_state_dict",
    "sgd",
    "sgd_foreach",
    "adam",
]


def _edit(layer: nn.Module, name: str, how: str, x: torch.Tensor) -> None:
    param = getattr(layer, name)
    new = torch.randn_like(param)
    if name == "gate":  # flip signs so that the mask really changes
        new = -param.detach().sign() * (param.detach().abs() + 0.25)
    if how == "data_inplace":
        param.data.copy_(new)
    elif how == "data_assign":
        param.data = new.clone()
    elif how == "copy_no_grad":
        with torch.no_grad():
            param.copy_(new)
    elif how == "load_state_dict":
        state = layer.state_dict()
        state[name] = new
        layer.load_state_dict(state)
    else:  # an optimizer step taken in eval mode
        if how == "adam":
            optimizer = torch.optim.Adam([param], lr=1.0)
        else:
            optimizer = torch.optim.SGD([param], lr=1.0, foreach=how == "sgd_foreach")
        layer.zero_grad()
        layer(x).square().sum().backward()
        if name == "gate":
            param.grad = param.detach().sign() * 4.0  # a step that flips every gate
        optimizer.step()


def _doconv() -> DOConv2d:
    layer = DOConv2d(4, 6, 3, padding=1, dtype=torch.float64)
    with torch.no_grad():
        layer.D.normal_()
    return layer


def _dgconv64() -> GroupableConv2d:
    return _dgconv([0.5, -0.5, 0.25], False).double()


def _expected(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's function of its current weights, computed outside its forward."""
    if isinstance(layer, DOConv2d):
        d_full = layer.D + layer.D_diag
        w = layer.W.reshape(layer.out_channels, layer.in_channels, layer.D_mul)
        kernel = torch.einsum("ims,ois->oim", d_full, w).reshape(layer.out_channels, -1, 3, 3)
    else:
        kernel = layer.dense_weight * layer.mask()[:, :, None, None]
    return F.conv2d(x, kernel.detach(), None if layer.bias is None else layer.bias.detach(), 1, 1)


@given(
    build=st.sampled_from([_doconv, _dgconv64]),
    which=st.integers(0, 1),
    how=st.sampled_from(EDITS),
    mode=st.sampled_from(["no_grad", "inference_mode", "frozen"]),
    seed=st.integers(0, 2**16),
)
def test_eval_forward_never_uses_old_weights(build, which, how, mode, seed):
    torch.manual_seed(seed)
    layer = build().eval()
    name = ("W", "D")[which] if isinstance(layer, DOConv2d) else ("dense_weight", "gate")[which]
    x = torch.randn(2, layer.in_channels, 5, 5, dtype=torch.float64)

    def forward() -> torch.Tensor:
        if mode == "inference_mode":
            with torch.inference_mode():
                return layer(x).clone()
        if mode == "frozen":
            layer.requires_grad_(False)
            try:
                return layer(x)
            finally:
                layer.requires_grad_(True)
        with torch.no_grad():
            return layer(x)

    before = forward()
    forward()  # twice, as an evaluation loop would
    _edit(layer, name, how, x)
    after = forward()
    expected = _expected(layer, x)
    torch.testing.assert_close(after, expected)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(layer.deploy()(x), expected)


@given(build=st.sampled_from([_doconv, _dgconv64]), seed=st.integers(0, 2**16))
def test_eval_forward_follows_functional_call(build, seed):
    torch.manual_seed(seed)
    layer = build().eval()
    x = torch.randn(2, layer.in_channels, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        original = layer(x)
        for _ in range(3):
            params = {k: torch.randn_like(v) for k, v in layer.named_parameters()}
            if "gate" in params:
                params["gate"] = -layer.gate.detach()
            swapped = functional_call(layer, params, (x,))
            twin = build().eval()
            twin.load_state_dict(params, strict=False)
            torch.testing.assert_close(swapped, _expected(twin, x))
        torch.testing.assert_close(layer(x), original)  # and back on its own weights


# ------------------------------------------------------------------------------ CondConv.from_conv

conv_shapes = st.fixed_dictionaries(
    {
        "cin": st.integers(1, 3),
        "cout": st.integers(1, 3),
        "kernel": st.sampled_from([1, 2, 3]),
        "bias": st.booleans(),
        "fill": st.sampled_from(["random", "constant", "zero"]),
        "experts": st.integers(1, 5),
        "noise": st.sampled_from([0.0, 0.01, 0.5, 1]),
        "seed": st.integers(0, 2**16),
    }
)


@given(cfg=conv_shapes)
def test_condconv_from_conv_is_finite_and_starts_equal(cfg):
    torch.manual_seed(cfg["seed"])
    conv = nn.Conv2d(cfg["cin"], cfg["cout"], cfg["kernel"], bias=cfg["bias"], dtype=torch.float64)
    with torch.no_grad():
        if cfg["fill"] == "constant":
            conv.weight.fill_(0.3)
        elif cfg["fill"] == "zero":
            conv.weight.zero_()
    layer = CondConv2d.from_conv(conv, num_experts=cfg["experts"], expert_noise=cfg["noise"])
    assert bool(torch.isfinite(layer.weight).all())
    # every r_e = 1/2 at the start: the mixed kernel sum_e W_e / 2 is the conv's kernel
    mixed = layer.mixed_kernels(torch.full((1, cfg["experts"]), 0.5, dtype=torch.float64))[0]
    torch.testing.assert_close(mixed, conv.weight, rtol=1e-10, atol=1e-12)
    x = torch.randn(2, cfg["cin"], 4, 4, dtype=torch.float64)
    torch.testing.assert_close(layer.eval()(x), conv(x), rtol=1e-10, atol=1e-12)
    if cfg["noise"] > 0 and cfg["experts"] > 1:  # the noise breaks the experts' symmetry
        assert not torch.equal(layer.weight[0], layer.weight[1])


@pytest.mark.parametrize("noise", [math.nan, math.inf, -math.inf, -0.1, True, "0.1", None])
def test_condconv_from_conv_rejects_bad_expert_noise(noise):
    with pytest.raises(ValueError, match="expert_noise must be a finite number >= 0"):
        CondConv2d.from_conv(nn.Conv2d(2, 2, 3), expert_noise=noise)


# ------------------------------------------------------------------------------ LGC loading

lgc_configs = st.fixed_dictionaries(
    {
        "groups": st.sampled_from([1, 2, 4]),
        "factor": st.sampled_from([1, 2, 3, 4]),
        "d_out": st.integers(1, 3),
        "progress": st.sampled_from([0.0, 0.2, 0.4, 0.6, 1.0]),
        "seed": st.integers(0, 2**16),
    }
)


def _condensed_lgc(cfg) -> LearnedGroupConv2d:
    torch.manual_seed(cfg["seed"])
    layer = LearnedGroupConv2d(
        12,
        cfg["groups"] * cfg["d_out"],
        1,
        learned_groups=cfg["groups"],
        condense_factor=cfg["factor"],
        dtype=torch.float64,
    )
    layer.set_progress(cfg["progress"])
    return layer


CORRUPTIONS = [
    "stage_negative",
    "stage_too_large",
    "stage_fraction",
    "stage_other",
    "mask_row_in_group",
    "mask_not_binary",
    "mask_shape",
]


def _corrupt(layer: LearnedGroupConv2d, how: str) -> tuple[dict, str] | None:
    """A state dict broken in one way, and the key the error must name (None: not possible)."""
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    stages = layer.num_stages
    stage = int(layer.stage)
    if how == "stage_negative":
        state["stage"] = torch.tensor(-1)
    elif how == "stage_too_large":
        state["stage"] = torch.tensor(stages + 1)
    elif how == "stage_fraction":
        state["stage"] = torch.tensor(stage + 0.5, dtype=torch.float64)
    elif how == "stage_other":  # in range but the mask was condensed a different number of times
        if stages == 0:
            return None
        state["stage"] = torch.tensor((stage + 1) % (stages + 1))
    elif how == "mask_row_in_group":
        if layer.spec.out_channels == layer.learned_groups:
            return None  # one row per group: nothing can disagree
        mask = state["mask"]
        row = layer.learned_groups  # the second row of group 0
        mask[row, 0] = ~mask[row, 0]
        return state, "mask"
    elif how == "mask_not_binary":
        state["mask"] = state["mask"].double() * 0.5
        return state, "mask"
    else:
        state["mask"] = state["mask"][:, :-1]
        return state, "mask"
    return state, "stage"


@given(cfg=lgc_configs, how=st.sampled_from(CORRUPTIONS))
def test_lgc_refuses_impossible_states(cfg, how):
    layer = _condensed_lgc(cfg)
    corrupted = _corrupt(layer, how)
    if corrupted is None:
        return
    state, key = corrupted
    fresh = _condensed_lgc({**cfg, "progress": 0.0})
    with pytest.raises(ValueError, match=key):
        fresh.load_state_dict(state)
    # also when the layer sits inside a model (the key carries the module's prefix)
    model = nn.Sequential(nn.Identity(), _condensed_lgc({**cfg, "progress": 0.0}))
    with pytest.raises(ValueError, match=f"1.{key}"):
        model.load_state_dict({f"1.{k}": v for k, v in state.items()})


@given(cfg=lgc_configs)
def test_lgc_reachable_states_load_and_deploy_exactly(cfg):
    layer = _condensed_lgc(cfg)
    fresh = _condensed_lgc({**cfg, "progress": 0.0, "seed": cfg["seed"] + 1})
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.mask, layer.mask) and int(fresh.stage) == int(layer.stage)
    x = torch.randn(2, 12, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(fresh.deploy()(x), fresh(x), rtol=1e-10, atol=1e-12)


@given(cfg=lgc_configs, bad=st.sampled_from(["negative", "too_large", "float"]))
def test_deployed_lgc_refuses_an_index_outside_the_input(cfg, bad):
    deployed = _condensed_lgc(cfg).deploy()
    state = deployed.state_dict()
    index = state["index"].clone()
    if bad == "negative":
        index[0] = -1
    elif bad == "too_large":
        index[-1] = 12
    else:
        index = index.double()
    with pytest.raises(ValueError, match="index"):
        deployed.load_state_dict({**state, "index": index})


# ------------------------------------------------------------------------------ empty batch


def _geometry(kernel: int, stride: int) -> dict:
    return {"kernel_size": kernel, "stride": stride, "padding": kernel // 2}


def _empty_batch_modules(family: str, impl: str, kernel: int, stride: int) -> list[nn.Module]:
    geometry = _geometry(kernel, stride)
    if family == "doconv":
        layer = DOConv2d(8, 8, **geometry, dtype=torch.float64)
        return [layer, layer.deploy()]
    if family == "condconv":
        layer = CondConv2d(8, 8, **geometry, num_experts=3, impl=impl, dtype=torch.float64)
        return [layer, layer.deploy()]
    if family == "dgconv":
        layer = GroupableConv2d(8, 8, **geometry, impl=impl, dtype=torch.float64)
        with torch.no_grad():
            layer.gate.copy_(torch.tensor([0.5, -0.5, -0.5]))  # a permuted grouped deploy
        return [layer, layer.deploy()]
    layer = LearnedGroupConv2d(8, 8, **geometry, learned_groups=2, dtype=torch.float64)
    layer.set_progress(1.0)
    norm = nn.BatchNorm2d(8, dtype=torch.float64).eval()
    folded = CondensedGroupConv2d.from_learned(layer, pre_norm=norm, pre_relu=True, impl=impl)
    folded.set_output_post(
        torch.rand(8, dtype=torch.float64), torch.rand(8, dtype=torch.float64), True
    )
    return [layer, CondensedGroupConv2d.from_learned(layer, impl=impl), folded]


IMPLS = {
    "doconv": ["auto"],
    "condconv": ["auto", *FORMS],
    "dgconv": ["torch", "triton"],
    "lgc": ["torch", "triton"],
}


@given(
    case=st.sampled_from([(f, i) for f, impls in IMPLS.items() for i in impls]),
    kernel=st.sampled_from([1, 3]),
    stride=st.sampled_from([1, 2]),
    size=st.integers(1, 6),
    training=st.booleans(),
)
def test_empty_batch_gives_an_empty_output(case, kernel, stride, size, training):
    family, impl = case
    if family == "lgc" and impl == "triton" and (kernel, stride) != (1, 1):
        impl = "torch"  # the fused kernel is for 1x1 stride-1 layers only
    x = torch.randn(0, 8, size, size, dtype=torch.float64)
    expected = nn.Conv2d(8, 8, **_geometry(kernel, stride), dtype=torch.float64)(x).shape
    for module in _empty_batch_modules(family, impl, kernel, stride):
        module.train(training and any(p.requires_grad for p in module.parameters()))
        y = module(x.requires_grad_(module.training))
        assert y.shape == expected, type(module).__name__
        if module.training:
            y.sum().backward()
            assert x.grad is not None and x.grad.shape == x.shape
            x.grad = None


# ------------------------------------------------------------------------------ DGC empty batch
#: DGC, from here on: empty batches, half precision, the reference code's zero-width saliency
#: generators, float64 checkpoints and malformed state dicts.
DGC_IMPLS = ["dense", "sparse", "grouped", "triton", "auto"]


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


@pytest.mark.parametrize("impl", DGC_IMPLS)
@pytest.mark.parametrize("kernel,stride", [(1, 1), (3, 1), (3, 2)])
def test_dgc_empty_batch_gives_an_empty_output(impl, kernel, stride):
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


# ------------------------------------------------------------------------------ DGC half precision
#: Relative error (to the largest output) of a layer run in low precision against the same
#: layer, weights and input in float32. Every product rounds its inputs (x, the kernel, the
#: saliency scale: 3 roundings of unit u) and the output rounds once: about 4u of the summed
#: magnitudes, which are within a small factor of the largest output here; 8u allows for that
#: factor. u = 2^-11 (float16) and 2^-8 (bfloat16).
LOW_PRECISION_RTOL = {torch.float16: 8 * 2.0**-11, torch.bfloat16: 8 * 2.0**-8}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", DGC_IMPLS)
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


# ------------------------------------------------------------------------------ DGC reference layouts
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

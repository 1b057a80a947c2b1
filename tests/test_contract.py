"""The layer contract, checked generically for every family in ``dynaconv.METHODS``.

Each family's layer is built with ``from_conv`` from a random float64 ``nn.Conv2d``
(16 -> 16 channels, 3x3 with padding 1, or 1x1 if the family skips the 3x3), with its
``example_options``, perturbed parameters, brought to the end of its schedule (``set_progress(1.0)``),
given BatchNorm statistics where it has any, and put in eval mode. Families whose layer
is not implemented yet are skipped.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import Tensor, nn

import dynaconv
from dynaconv.layers import ConversionSkipped, DynaConv2d

CHANNELS = 16


def _candidate_convs() -> list[nn.Conv2d]:
    return [
        nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, bias=False, dtype=torch.float64),
        nn.Conv2d(CHANNELS, CHANNELS, 1, bias=False, dtype=torch.float64),
    ]


def build_layer(method: str, seed: int = 0) -> tuple[DynaConv2d, nn.Conv2d]:
    """A float64 layer of ``method`` at the end of its schedule, in eval mode (and its conv)."""
    cls = dynaconv.layer_class(method)
    torch.manual_seed(seed)
    for conv in _candidate_convs():
        try:
            layer = cls.from_conv(conv, **cls.example_options)
        except ConversionSkipped:
            continue
        break
    else:
        pytest.fail(f"{method}: from_conv skipped every candidate conv")
    with torch.no_grad():
        for parameter in layer.parameters():  # not the initialisation: a trained layer
            parameter.add_(0.05 * torch.randn_like(parameter))
    dynaconv.set_progress(layer, 1.0)
    layer.train()
    with torch.no_grad():
        for _ in range(2):  # BatchNorm statistics, for families that hold a BatchNorm
            layer(torch.randn(4, CHANNELS, 8, 8, dtype=torch.float64))
    return layer.eval(), conv


@pytest.fixture(scope="module", params=sorted(dynaconv.METHODS))
def built(request) -> tuple[str, DynaConv2d, nn.Conv2d]:
    layer, conv = build_layer(request.param)
    return request.param, layer, conv


@pytest.fixture
def layer(built) -> DynaConv2d:
    return copy.deepcopy(built[1])


def _x(*shape: int, seed: int = 1) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape or (3, CHANNELS, 9, 7), generator=generator, dtype=torch.float64)


def _buffers(module: nn.Module) -> dict[str, Tensor]:
    return {name: b.detach().clone() for name, b in module.named_buffers()}


def _assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def test_identity(built):
    method, layer, conv = built
    assert isinstance(layer, DynaConv2d)
    assert type(layer).method == method
    assert (layer.in_channels, layer.out_channels) == (conv.in_channels, conv.out_channels)
    assert layer.kernel_size == conv.kernel_size and layer.stride == conv.stride
    assert isinstance(layer.structure(), str)


def test_constructor_takes_conv2d_arguments(built):
    _, layer, conv = built
    cls = type(layer)
    positional = (
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        False,
        "zeros",
    )
    fresh = cls(*positional, device="cpu", dtype=torch.float64, **cls.example_options)
    x = _x()
    assert fresh(x).shape == conv(x).shape
    assert all(p.dtype == torch.float64 for p in fresh.parameters())


def test_forward_returns_one_tensor_of_the_conv_shape(built, layer):
    conv = built[2]
    for x in (_x(), _x(1, CHANNELS, 5, 12)):
        y = layer(x)
        assert type(y) is Tensor
        assert y.shape == conv(x).shape
        assert torch.isfinite(y).all()


def test_deploy_is_exact(built, layer):
    x = _x()
    deployed = layer.deploy()
    assert deployed is not layer
    if not type(layer).deploys_to_itself:
        assert not any(isinstance(m, DynaConv2d) for m in deployed.modules())
    with torch.no_grad():
        torch.testing.assert_close(deployed.eval()(x), layer(x), rtol=1e-9, atol=1e-11)
    dynaconv.deploy(nn.Sequential(layer, nn.ReLU()), example_input=x)  # verifies


def test_deploy_and_run_under_inference_mode(layer):
    """Deployed under ``torch.inference_mode`` (its tensors are inference tensors, which keep
    no version counter) and run there, twice: the same output as the eval layer."""
    x = _x()
    with torch.no_grad():
        expected = layer(x)
    with torch.inference_mode():
        deployed = layer.deploy().eval()
        for _ in range(2):
            torch.testing.assert_close(deployed(x), expected, rtol=1e-9, atol=1e-11)


def test_state_dict_round_trip(built, layer):
    method = built[0]
    clone, _ = build_layer(method, seed=7)  # other weights, same structure
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    clone.eval()
    _assert_same(_buffers(clone), _buffers(layer))
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(clone(x), layer(x), rtol=1e-12, atol=1e-14)


def test_training_step_then_copy_and_deploy(layer):
    """After a training step (aux loss included) the layer still deep-copies and deploys."""
    layer.train()
    x = _x(4, CHANNELS, 8, 8)
    loss = layer(x).square().mean() + layer.aux_loss()
    loss.backward()
    grads = [p.grad for p in layer.parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)
    copy.deepcopy(layer)  # EMA copies and dynaconv.deploy need this
    layer.eval()
    dynaconv.deploy(nn.Sequential(layer), example_input=x)


def test_eval_forward_changes_no_state(layer):
    before_buffers = _buffers(layer)
    before_params = {k: v.detach().clone() for k, v in layer.named_parameters()}
    layer(_x())  # with autograd
    with torch.no_grad():
        layer(_x(seed=2))
    with torch.inference_mode():
        layer(_x(seed=3))
    _assert_same(_buffers(layer), before_buffers)
    _assert_same({k: v.detach() for k, v in layer.named_parameters()}, before_params)


def test_aux_loss_is_a_scalar_tensor(layer):
    term = layer.aux_loss()
    assert isinstance(term, Tensor) and term.dim() == 0 and torch.isfinite(term)
    pair = nn.Sequential(layer, copy.deepcopy(layer))
    torch.testing.assert_close(dynaconv.aux_loss(pair), 2 * term)


def test_channels_last_gives_the_same_output(layer):
    x = _x()
    with torch.no_grad():
        expected = layer(x)
        torch.testing.assert_close(
            layer(x.contiguous(memory_format=torch.channels_last)), expected, rtol=1e-9, atol=1e-11
        )


def test_compile_matches_eager(layer):
    x = _x()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=1e-9, atol=1e-11)


def test_export_of_the_deployed_module(layer):
    x = _x()
    deployed = layer.deploy().eval()
    program = torch.export.export(deployed, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-9, atol=1e-11)


def test_bfloat16_autocast_on_cpu(layer):
    layer = layer.float()
    x = _x().float()
    with torch.no_grad():
        expected = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
    assert y.shape == expected.shape and torch.isfinite(y).all()
    relative = (y.float() - expected).norm() / expected.norm()
    assert relative < 5e-2


def test_wrong_input_channels_raise_value_error(layer):
    with pytest.raises(ValueError, match="channels"):
        layer(_x(2, CHANNELS - 1, 8, 8))


def test_count_macs_dense_is_the_conv_and_its_own_layers(built, layer):
    conv = built[2]
    x = _x()
    y = layer(x)
    dense, active = layer.count_macs(tuple(x.shape), tuple(y.shape))
    conv_macs = y.shape[0] * conv.weight.numel() * y.shape[2] * y.shape[3]
    # The conv it stands for plus the layer's own small layers (routing, saliency).
    assert conv_macs <= dense <= 1.02 * conv_macs
    assert active > 0


def test_weight_is_the_static_kernel(built, layer):
    method, _, conv = built
    if not type(layer).static_kernel:
        pytest.skip(f"{method} has no single static kernel")
    weight = layer.weight
    assert isinstance(weight, Tensor)
    assert weight.shape == (
        conv.out_channels,
        conv.in_channels // conv.groups,
        *conv.kernel_size,
    )
    deployed = layer.deploy()
    if type(deployed) is nn.Conv2d:
        torch.testing.assert_close(weight.detach(), deployed.weight.detach(), rtol=0, atol=0)

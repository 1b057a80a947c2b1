"""dynaconv.profile: counts cross-checked against torch's FlopCounterMode, table, errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dynaconv
from dynaconv import MacCount
from dynaconv.models import DigitsCNN


def _flops(model: nn.Module, shape: tuple[int, ...]) -> int:
    x = torch.randn(shape, dtype=next(model.parameters()).dtype)
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops()


def _doconv_digits() -> nn.Module:
    torch.manual_seed(0)
    model = dynaconv.convert(DigitsCNN(), "doconv")
    for _, layer in dynaconv.dynaconv_layers(model):
        if layer.D is not None:
            nn.init.normal_(layer.D, std=0.1)
    return model


def _resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def _digits() -> nn.Module:
    torch.manual_seed(0)
    return DigitsCNN()


def _other_convs() -> nn.Module:
    """Transposed, 1-d and 3-d convs, a strided grouped conv and linears on 3-d input."""

    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)
            self.down = nn.Conv2d(6, 8, (3, 5), stride=2, padding=1, groups=2)
            self.line = nn.Conv1d(8, 4, 3)
            self.volume = nn.Conv3d(1, 2, 3, padding=1)
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            y = self.down(self.up(x))
            z = self.line(y.flatten(2))
            w = self.volume(z[:, None, :, :, None])  # (B, 1, 4, L, 1)
            return self.head(w.mean(1).squeeze(-1).transpose(1, 2))

    torch.manual_seed(0)
    return Mixed()


@pytest.mark.parametrize(
    ("build", "shape"),
    [
        (_resnet18, (1, 3, 32, 32)),
        (_digits, (2, 1, 8, 8)),
        (_doconv_digits, (3, 1, 8, 8)),
        (_other_convs, (2, 4, 5, 6)),
    ],
    ids=["resnet18", "digits_cnn", "doconv_digits_cnn", "other_convs"],
)
def test_macs_match_flop_counter_on_deployed_models(build, shape):
    model = build()
    counts = dynaconv.profile(model, shape)
    deployed = dynaconv.deploy(model, input_shape=shape)
    assert counts["macs"] > 0
    assert 2 * counts["macs"] == _flops(deployed, shape)
    assert counts["macs_active"] == counts["macs"]  # no learned sparsity in these models
    assert dynaconv.profile(deployed, shape)["macs"] == counts["macs"]


def test_batch_scales_macs_but_not_params():
    one = dynaconv.profile(_doconv_digits(), (1, 1, 8, 8))
    four = dynaconv.profile(_doconv_digits(), (4, 1, 8, 8))
    assert four["macs"] == 4 * one["macs"]
    assert four["params"] == one["params"]


def test_params_stored_and_deployed():
    plain = _digits()
    plain_params = sum(p.numel() for p in plain.parameters())
    counts = dynaconv.profile(plain, (1, 1, 8, 8))
    assert counts["params"] == counts["params_deployed"] == plain_params

    model = _doconv_digits()
    counts = dynaconv.profile(model, (1, 1, 8, 8))
    assert counts["params"] == sum(p.numel() for p in model.parameters())
    assert counts["params_deployed"] == plain_params  # DO-Conv deploys to the plain network
    # W (Cout, Cin, 9) + D (Cin, 9, 9) per 3x3 conv: the over-parameterisation is counted.
    extra = sum(
        layer.D.numel() for _, layer in dynaconv.dynaconv_layers(model) if layer.D is not None
    )
    assert counts["params"] == plain_params + extra
    assert (
        dynaconv.profile(model, (1, 1, 8, 8), deployed=False)["params_deployed"] == counts["params"]
    )


def test_per_layer_rows():
    counts = dynaconv.profile(_doconv_digits(), (2, 1, 8, 8))
    rows = {row.name: row for row in counts.layers}
    assert counts.layers is counts["layers"]
    conv_names = [f"features.{i}" for i in (0, 3, 6, 9, 12, 15)]
    assert [r.name for r in counts.layers if r.kind == "DOConv2d"] == conv_names
    row = rows["features.12"]  # 3x3, 64 -> 64, stride 2: 8x8 -> 4x4
    assert row.input_shape == (2, 64, 8, 8) and row.output_shape == (2, 64, 4, 4)
    assert row.macs == row.macs_active == 2 * 64 * 64 * 9 * 4 * 4
    assert row.params == 64 * 64 * 9 + 64 * 9 * 9  # W and D
    assert row.structure == "D_mul=9"
    assert rows["features.13"].kind == "BatchNorm2d" and rows["features.13"].macs == 0
    assert rows["classifier"].macs == 2 * 64 * 10 and rows["classifier"].params == 650
    assert sum(r.macs for r in counts.layers) == counts["macs"]
    assert "features.14" not in rows  # ReLU: no params, no MACs, no row


def test_table_text():
    counts = dynaconv.profile(_doconv_digits(), (1, 1, 8, 8))
    text = str(counts)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["layer", "type", "output"]
    assert "structure" in lines[0]
    body = [line for line in lines if line.startswith("features.6 ")]
    assert len(body) == 1
    assert body[0].split() == [
        "features.6",
        "DOConv2d",
        "64x8x8",
        "42,048",
        "2,359,296",
        "2,359,296",
        "D_mul=9",
    ]
    assert lines[-1] == (
        f"params {counts['params']:,d} (deployed {counts['params_deployed']:,d})  "
        f"MACs {counts['macs']:,d} (active {counts['macs_active']:,d})"
    )
    assert len(lines) == len(counts.layers) + 4  # header, rules, totals


def test_reference_convention_adds_elementwise_ops():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )
    dense = dynaconv.profile(model, (2, 3, 6, 6))
    reference = dynaconv.profile(model, (2, 3, 6, 6), convention="reference")
    conv = 2 * 4 * 3 * 9 * 6 * 6
    linear = 2 * 4 * 5
    assert dense["macs"] == conv + linear
    relu, maxpool, gap, linear_bias = 2 * 4 * 6 * 6, 2 * 4 * 3 * 3 * 4, 2 * 4 * 3 * 3, 2 * 5
    assert reference["macs"] == conv + linear + relu + maxpool + gap + linear_bias


def test_module_with_its_own_count_is_counted_once():
    class Counted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.conv(x)

        def count_macs(self, input_shape, output_shape):
            return 1000, 10

    counts = dynaconv.profile(nn.Sequential(Counted(), nn.Conv2d(2, 3, 1)), (1, 2, 4, 4))
    assert [(r.name, r.macs, r.macs_active) for r in counts.layers] == [
        ("0", 1000, 10),
        ("1", 3 * 2 * 16, 3 * 2 * 16),
    ]
    assert counts["macs"] == 1000 + 96 and counts["macs_active"] == 10 + 96


def test_reference_count_protocol():
    class QuarterConv(nn.Module):
        """Counted by the reference at a quarter of its dense conv (like an LGC layer)."""

        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.BatchNorm2d(4)
            self.conv = nn.Conv2d(4, 8, 1, bias=False)

        def forward(self, x):
            return self.conv(self.norm(x))

        def count_macs(self, input_shape, output_shape, convention="dense"):
            dense = output_shape[0] * 8 * 4 * output_shape[2] * output_shape[3]
            if convention == "reference":
                return MacCount(dense // 4, dense // 4)
            return MacCount(dense, dense)

        def count_params(self, convention="dense"):
            stored = sum(p.numel() for p in self.parameters())
            return 8 * 4 // 4 + 8 if convention == "reference" else stored

    model = nn.Sequential(QuarterConv(), nn.ReLU())
    stored = 8 + 32
    reference = dynaconv.profile(model, (2, 4, 3, 3), convention="reference")
    assert [(r.name, r.macs, r.params) for r in reference.layers] == [
        ("0", 2 * 8 * 4 * 9 // 4, 16),
        ("1", 2 * 8 * 9, 0),  # the ReLU: one op per element
    ]
    assert reference["macs"] == 2 * 8 * 4 * 9 // 4 + 2 * 8 * 9  # the ReLU's ops added
    assert reference["params"] == 16
    assert reference["params_deployed"] == stored
    dense = dynaconv.profile(model, (2, 4, 3, 3))  # its dense count, its stored parameters
    assert dense["macs"] == 2 * 8 * 4 * 9 and dense["params"] == stored
    assert [(r.name, r.macs, r.params) for r in dense.layers] == [("0", 2 * 8 * 4 * 9, stored)]


def test_profile_changes_no_state_and_restores_modes():
    model = _doconv_digits().train()
    model.features[1].eval()
    modes = {name: m.training for name, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dynaconv.profile(model, (4, 1, 8, 8))
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_shape": (1,)}, "input_shape"),
        ({"input_shape": (0, 1, 8, 8)}, "input_shape"),
        ({"input_shape": (1, 1, 8.0, 8)}, "input_shape"),
        ({"input_shape": (True, 1, 8, 8)}, "input_shape"),
        ({"input_shape": "1x1x8x8"}, "input_shape"),
        ({"input_shape": 8}, "input_shape"),
        ({"input_shape": (1, 1, 8, 8), "convention": "flops"}, "convention"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dynaconv.profile(_digits(), **kwargs)


def test_deployed_condensenet_on_cpu_counts_what_flop_counter_counts():
    """The deployed CPU 1x1 path folds its BN-ReLU once (at deploy), not on every forward."""
    from dynaconv.models import condensenet50

    torch.manual_seed(0)
    model = condensenet50()
    dynaconv.set_progress(model, 1.0)  # fully condensed
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(-1.0, 1.5)  # some negative scales: both clamp sides
                module.bias.normal_()
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    shape = (2, 3, 32, 32)
    deployed = dynaconv.deploy(model, input_shape=shape)
    counts = dynaconv.profile(deployed, shape)
    assert 2 * counts["macs"] == _flops(deployed, shape)

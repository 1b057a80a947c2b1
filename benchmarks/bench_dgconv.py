"""DGConv against plain PyTorch convs of the same shape (fp32, batch 64).

Bars (issue: DGConv): training step <= 1.2x the plain dense conv; deployed inference within
5% of torch's grouped conv with the same groups, at 256 channels 14x14 and 128 channels 28x28
with 32 learned groups. Rows:

* ``train step``: forward, loss, backward of the dense-masked layer (``impl="auto"``: the fused
  Triton kernel builds ``weight * U`` in one pass on CUDA) against ``nn.Conv2d``; also with the
  regulariser ``aux_loss()`` in the loss, and with the pure PyTorch path (no bar).
* ``deployed standalone``: ``layer.deploy()``. With ``sort=True`` the groups are contiguous and
  it is one grouped ``nn.Conv2d`` (bar). With unsorted gates it is gather + grouped conv +
  permutation (reported with the bar: the two gathers are memory traffic a grouped conv does
  not have, which is why networks fold them).
* ``deployed folded``: a ResNeXt bottleneck (1x1, BN, ReLU, DGConv, BN, ReLU, 1x1, BN) deployed
  with the permutation folded into its 1x1 convs and BNs, against the same bottleneck built with
  torch's grouped conv (bar).
* ``eval (not deployed)``: the layer in eval mode builds its masked dense kernel on every
  forward (no cache: a ``.data`` edit would leave it stale; no bar).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from dynaconv.layers.dgconv.layer import GroupableConv2d
from dynaconv.models.surgery import fold_bottleneck
from harness import Row, Timing, common_args, device_ms, forward_fn, measure, report, train_step_fn

CASES = [("256ch 14x14", 256, 14), ("128ch 28x28", 128, 28)]
GROUPS = 32


def scattered_gates(num_gates: int, zeros: int) -> torch.Tensor:
    """Gates with ``zeros`` zero (negative) gates spread over the bit positions (not sorted)."""
    gates = torch.ones(num_gates)
    positions = torch.linspace(0, num_gates - 1, zeros).round().long()
    gates[positions] = -1.0
    return gates


def dgconv_layer(channels: int, sort: bool, impl: str, device: torch.device) -> GroupableConv2d:
    layer = GroupableConv2d(channels, channels, 3, padding=1, bias=False, sort=sort, impl=impl)
    zeros = GROUPS.bit_length() - 1
    with torch.no_grad():
        layer.gate.copy_(scattered_gates(layer.num_gates, zeros))
    layer = layer.to(device)
    assert layer.num_groups == GROUPS
    return layer


def bottleneck(channels: int, conv2: nn.Module, device: torch.device) -> nn.Sequential:
    outer = 2 * channels
    block = nn.Sequential(
        nn.Conv2d(outer, channels, 1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        conv2,
        nn.BatchNorm2d(channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(channels, outer, 1, bias=False),
        nn.BatchNorm2d(outer),
    )
    return block.to(device).eval()


def folded(block: nn.Sequential) -> nn.Sequential:
    """The deployed bottleneck: DGConv's permutation folded into the 1x1 convs and BNs."""
    block = block.eval()
    conv = fold_bottleneck(block[0], block[1], block[3], block[4], block[6])
    block[3] = conv
    return block


def train_row(
    case: str,
    variant: str,
    layer: GroupableConv2d,
    x: torch.Tensor,
    baseline: Timing,
    args: argparse.Namespace,
    bar: float | None,
    aux: bool,
) -> Row:
    """A training step of ``layer`` (optionally with its regulariser) against ``baseline``."""
    extra = (lambda: 1e-9 * layer.aux_loss()) if aux else None
    timing = measure(
        train_step_fn(layer.train(), x, extra), args.device, args.warmup, args.reps, memory=True
    )
    return Row(
        case,
        variant,
        "train step",
        timing.median_ms,
        baseline.median_ms,
        timing.peak_mib,
        baseline.peak_mib,
        bar=bar,
        notes="vs dense nn.Conv2d",
    )


def main() -> None:
    args = common_args(__doc__.splitlines()[0])
    device, dtype = args.device, torch.float32
    batch = args.batch or (4 if args.quick else 64)
    reps, warmup = args.reps, args.warmup
    rows: list[Row] = []
    for case, channels, size in CASES:
        x = torch.randn(batch, channels, size, size, device=device)
        plain = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device)
        base_train = measure(train_step_fn(plain.train(), x), device, warmup, reps, memory=True)

        layer = dgconv_layer(channels, False, "auto", device)
        torch_layer = dgconv_layer(channels, False, "torch", device)
        rows += [
            train_row(case, "DGConv (impl=auto)", layer, x, base_train, args, 1.2, aux=False),
            train_row(case, "DGConv + aux_loss", layer, x, base_train, args, 1.2, aux=True),
            train_row(case, "DGConv (impl=torch)", torch_layer, x, base_train, args, None, False),
        ]
        base_device = device_ms(train_step_fn(plain.train(), x), device)
        layer_device = device_ms(train_step_fn(layer.train(), x), device)
        if base_device and layer_device:
            rows.append(
                Row(
                    case,
                    "DGConv (impl=auto)",
                    "train step, device time",
                    layer_device,
                    base_device,
                    notes="sum of GPU kernel time (torch.profiler)",
                )
            )

        base_dense = measure(forward_fn(plain.eval(), x), device, warmup, reps)
        fwd = measure(forward_fn(layer.eval(), x), device, warmup, reps)
        rows.append(
            Row(case, "DGConv eval (masked kernel)", "forward", fwd.median_ms, base_dense.median_ms)
        )

        grouped = nn.Conv2d(channels, channels, 3, padding=1, bias=False, groups=GROUPS)
        grouped = grouped.to(device).eval()
        base_grouped = measure(forward_fn(grouped, x), device, warmup, reps)
        for sort, variant in (
            (True, "deployed standalone, sort=True"),
            (False, "deployed standalone, unsorted (gathers)"),
        ):
            deployed = dgconv_layer(channels, sort, "auto", device).deploy().eval()
            timing = measure(forward_fn(deployed, x), device, warmup, reps)
            rows.append(
                Row(
                    case,
                    variant,
                    "forward",
                    timing.median_ms,
                    base_grouped.median_ms,
                    bar=1.05,
                    notes=f"{type(deployed).__name__} vs grouped nn.Conv2d (groups={GROUPS})",
                )
            )

        block_in = torch.randn(batch, 2 * channels, size, size, device=device)
        reference_block = bottleneck(channels, grouped, device)
        dgconv_block = bottleneck(channels, dgconv_layer(channels, False, "auto", device), device)
        deployed_block = folded(dgconv_block)
        assert not any(isinstance(m, GroupableConv2d) for m in deployed_block.modules())
        base_block = measure(forward_fn(reference_block, block_in), device, warmup, reps)
        timing = measure(forward_fn(deployed_block, block_in), device, warmup, reps)
        rows.append(
            Row(
                case,
                "deployed folded (bottleneck)",
                "forward",
                timing.median_ms,
                base_block.median_ms,
                bar=1.05,
                notes="vs the same bottleneck with torch's grouped conv",
            )
        )
    report(f"DGConv layer, batch {batch}", rows, device, dtype, args.json)


if __name__ == "__main__":
    main()

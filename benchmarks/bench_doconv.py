"""DO-Conv against the plain nn.Conv2d of the same shape.

Bars (issue: foundation): training step <= 1.15x, deployed forward 1.00x
(within 3%) at 256 channels 14x14 and 64 channels 56x56, batch 64. Expectation: the training
step adds one small einsum (Cin x M*N x D_mul x Cout/groups) and its backward, a few percent
of the conv. Eval mode recomposes the kernel on every forward (no cache: a `.data` edit would
leave it stale), so its forward is the conv plus that composition (reported, no bar); the
deployed module is the conv itself.
"""

from __future__ import annotations

import torch
from torch import nn

import dynaconv
from harness import Row, common_args, device_ms, forward_fn, measure, report, train_step_fn

CASES = [("256ch 14x14", 256, 14), ("64ch 56x56", 64, 56)]


def main() -> None:
    args = common_args(__doc__.splitlines()[0])
    device, dtype = args.device, torch.float32
    batch = args.batch or (4 if args.quick else 64)
    rows: list[Row] = []
    for case, channels, size in CASES:
        plain = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device)
        layer = dynaconv.DOConv2d(channels, channels, 3, padding=1, bias=False).to(device)
        with torch.no_grad():
            layer.D.normal_(0, 0.01)
        x = torch.randn(batch, channels, size, size, device=device)
        base_fwd = measure(forward_fn(plain.eval(), x), device, args.warmup, args.reps)
        base_train = measure(
            train_step_fn(plain.train(), x), device, args.warmup, args.reps, memory=True
        )
        train = measure(
            train_step_fn(layer.train(), x), device, args.warmup, args.reps, memory=True
        )
        rows.append(
            Row(
                case,
                "DO-Conv",
                "train step",
                train.median_ms,
                base_train.median_ms,
                train.peak_mib,
                base_train.peak_mib,
                bar=1.15,
            )
        )
        base_device = device_ms(train_step_fn(plain.train(), x), device)
        layer_device = device_ms(train_step_fn(layer.train(), x), device)
        if base_device and layer_device:
            rows.append(
                Row(
                    case,
                    "DO-Conv",
                    "train step, device time",
                    layer_device,
                    base_device,
                    notes="sum of GPU kernel time (torch.profiler)",
                )
            )
        layer.eval()
        fwd = measure(forward_fn(layer, x), device, args.warmup, args.reps)
        rows.append(Row(case, "DO-Conv eval", "forward", fwd.median_ms, base_fwd.median_ms))
        deployed = layer.deploy().eval()
        dep = measure(forward_fn(deployed, x), device, args.warmup, args.reps)
        rows.append(
            Row(case, "DO-Conv deployed", "forward", dep.median_ms, base_fwd.median_ms, bar=1.03)
        )
    report(f"DO-Conv layer, batch {batch}", rows, device, dtype, args.json)


if __name__ == "__main__":
    main()

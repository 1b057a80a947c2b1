"""DGC (dynamic group convolution) against the plain nn.Conv2d of the same shape.

Bars (issue: DGC), fp32, batch 64, 4 heads, 25% of the input channels kept, 3x3 convs at
256 channels 14x14 and 64 channels 56x56: inference <= 1.0x the plain dense conv, training
step <= 1.5x, training peak memory <= 1.2x; DyDenseNet-86 (CIFAR, batch 256, eval) <= 1.5x the
same network with plain 1x1 convs in place of the DGC layers.

Expected, before measuring (H100): the deployed layer runs the saliency generators (a global
pool reading x once, two tiny batched matmuls, one top-k) and one fused gathered-channel
implicit GEMM doing 25% of the dense MACs; per-example kernels cannot share weight tiles across
the batch, and tiles are small (Cout/h = 64 rows), so the kernel should reach roughly 40-60%
of cuDNN's efficiency: about 0.5-0.8x of the dense conv, plus ~20-40 us of launch overhead for
the 6-8 small saliency kernels, which matters at these sizes (the dense conv takes ~60-120 us):
expect 0.7-1.0x. Training step: forward 0.25x-MAC kernel, backward as dense-cost cuDNN dgrad +
wgrad head by head in 4 batch chunks (16 small convolutions), so ~1.1-1.5x; peak memory
~1.2-1.4x with the default 2 backward chunks (transient gated input and its gradient, half
of x each); the rows with 1 and 4 chunks show the time/memory trade-off. The paper's masked dense form (``impl="dense"``)
is listed for comparison: ~2-4x time, ~2-3x memory. DyDenseNet-86: 42 DGC 1x1 layers on small
CIFAR maps, where launch overhead of the saliency ops dominates: expect ~1.2-1.6x.
CPU: no Triton. ``auto`` runs the grouped form there (a transposed convolution with one group
per example and head over the gathered channels, for inference and training): 25% of the MACs
in a grouped convolution that oneDNN runs at roughly 40-60% of its dense efficiency, plus
gathers and the output interleave (each a pass over x): expect 0.6-0.9x of the dense conv for
inference and a similar ratio for the training step. The gather + unfold + bmm form (the
export form) pays for unfolding 9 taps: expect 2-4x.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import dynaconv
from dynaconv import DynamicGroupConv2d
from dynaconv.models import dydensenet86
from harness import (
    Row,
    common_args,
    forward_fn,
    measure,
    measure_interleaved,
    report,
    train_step_fn,
)

CASES = [("256ch 14x14", 256, 14), ("64ch 56x56", 64, 56)]


def layer_rows(args, device, batch: int) -> list[Row]:
    rows: list[Row] = []
    for case, channels, size in CASES:
        torch.manual_seed(0)
        plain = nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(device)
        layer = DynamicGroupConv2d(channels, channels, 3, padding=1, bias=False).to(device)
        layer.set_progress(1.0)  # 25% kept
        x = torch.randn(batch, channels, size, size, device=device)
        timing = {"warmup": args.warmup, "reps": args.reps}
        deployed = layer.deploy().eval()
        forms = {"auto": f"deployed ({deployed.impl})", "grouped": "deployed, grouped conv form"}
        forms["sparse"] = "deployed, gather+bmm"
        fns = {"plain": forward_fn(plain.eval(), x)}
        for impl in forms:
            variant = copy.deepcopy(deployed)
            variant.impl = impl
            fns[impl] = forward_fn(variant, x)
        masked = copy.deepcopy(layer).eval()
        masked.impl = "dense"
        fns["dense"] = forward_fn(masked, x)
        # Samples interleaved with the plain conv's, so that drift does not skew the ratios.
        fwd = measure_interleaved(fns, device, args.warmup, args.reps)
        for impl, name in [*forms.items(), ("dense", "masked dense (paper's math)")]:
            bar = 1.0 if impl == "auto" else None
            rows.append(Row(case, name, "forward", fwd[impl], fwd["plain"], bar=bar))
        base_train = measure(train_step_fn(plain.train(), x), device, memory=True, **timing)

        variants = [("train (auto)", "auto", 2, 1.5)]
        if device.type == "cuda":  # the Triton training path: backward chunks trade-off
            variants += [
                ("train (auto, 1 backward chunk)", "auto", 1, None),
                ("train (auto, 4 backward chunks)", "auto", 4, None),
            ]
        variants.append(("train (masked dense)", "dense", 2, None))
        for name, impl, chunks, bar in variants:
            layer.train()
            layer.impl = impl
            layer.backward_chunks = chunks
            train = measure(
                train_step_fn(layer, x, extra_loss=lambda layer=layer: 1e-5 * layer.aux_loss()),
                device,
                memory=True,
                **timing,
            )
            rows.append(
                Row(
                    case,
                    name,
                    "train step",
                    train.median_ms,
                    base_train.median_ms,
                    train.peak_mib,
                    base_train.peak_mib,
                    bar=bar,
                )
            )
            if train.peak_mib is not None:
                rows.append(
                    Row(
                        case,
                        name,
                        "train peak MiB",
                        train.peak_mib,
                        base_train.peak_mib,
                        bar=1.2 if bar else None,
                    )
                )
    return rows


def network_rows(args, device, batch: int) -> list[Row]:
    torch.manual_seed(0)
    net = dydensenet86().to(device)
    dynaconv.set_progress(net, 1.0)
    net.eval()
    plain = dydensenet86().to(device).eval()
    for name, module in list(plain.named_modules()):
        if isinstance(module, DynamicGroupConv2d):
            parent, _, child = name.rpartition(".")
            conv = nn.Conv2d(module.in_channels, module.out_channels, 1, bias=False).to(device)
            setattr(plain.get_submodule(parent), child, conv.eval())
    x = torch.randn(batch, 3, 32, 32, device=device)
    timing = {"warmup": args.warmup, "reps": args.reps}
    deployed = dynaconv.deploy(net, example_input=x[:8])
    fns = {name: forward_fn(m, x) for name, m in [("plain", plain), ("deployed", deployed)]}
    fns["live"] = forward_fn(net, x)
    ms = measure_interleaved(fns, device, **timing)
    case = f"DyDenseNet-86 batch {batch}"
    return [
        Row(case, "deployed", "eval forward", ms["deployed"], ms["plain"], bar=1.5),
        Row(case, "DGC layers, eval (auto)", "eval forward", ms["live"], ms["plain"]),
    ]


def main() -> None:
    args = common_args(__doc__.splitlines()[0])
    device, dtype = args.device, torch.float32
    batch = args.batch or (4 if args.quick else 64)
    rows = layer_rows(args, device, batch)
    net_batch = 8 if args.quick else 256
    rows += network_rows(args, device, net_batch)
    report(f"DGC, 4 heads, 25% kept, batch {batch}", rows, device, dtype, args.json)


if __name__ == "__main__":
    main()

"""Learned group convolution (CondenseNet): deployed index layer against the masked layer.

Bars (issue: CondenseNet): the deployed LGC layer (512->128 1x1, 14x14, batch 64, G=C=4) at
most 0.7x the masked layer's latency on GPU and 0.5x on CPU; the deployed CondenseNet-86 at
batch 256 (32x32) at most 0.8x the masked model on GPU and 0.5x on CPU. The baseline is the
masked training form in eval mode: BN-ReLU-conv with the mask multiplied into the weight.

Expected gain, written before measuring:

* layer, GPU: the masked layer makes three passes over the 512-channel input (BN, ReLU, conv
  reading it) plus a dense 1x1 conv with 4x the needed MACs; the fused kernel reads each kept
  input once through the index, applies the folded BN-ReLU in registers and writes the 128
  outputs in their final order: about a third of the memory traffic, so ~0.3-0.4x.
* layer, CPU (PyTorch path: index_select, folded BN-ReLU, grouped conv, shuffle): the conv
  dominates and has 4x fewer MACs; ~0.3-0.45x.
* CondenseNet-86, GPU: per dense layer the masked model runs BN, ReLU, 1x1 conv, BN, ReLU,
  3x3 conv and a growing ``torch.cat``; the deployed one runs the fused kernel (BN-ReLU,
  gather, grouped 1x1, next BN-ReLU), the 3x3 conv and a copy of the new channels into the
  block buffer: ~0.5-0.65x.
* CondenseNet-86, CPU: the 1x1 convs lose 3/4 of their MACs, BN/ReLU/cat passes shrink;
  ~0.4-0.5x.

Also reported (no bar): the reference's converted form (gather, BN, ReLU, grouped conv,
shuffle as separate ops) and, on GPU, the deployed form forced onto the PyTorch path.
"""

from __future__ import annotations

import torch
from torch import nn

import dynaconv
from dynaconv.layers.lgc.layer import CondensedGroupConv2d, LearnedGroupConv2d
from dynaconv.models import create_model
from dynaconv.models.condensenet import deploy_condensenet
from harness import Row, common_args, forward_fn, measure, report


def _trained_bn(norm: nn.BatchNorm2d) -> nn.BatchNorm2d:
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_(0, 0.1)
        norm.running_mean.normal_(0, 0.1)
        norm.running_var.uniform_(0.5, 1.5)
    return norm


class ReferenceConverted(nn.Module):
    """The reference's converted layer: index_select, BN, ReLU, grouped conv, shuffle."""

    def __init__(self, layer: LearnedGroupConv2d, norm: nn.BatchNorm2d) -> None:
        super().__init__()
        plain = CondensedGroupConv2d.from_learned(layer, impl="torch")
        self.register_buffer("index", plain.index)
        self.norm = nn.BatchNorm2d(plain.index.numel()).to(layer.dense_weight.device).eval()
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(self.norm, name).copy_(getattr(norm, name)[plain.index])
        self.conv = plain
        self.groups = layer.learned_groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(x.index_select(1, self.index)))
        y = nn.functional.conv2d(x, self.conv.weight, None, groups=self.groups)
        b, c, h, w = y.shape
        return y.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def layer_rows(args, device) -> list[Row]:
    batch = args.batch or (4 if args.quick else 64)
    torch.manual_seed(0)
    norm = _trained_bn(nn.BatchNorm2d(512)).to(device).eval()
    layer = LearnedGroupConv2d(512, 128, 1, bias=False, learned_groups=4).to(device)
    layer.set_progress(1.0)
    masked = nn.Sequential(norm, nn.ReLU(), layer).eval()
    x = torch.randn(batch, 512, 14, 14, device=device)
    on_gpu = device.type == "cuda"
    base = measure(forward_fn(masked, x), device, args.warmup, args.reps)
    deployed = CondensedGroupConv2d.from_learned(layer, pre_norm=norm, pre_relu=True).eval()
    with torch.inference_mode():
        error = (deployed(x) - masked(x)).abs().max() / masked(x).abs().max()
    case = f"LGC 512->128 1x1 14x14 b{batch} G=C=4"
    fast = measure(forward_fn(deployed, x), device, args.warmup, args.reps)
    path = "Triton fused" if on_gpu and deployed._use_triton(x) else "PyTorch"
    rows = [
        Row(
            case,
            f"deployed ({path})",
            "forward",
            fast.median_ms,
            base.median_ms,
            bar=0.7 if on_gpu else 0.5,
            notes=f"max rel err {float(error):.1e}",
        )
    ]
    if on_gpu:
        torch_path = CondensedGroupConv2d.from_learned(
            layer, pre_norm=norm, pre_relu=True, impl="torch"
        ).eval()
        t = measure(forward_fn(torch_path, x), device, args.warmup, args.reps)
        rows.append(Row(case, "deployed (PyTorch path)", "forward", t.median_ms, base.median_ms))
    reference = ReferenceConverted(layer, norm).eval()
    t = measure(forward_fn(reference, x), device, args.warmup, args.reps)
    rows.append(Row(case, "reference converted form", "forward", t.median_ms, base.median_ms))
    return rows


def network_rows(args, device) -> list[Row]:
    batch = args.batch or (8 if args.quick else 256)
    torch.manual_seed(0)
    model = create_model("condensenet86").to(device)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            _trained_bn(module)
    dynaconv.set_progress(model, 1.0)
    model.eval()
    x = torch.randn(batch, 3, 32, 32, device=device)
    on_gpu = device.type == "cuda"
    reps = max(3, args.reps // (1 if on_gpu else 2))
    base = measure(forward_fn(model, x), device, args.warmup, reps)
    deployed = deploy_condensenet(model).eval()
    with torch.inference_mode():
        expected = model(x)
        error = (deployed(x) - expected).abs().max() / expected.abs().max()
    fast = measure(forward_fn(deployed, x), device, args.warmup, reps)
    case = f"CondenseNet-86 b{batch} 32x32"
    rows = [
        Row(
            case,
            "deployed",
            "forward",
            fast.median_ms,
            base.median_ms,
            bar=0.8 if on_gpu else 0.5,
            notes=f"max rel err {float(error):.1e}",
        )
    ]
    if on_gpu:
        torch_path = deploy_condensenet(model, impl="torch").eval()
        t = measure(forward_fn(torch_path, x), device, args.warmup, reps)
        rows.append(Row(case, "deployed (PyTorch path)", "forward", t.median_ms, base.median_ms))
    return rows


def main() -> None:
    args = common_args(__doc__.splitlines()[0])
    device = args.device
    rows = layer_rows(args, device) + network_rows(args, device)
    report("Learned group convolution (CondenseNet)", rows, device, torch.float32, args.json)


if __name__ == "__main__":
    main()

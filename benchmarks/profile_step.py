"""Where does a layer's training step spend its time? torch.profiler per-op table.

Usage: ``python benchmarks/profile_step.py --method doconv --channels 256 --size 14``.
Prints the host (CPU) time per step and the top device kernels, for the plain conv and the
converted layer, so launch overhead and slow kernels can be told apart.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import dynaconv
from harness import synchronize, train_step_fn


def host_ms(fn, device, n=50) -> float:
    for _ in range(5):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) * 1e3 / n
    synchronize(device)
    return host


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", action="append", required=True)
    parser.add_argument("--channels", type=int, default=256)
    parser.add_argument("--size", type=int, default=14)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--option", action="append", default=[], help="key=value layer option")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    options = {k: eval(v) for k, v in (o.split("=", 1) for o in args.option)}
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=device)
    plain = nn.Conv2d(args.channels, args.channels, 3, padding=1, bias=False).to(device)
    models = {"plain": plain}
    for method in args.method:
        models[method] = dynaconv.convert(nn.Sequential(plain), method, **options).to(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, model in models.items():
        step = train_step_fn(model.train(), x)
        print(f"### {name}: host time per step {host_ms(step, device):.3f} ms", flush=True)
        with profile(activities=activities) as prof:
            for _ in range(10):
                step()
            synchronize(device)
        sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
        print(
            prof.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=60),
            flush=True,
        )


if __name__ == "__main__":
    main()

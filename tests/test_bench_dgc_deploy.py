"""benchmarks/bench_dgc_deploy.py: its limit proxy and its CPU-time measurement."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import dynaconv

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_dgc_deploy  # noqa: E402


def test_limit_proxy_network_does_the_kept_macs_with_the_same_shapes():
    torch.manual_seed(0)
    network = torch.nn.Sequential(
        dynaconv.DynamicGroupConv2d(8, 12, 3, padding=1, heads=4, gate_factor=0.5),
        torch.nn.ReLU(),
        dynaconv.DynamicGroupConv2d(12, 8, 1, stride=2, heads=2, gate_factor=0.25),
    ).eval()
    dynaconv.set_progress(network, 1.0)
    proxy = bench_dgc_deploy.limit_proxy_network(network)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        assert proxy(x).shape == network(x).shape
    convs = [m.conv for m in proxy.modules() if isinstance(m, bench_dgc_deploy.LimitProxy)]
    assert [(c.in_channels, c.groups) for c in convs] == [(4 * 4, 4), (2 * 3, 2)]
    deployed = dynaconv.deploy(network)
    for conv, layer in zip(convs, deployed[::2]):
        # the conv's MACs per output position: Cout * (h*K / h) * kh * kw = the kept work
        assert conv.weight[0].numel() == layer.kept * layer.spec.kernel_numel


@pytest.mark.usefixtures("one_thread")
def test_cpu_time_measurement_ranks_more_work_as_slower():
    # One torch thread, as the benchmark runs: with more, the matmul's work runs partly on
    # pool threads whose CPU time this thread's clock does not see. 512x the work apart.
    small, large = torch.randn(32, 32), torch.randn(256, 256)
    ms = bench_dgc_deploy.measure_cpu_time(
        {"small": lambda: small @ small, "large": lambda: large @ large}, warmup=1, reps=5
    )
    assert 0 < ms["small"] < ms["large"]

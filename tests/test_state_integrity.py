"""State integrity: one source of truth for every layer's state and learned structure.

* DGC: for every way of changing the schedule buffer ``inactive_channels`` (``set_progress``,
  ``load_state_dict``, ``functional_call``, an in-place write, an EMA update, ``deepcopy``, a
  safetensors round trip) every execution path computes the masked dense reference with the
  buffer's count, in float64; so do the counts, the description and ``deploy()``; traced
  graphs do not specialise on the count.
* Every family and every deployed module: after its state is changed in any of these ways
  (after a first forward, so that any cache is filled), its output is that of a fresh module
  loaded with the new state.
* EMA: the averaged model's learned structure is always the model's, for every family.
* A training run: the reported validation accuracy is what evaluating ``best.pt`` gives, and
  a run killed after its first epoch and resumed reports the EMA metrics of an uninterrupted
  run.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.func import functional_call

import dynaconv
from conftest import assert_close64
from dynaconv.layers.condconv.layer import CondConv2d
from dynaconv.layers.dgc.layer import DynamicGroupConv2d, inactive_channels_at
from dynaconv.layers.dgconv.layer import GroupableConv2d, PermutedGroupConv2d
from dynaconv.layers.doconv.layer import DOConv2d
from dynaconv.layers.lgc.layer import CondensedGroupConv2d, LearnedGroupConv2d
from dynaconv.spec import ConvSpec
from dynaconv.train.ema import ModelEMA

SRC = Path(__file__).resolve().parents[1] / "src"


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ DGC
def dgc_reference(layer: DynamicGroupConv2d, x: Tensor, inactive: int) -> Tensor:
    """The masked dense form written out head by head (zero padding), independent of the
    library's paths: zero every saliency ``<=`` the ``inactive``-th smallest of its example and
    head, scale the input channels by the rest, convolve, interleave the heads' outputs."""
    heads = layer.heads
    pooled = x.mean(dim=(2, 3))
    if layer.saliency_mode == "neutral":  # the descriptor at unit RMS over the channels
        pooled = pooled / pooled.square().mean(dim=1, keepdim=True).sqrt()
    outputs = []
    for i in range(heads):
        hidden = torch.relu(pooled @ layer.fc1_weight[i].T)
        g = torch.relu(hidden @ layer.fc2_weight[i].T + layer.fc2_bias[i])
        if inactive:
            threshold = g.sort(dim=1).values[:, inactive - 1 : inactive]
            g = torch.where(g <= threshold, torch.zeros_like(g), g)
        outputs.append(
            F.conv2d(
                x * g[:, :, None, None],
                layer.weight[i::heads],
                None,
                layer.stride,
                layer.padding,
                layer.dilation,
            )
        )
    out = torch.stack(outputs, dim=2).flatten(1, 2)  # channel j*h + i from head i
    return out if layer.bias is None else out + layer.bias[:, None, None]


dgc_configs = st.fixed_dictionaries(
    {
        "cin": st.integers(4, 10),
        "cout_per_head": st.integers(1, 3),
        "heads": st.sampled_from([1, 2]),
        "kernel": st.sampled_from([1, 3]),
        "stride": st.integers(1, 2),
        "bias": st.booleans(),
        "batch": st.integers(1, 3),
        "seed": st.integers(0, 2**16),
        "mode": st.sampled_from(["reference", "neutral"]),
    }
)


def make_dgc(cfg: dict) -> DynamicGroupConv2d:
    torch.manual_seed(cfg["seed"])
    layer = DynamicGroupConv2d(
        cfg["cin"],
        cfg["cout_per_head"] * cfg["heads"],
        cfg["kernel"],
        stride=cfg["stride"],
        padding=cfg["kernel"] // 2,
        bias=cfg["bias"],
        heads=cfg["heads"],
        squeeze_rate=2,
        dtype=torch.float64,
        saliency_mode=cfg.get("mode", "reference"),
    )
    with torch.no_grad():  # saliencies far apart and input-dependent (also when neutral)
        layer.fc2_weight.normal_()
        layer.fc2_bias.normal_()
    return layer


#: Each way returns ``(run, module)``: ``run(x)`` is the changed layer's forward and ``module``
#: the module whose parameters it uses (the EMA's own for an EMA update).
Way = Callable[[DynamicGroupConv2d, int, dict, Path], tuple[Callable[[Tensor], Tensor], nn.Module]]


def _progress_for(count: int) -> float:
    """The start of the schedule for a count of 0, else its end."""
    return 0.0 if count == 0 else 1.0


def _set_progress(layer, count, cfg, tmp):
    layer.set_progress(_progress_for(count))
    return layer, layer


def _load_state_dict(layer, count, cfg, tmp):
    donor = copy.deepcopy(layer)
    donor.set_inactive_channels(count)
    layer.load_state_dict(donor.state_dict())
    return layer, layer


def _functional_call(layer, count, cfg, tmp):
    buffer = {"inactive_channels": torch.tensor(count)}
    return (lambda x: functional_call(layer, buffer, (x,))), layer


def _in_place(layer, count, cfg, tmp):
    layer.inactive_channels.fill_(count)
    return layer, layer


def _ema_update(layer, count, cfg, tmp):
    ema = ModelEMA(layer, 0.5)  # made while the layer has its first count
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.mul_(1.5)  # so that the EMA's parameters are an average, not a copy
    layer.set_inactive_channels(count)
    ema.update(layer)
    ema.module.train(layer.training)
    return ema.module, ema.module


def _deepcopy(layer, count, cfg, tmp):
    layer.inactive_channels.fill_(count)
    clone = copy.deepcopy(layer)
    return clone, clone


def _safetensors(layer, count, cfg, tmp):
    donor = copy.deepcopy(layer)
    donor.inactive_channels.fill_(count)
    path = tmp / "layer.safetensors"
    save_file({k: v.contiguous() for k, v in donor.state_dict().items()}, str(path))
    fresh = make_dgc(cfg).train(layer.training)
    fresh.load_state_dict(load_file(str(path)))
    return fresh, fresh


WAYS: dict[str, Way] = {
    "set_progress": _set_progress,
    "load_state_dict": _load_state_dict,
    "functional_call": _functional_call,
    "in_place": _in_place,
    "ema_update": _ema_update,
    "deepcopy": _deepcopy,
    "safetensors": _safetensors,
}


def _expected_count(way: str, count: int, cfg: dict, layer: DynamicGroupConv2d) -> int:
    if way == "set_progress":
        return inactive_channels_at(_progress_for(count), cfg["cin"], layer.gate_factor)
    return count


def _check_dgc_after_change(cfg, way, first, count, training, impls, tmp, warm=True):
    layer = make_dgc(cfg).train(training)
    x = torch.rand(cfg["batch"], cfg["cin"], 5, 4, dtype=torch.float64)
    layer.set_inactive_channels(first)
    for impl in impls if warm else ():  # a forward in every path at the first count
        layer.impl = impl
        layer(x)
    run, module = WAYS[way](layer, count, cfg, tmp)
    count = _expected_count(way, count, cfg, layer)
    expected = dgc_reference(module, x, count)
    for impl in impls:
        module.impl = impl
        assert_close64(run(x), expected, rtol=1e-11, atol=1e-12)
    if way == "functional_call":  # the layer's own buffer is untouched
        assert int(layer.inactive_channels) == first
        return
    cin = cfg["cin"]
    assert int(module.inactive_channels) == count
    assert module.kept_channels == cin - count
    assert f"{cin - count}/{cin} channels kept" in module.structure()
    assert f"inactive={count}" in module.extra_repr()
    out_shape = expected.shape
    dense, active = module.count_macs(x.shape, out_shape)
    fcs = module._saliency_macs(cfg["batch"])
    assert active - fcs == (dense - fcs) // cin * (cin - count)
    deployed = module.deploy()
    assert deployed.kept == cin - count
    with torch.no_grad():
        assert_close64(deployed(x), expected, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("way", list(WAYS))
@given(cfg=dgc_configs, data=st.data())
def test_dgc_every_path_reads_the_buffer(way, cfg, data, tmp_path_factory):
    cin = cfg["cin"]
    first = data.draw(st.integers(0, cin - 1), label="first count")
    count = data.draw(st.integers(0, cin - 1), label="new count")
    training = data.draw(st.booleans(), label="training")
    tmp = tmp_path_factory.mktemp("dgc")
    _check_dgc_after_change(
        cfg, way, first, count, training, ["dense", "sparse", "grouped", "auto"], tmp
    )


@pytest.mark.parametrize("way", list(WAYS))
def test_dgc_triton_path_reads_the_buffer(way, tmp_path):
    pytest.importorskip("triton")
    if not dynaconv.kernels.triton_usable(torch.zeros(1)):
        pytest.skip("Triton cannot run on CPU tensors here (no interpreter)")
    cfg = {"cin": 6, "cout_per_head": 2, "heads": 2, "kernel": 3, "stride": 1}
    cfg |= {"bias": True, "batch": 2, "seed": sorted(WAYS).index(way)}
    # One kernel call per way (the interpreter is slow): a stale copy of the count needs no
    # earlier forward to show.
    _check_dgc_after_change(cfg, way, 1, 4, False, ["triton"], tmp_path, warm=False)


def test_dgc_traced_graph_takes_the_count_as_a_tensor():
    """An exported layer (not deployed) follows its buffer: nothing specialised on the count."""
    cfg = {"cin": 8, "cout_per_head": 2, "heads": 2, "kernel": 3, "stride": 1}
    layer = make_dgc(cfg | {"bias": True, "batch": 2, "seed": 5}).eval()
    layer.set_inactive_channels(2)
    x = torch.rand(2, 8, 5, 5, dtype=torch.float64)
    program = torch.export.export(layer, (x,)).module()
    with torch.no_grad():
        for count in (2, 6, 0):
            program.inactive_channels.fill_(count)
            assert_close64(program(x), dgc_reference(layer, x, count), rtol=1e-11, atol=1e-12)


@pytest.mark.slow
def test_dgc_compiled_layer_follows_buffer_writes():
    cfg = {"cin": 8, "cout_per_head": 2, "heads": 2, "kernel": 3, "stride": 1}
    layer = make_dgc(cfg | {"bias": False, "batch": 2, "seed": 6}).eval()
    compiled = torch.compile(layer)
    x = torch.rand(2, 8, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        for count in (1, 5, 0, 7):
            layer.inactive_channels.fill_(count)
            assert_close64(compiled(x), dgc_reference(layer, x, count), rtol=1e-11, atol=1e-12)


def test_dgc_buffer_out_of_range_is_a_clear_error():
    cfg = {"cin": 6, "cout_per_head": 1, "heads": 2, "kernel": 1, "stride": 1}
    layer = make_dgc(cfg | {"bias": False, "batch": 1, "seed": 0})
    layer.inactive_channels.fill_(6)
    layer.impl = "sparse"
    with pytest.raises(
        ValueError,
        match=r"inactive_channels must be an int in \[0, in_channels\) = \[0, 6\), got 6",
    ):
        layer(torch.rand(1, 6, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"inactive_channels must be .*, got 6"):
        _ = layer.kept_channels


# ------------------------------------------------------------------------------ every family
def _doconv():
    return DOConv2d(4, 6, 3, padding=1, dtype=torch.float64)


def _condconv():
    return CondConv2d(4, 6, 3, padding=1, num_experts=3, dtype=torch.float64)


def _dgc():
    layer = DynamicGroupConv2d(8, 4, 3, padding=1, heads=2, squeeze_rate=2, dtype=torch.float64)
    with torch.no_grad():
        layer.fc2_bias.normal_()
    return layer


def _dgconv():
    return GroupableConv2d(8, 8, 3, padding=1, dtype=torch.float64)


def _lgc():
    return LearnedGroupConv2d(8, 4, 1, learned_groups=2, condense_factor=2, dtype=torch.float64)


def _sparse_dgc():
    layer = _dgc()
    layer.set_progress(1.0)
    return layer.deploy()


def _permuted_group_conv():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2, dtype=torch.float64)
    return PermutedGroupConv2d(conv, torch.randperm(8))


def _condensed_group_conv():
    """A deployed LGC (folded BN-ReLU before it); its index and scales are redrawn by the
    donor: an identity gather and positive scales here, neither in a redrawn state."""
    return CondensedGroupConv2d(
        8,
        ConvSpec.create(8, 4, 1, groups=2),
        torch.arange(8),
        torch.randn(4, 4, 1, 1, dtype=torch.float64),
        torch.randn(4, dtype=torch.float64),
        learned_groups=2,
        in_scale=torch.rand(8, dtype=torch.float64) + 0.5,
        in_shift=torch.randn(8, dtype=torch.float64),
        in_relu=True,
    )


#: Family -> a factory of modules of one structure.
MODULES: dict[str, Callable[[], nn.Module]] = {
    "doconv": _doconv,
    "condconv": _condconv,
    "dgc": _dgc,
    "dgconv": _dgconv,
    "lgc": _lgc,
    "deployed_dgc": _sparse_dgc,
    "deployed_dgconv": _permuted_group_conv,
    "deployed_lgc": _condensed_group_conv,
}


def _redraw(module: nn.Module) -> dict[str, Tensor]:
    """Another state of the same structure (learned structure included)."""
    state = {}
    for name, value in module.state_dict().items():
        if name in ("index", "order"):
            value = torch.randperm(value.numel())
        elif name == "mask":  # stage 1 of 1: each group keeps in_channels / 2 columns
            groups, cin = module.learned_groups, value.shape[1]
            rows = torch.zeros(groups, cin, dtype=torch.bool)
            for group in range(groups):
                rows[group, torch.randperm(cin)[: cin // 2]] = True
            value = rows.repeat(value.shape[0] // groups, 1)  # rows g::G are group g
        elif name in ("stage", "inactive_channels"):
            value = value + 1
        elif value.is_floating_point():
            value = torch.randn_like(value)
            if name == "in_scale":  # negative scales: the folded ReLU clamps from above
                value = value.abs() * torch.where(torch.arange(value.numel()) % 2 == 0, 1, -1)
        state[name] = value
    return state


def _permuted_reference(state: dict[str, Tensor], x: Tensor) -> Tensor:
    """The deployed DGConv written out: ``conv(x[:, order])[:, argsort(order)]``."""
    order = state["order"]
    out = F.conv2d(x[:, order], state["conv.weight"], state["conv.bias"], padding=1, groups=2)
    return out[:, torch.argsort(order)]


def _fresh_output(family, factory, state, x):
    if family == "deployed_dgconv":
        return _permuted_reference(state, x)
    fresh = factory()
    fresh.load_state_dict(state)
    fresh.eval()
    with torch.no_grad():
        return fresh(x)


def _change(way: str, module: nn.Module, state: dict[str, Tensor], factory, tmp: Path):
    if way == "load_state_dict":
        module.load_state_dict(state)
        return module
    if way == "functional_call":
        return lambda x: functional_call(module, state, (x,))
    if way == "in_place":
        with torch.no_grad():
            for name, value in module.state_dict(keep_vars=True).items():
                value.copy_(state[name])
        return module
    if way == "deepcopy":
        module.load_state_dict(state)
        return copy.deepcopy(module)
    if way == "safetensors":
        path = tmp / "state.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        fresh = factory().eval()
        fresh.load_state_dict(load_file(str(path)))
        return fresh
    raise AssertionError(way)


@pytest.mark.parametrize("family", list(MODULES))
@pytest.mark.parametrize(
    "way", ["load_state_dict", "functional_call", "in_place", "deepcopy", "safetensors"]
)
@settings(max_examples=5)
@given(seed=st.integers(0, 2**16))
def test_every_module_computes_what_its_state_says(family, way, seed, tmp_path_factory):
    torch.manual_seed(seed)
    factory = MODULES[family]
    module = factory().eval()
    cin = next(m for m in module.modules() if hasattr(m, "in_channels")).in_channels
    x = torch.rand(2, cin, 5, 5, dtype=torch.float64)
    with torch.no_grad():
        module(x)  # fills any cache from the first state
    state = _redraw(module)
    expected = _fresh_output(family, factory, state, x)
    changed = _change(way, module, state, factory, tmp_path_factory.mktemp(family))
    with torch.no_grad():
        assert_close64(changed(x), expected, rtol=1e-11, atol=1e-12)


# ------------------------------------------------------------------------------ EMA
class _Net(nn.Module):
    """Three 3x3 convs of 8 channels (DGConv needs 2^K), a pool and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
        )
        self.head = nn.Linear(8, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(self.stem(x)).mean(dim=(2, 3)))


def _structure(model: nn.Module) -> dict[str, object]:
    """Every layer's learned structure: its description, groups, masks, stages, counts."""
    found: dict[str, object] = {}
    for name, layer in dynaconv.dynaconv_layers(model):
        found[f"{name}.structure"] = layer.structure()
        if isinstance(layer, GroupableConv2d):
            found[f"{name}.groups"] = layer.num_groups
            found[f"{name}.mask"] = layer.mask().detach().tolist()
        for buffer_name in ("mask", "stage", "inactive_channels"):
            if hasattr(layer, buffer_name) and isinstance(getattr(layer, buffer_name), Tensor):
                found[f"{name}.{buffer_name}"] = getattr(layer, buffer_name).tolist()
    return found


@pytest.mark.parametrize("method", list(dynaconv.METHODS))
@settings(max_examples=3)
@given(seed=st.integers(0, 2**16))
def test_ema_structure_is_the_models(method, seed):
    torch.manual_seed(seed)
    model = dynaconv.convert(_Net(), method)
    ema = ModelEMA(model, 0.9)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, labels = torch.randn(4, 3, 6, 6), torch.randint(0, 4, (4,))
    layers = [layer for _, layer in dynaconv.dynaconv_layers(model)]
    signs = [torch.randn(layer.gate.shape).sign() for layer in layers if hasattr(layer, "gate")]
    for step in range(5):
        dynaconv.set_progress(model, step / 4)
        loss = F.cross_entropy(model(x), labels) + 1e-3 * dynaconv.aux_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if method == "dgconv":  # the learned groups settle, then change: the gates flip
            with torch.no_grad():
                for sign, layer in zip(signs, layers, strict=True):
                    layer.gate.copy_(sign if step < 3 else -sign)
        ema.update(model)
        assert _structure(ema.module) == _structure(model), f"after update {step + 1}"
    with torch.no_grad():
        model.eval()
        ema.module(x)  # the EMA runs with its structure


# ------------------------------------------------------------------------------ a training run
def _dgc_run_args(out: Path) -> list[str]:
    return [
        "train",
        "--recipe",
        "digits-small",
        "--epochs",
        "2",
        "--out",
        str(out),
        "--convert",
        "dgc",
        "--ema",
        "0.8",
        "--deterministic",
        "--checkpoint-every",
        "3",
        "--set",
        "data.train_subset=640",
        "--set",
        "model.kwargs.width=16",
        "--set",
        "train.plots=false",
        "--set",
        "train.tensorboard=false",
    ]


def _history(checkpoint: Path) -> list[dict]:
    from dynaconv.train.checkpoint import load_checkpoint

    rows = load_checkpoint(checkpoint)["state"]["history"]
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


def _kill_during_second_epoch(out: Path) -> None:
    from dynaconv.train.checkpoint import load_checkpoint

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    process = subprocess.Popen(
        [sys.executable, "-m", "dynaconv", *_dgc_run_args(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    seen = None
    try:
        while True:
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no second-epoch checkpoint in time"
            path = out / "last.pt"
            stamp = path.stat().st_mtime_ns if path.exists() else None
            if stamp is not None and stamp != seen:
                seen = stamp
                state = load_checkpoint(path)["state"]
                if state["epoch"] == 1 and state["batches_done"] > 0:
                    break
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()


def test_dgc_run_reports_what_eval_computes_and_resumes_exactly(tmp_path, capsys):
    """A DGC run with an EMA: the accuracy the run reports (and picks best.pt by) is what
    ``dynaconv eval`` computes on best.pt; a run killed in its second epoch and resumed
    reports the same metrics, EMA included, as the uninterrupted run."""
    from dynaconv.cli import main

    killed = tmp_path / "killed"
    _kill_during_second_epoch(killed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the killed process: sums round alike
    try:
        straight = tmp_path / "straight"
        assert main(_dgc_run_args(straight)) == 0
        assert main(["train", "--resume", str(killed / "last.pt")]) == 0
        capsys.readouterr()
        assert main(["eval", str(straight / "best.pt")]) == 0
        evaluated = json.loads(capsys.readouterr().out)
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((straight / "summary.json").read_text())
    history = _history(straight / "last.pt")
    assert [row["epoch"] for row in history] == [1, 2]
    assert summary["best_val_acc"] == max(row["ema_val_acc"] for row in history)
    assert evaluated["accuracy"] == pytest.approx(summary["best_val_acc"], abs=1e-12)
    assert _history(killed / "last.pt") == history

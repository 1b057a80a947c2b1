"""The evidence scripts in ``benchmarks/`` (accuracy study, DO-Conv demo, CPU deployment speed).

Each tool runs end to end on a tiny setting: a few training steps on a Fashion-MNIST subset
(skipped when Debian's ``dataset-fashion-mnist`` is not installed), or a small network for the
deployment benchmark. The checks are on the structure of what they report and on the
prediction-equality check that every deployment must pass, not on the numbers.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import dynaconv

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import accuracy  # noqa: E402
import bench_deploy_cpu  # noqa: E402
import doconv_fashion  # noqa: E402
import evidence_common  # noqa: E402

FASHION = evidence_common.DEFAULT_FASHION_DIR
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").is_file()
    and not (FASHION / "train-images-idx3-ubyte").is_file(),
    reason=f"Fashion-MNIST not installed at {FASHION} (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture
def one_thread():
    """Run single-threaded (tiny models train faster so on a shared CPU); restore afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as handle:
        return list(csv.reader(handle))


# --------------------------------------------------------------------------------------------
# shared helpers


def test_random_shift_is_a_padded_crop_of_each_image():
    generator = torch.Generator().manual_seed(3)
    images = torch.randn(16, 2, 7, 9, generator=generator)
    fill, pad = -0.8, 2
    shifted = evidence_common.random_shift(images, pad, generator, fill)
    assert shifted.shape == images.shape
    padded = torch.nn.functional.pad(images, (pad,) * 4, value=fill)
    offsets_seen = set()
    for index in range(len(images)):
        matches = [
            (dy, dx)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            if torch.equal(shifted[index], padded[index, :, dy : dy + 7, dx : dx + 9])
        ]
        assert matches, f"image {index} is not a crop of its padded original"
        offsets_seen.update(matches)
    assert len(offsets_seen) > 1  # the offsets vary between images


def test_random_shift_without_padding_is_the_identity():
    images = torch.randn(4, 1, 5, 5)
    assert evidence_common.random_shift(images, 0, torch.Generator(), 0.0) is images


def test_mean_std_and_its_text():
    mean, std = evidence_common.mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert std == pytest.approx(1.5275252316519468)
    assert evidence_common.mean_std([5.0]) == (5.0, None)
    assert evidence_common.format_mean_std([0.9, 0.92], scale=100) == "91.00 ± 1.41"
    assert evidence_common.format_mean_std([0.9], scale=100) == "90.00"
    with pytest.raises(ValueError, match="at least one"):
        evidence_common.mean_std([])


def test_markdown_table_rejects_a_row_of_the_wrong_length():
    assert evidence_common.markdown_table(["a", "b"], [[1, 2]]).splitlines() == [
        "| a | b |",
        "|---|---|",
        "| 1 | 2 |",
    ]
    with pytest.raises(ValueError, match="expected 2"):
        evidence_common.markdown_table(["a", "b"], [[1]])


def test_cpu_model_is_read_at_run_time():
    text = evidence_common.cpu_model()
    assert isinstance(text, str) and text
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and "model name" in cpuinfo.read_text():
        assert text in cpuinfo.read_text()


def test_load_fashion_mnist_names_a_missing_folder(tmp_path):
    from dynaconv.train.data import DataError

    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        evidence_common.load_fashion_mnist(tmp_path, 10, 10)
    with pytest.raises(ValueError, match="train_subset"):
        evidence_common.load_fashion_mnist(tmp_path, 0, 10)


# --------------------------------------------------------------------------------------------
# accuracy study


@pytest.mark.parametrize("name", [n for n in accuracy.FAMILIES if n not in ("plain", "lgc-1x1")])
def test_every_family_converts_the_same_six_inner_convs(name):
    model, converted = accuracy.build_model(accuracy.FAMILIES[name], width=16, seed=0)
    assert converted == len(accuracy.FashionCNN.LAYOUT)
    assert isinstance(model.stem[0], nn.Conv2d)  # the stem stays plain
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_lgc_paper_placement_condenses_the_1x1_convs_and_groups_the_3x3_convs():
    model, converted = accuracy.build_model(accuracy.FAMILIES["lgc-1x1"], width=16, seed=0)
    assert converted == 3
    for block, (kernel, stride) in zip(model.body, accuracy.FashionCNN.LAYOUT, strict=True):
        conv = block[0]
        if kernel == 1:
            assert isinstance(conv, dynaconv.layers.LearnedGroupConv2d)
        else:
            assert type(conv) is nn.Conv2d and conv.groups == 4 and conv.stride == (stride,) * 2
    plain, _ = accuracy.build_model(accuracy.FAMILIES["plain"], width=16, seed=0)
    for kernel, ours, reference in zip(
        [k for k, _ in accuracy.FashionCNN.LAYOUT], model.body, plain.body, strict=True
    ):
        if kernel == 1:  # the converted convs start from the plain network's weights
            assert torch.equal(ours[0].dense_weight, reference[0].weight)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_budget_column_says_whether_every_seed_met_the_budget():
    family = accuracy.FAMILIES["dgconv"]
    met = [
        accuracy.Run("dgconv", 0, connections_kept=0.5, closest_under_budget=0.5),
        accuracy.Run("dgconv", 1, connections_kept=0.46, closest_under_budget=0.5),
    ]
    assert accuracy._budget_cell(family, met) == "50/46% of 50% (met)"
    missed = [*met, accuracy.Run("dgconv", 2, connections_kept=0.58, closest_under_budget=0.5)]
    assert accuracy._budget_cell(family, missed) == "50/46/58% of 50% (MISSED)"
    far = [accuracy.Run("dgconv", 0, connections_kept=0.29, closest_under_budget=0.5)]
    assert accuracy._budget_cell(family, far).endswith("(MISSED)")
    unreachable = [accuracy.Run("dgconv", 0, connections_kept=0.6, closest_under_budget=0.6)]
    assert accuracy._budget_cell(family, unreachable).endswith("(met)")
    assert accuracy._budget_cell(accuracy.FAMILIES["dgc"], met) == "-"


def test_merge_replaces_families_and_refuses_other_settings():
    def payload(width: int, entries: list[tuple[str, int, float]]) -> dict:
        runs = [dataclasses.asdict(_run(name, seed, acc, 0)) for name, seed, acc in entries]
        return {"settings": {"width": width}, "runs": runs}

    first = payload(32, [("plain", 0, 0.9), ("dgconv", 0, 0.8), ("lgc", 0, 0.85)])
    second = payload(32, [("dgconv", 0, 0.88), ("lgc-1x1", 0, 0.87)])
    families, runs = accuracy.merge_payloads([first, second])
    assert [f.name for f in families] == ["plain", "dgconv", "lgc-1x1", "lgc"]
    assert {(r.family, r.accuracy) for r in runs} == {
        ("plain", 0.9),
        ("dgconv", 0.88),
        ("lgc-1x1", 0.87),
        ("lgc", 0.85),
    }
    later_seed = payload(32, [("plain", 1, 0.91), ("dgconv", 1, 0.86)])
    _, runs = accuracy.merge_payloads([first, second, later_seed])
    assert sorted((r.family, r.seed) for r in runs if r.family in ("plain", "dgconv")) == [
        ("dgconv", 0),
        ("dgconv", 1),
        ("plain", 0),
        ("plain", 1),
    ]
    with pytest.raises(ValueError, match="different settings"):
        accuracy.merge_payloads([first, payload(64, [("plain", 0, 0.9)])])


def test_fashion_cnn_rejects_a_width_dgconv_cannot_take():
    with pytest.raises(ValueError, match="power of two"):
        accuracy.FashionCNN(width=24)


def test_every_family_starts_from_the_same_plain_weights():
    plain, _ = accuracy.build_model(accuracy.FAMILIES["plain"], 16, seed=5)
    doconv, _ = accuracy.build_model(accuracy.FAMILIES["doconv"], 16, seed=5)
    x = torch.randn(3, 1, 28, 28, dtype=torch.float64)
    plain, doconv = plain.double().eval(), doconv.double().eval()
    torch.testing.assert_close(doconv(x), plain(x), rtol=1e-9, atol=1e-12)


def _run(family: str, seed: int, accuracy_value: float, changed: int) -> accuracy.Run:
    return accuracy.Run(
        family,
        seed,
        accuracy=accuracy_value,
        accuracy_deployed=accuracy_value,
        changed=changed,
        params=100,
        params_deployed=50,
        macs=1000,
        macs_active=400 + seed,
    )


def test_summary_flags_a_deployment_that_changed_labels_and_a_missed_expectation():
    families = [accuracy.FAMILIES["plain"], accuracy.FAMILIES["dgc"]]
    runs = [
        _run("plain", 0, 0.90, 0),
        _run("plain", 1, 0.92, 0),
        _run("dgc", 0, 0.89, 0),
        _run("dgc", 1, 0.90, 3),
    ]
    rows, records = accuracy.summarise(families, runs, {"dgc": {1: 0.5, 256: 9.0}})
    assert all(len(row) == len(accuracy.HEADERS) for row in rows)
    column = {h: i for i, h in enumerate(accuracy.HEADERS)}
    plain_row, dgc_row = rows
    assert plain_row[column["deployed = same test labels"]] == "yes (2/2 seeds)"
    assert dgc_row[column["deployed = same test labels"]] == "NO: 1/2 seeds changed 3 labels"
    assert dgc_row[column["vs plain (points)"]] == "-1.50"
    assert dgc_row[column["holds"]] == "MISS"  # the paper expects DGC within 0.5 point
    assert dgc_row[column["MACs active"]] == "400 (400-401)"
    assert dgc_row[column["ms batch 1"]] == "0.500"
    assert records[1]["same_labels_all_seeds"] is False
    assert records[1]["changed_labels"] == [0, 3]


def test_changed_predictions_counts_the_differing_labels():
    before = torch.tensor([1, 2, 3, 4])
    assert accuracy.changed_predictions(before, torch.tensor([1, 2, 3, 4])) == 0
    assert accuracy.changed_predictions(before, torch.tensor([1, 0, 3, 0])) == 2
    with pytest.raises(ValueError, match="shapes differ"):
        accuracy.changed_predictions(before, before[:2])


@needs_fashion
def test_accuracy_study_end_to_end_on_a_subset(tmp_path, capsys, one_thread):
    code = accuracy.main(
        [
            "--epochs", "1",
            "--train-subset", "128",
            "--test-subset", "200",
            "--batch-size", "64",
            "--latency-batches", "1", "8",
            "--seeds", "2",
            "--width", "16",
            "--latency-reps", "1",
            "--latency-warmup", "1",
            "--out", str(tmp_path / "out"),
            "--plot-dir", str(tmp_path / "img"),
        ]
    )  # fmt: skip
    assert code == 0  # every run finished and every deployment kept every test label
    printed = capsys.readouterr().out
    columns = accuracy.headers((1, 8))
    assert "| " + " | ".join(columns) + " |" in printed
    table = read_csv(tmp_path / "out" / "accuracy.csv")
    assert table[0] == list(columns)
    assert [row[0] for row in table[1:]] == list(accuracy.FAMILIES)
    payload = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert len(payload["runs"]) == 2 * len(accuracy.FAMILIES)
    assert {r["seed"] for r in payload["runs"]} == {0, 1}
    for record in payload["summary"]:
        assert record["seeds"] == 2
        assert record["same_labels_all_seeds"] is True
        assert set(record["latency_ms"]) == {"1", "8"}
        assert all(ms > 0 for ms in record["latency_ms"].values())
    dgconv = [r for r in payload["runs"] if r["family"] == "dgconv"]
    assert all(0 < r["connections_kept"] <= 1 for r in dgconv)
    assert all("of the connections kept (budget 50%)" in r["structure"] for r in dgconv)
    runs = read_csv(tmp_path / "out" / "accuracy_runs.csv")
    assert len(runs) == 1 + 2 * len(accuracy.FAMILIES)
    assert (tmp_path / "img" / "accuracy_vs_macs.png").stat().st_size > 0


@pytest.mark.parametrize("name", list(accuracy.FAMILIES))
def test_saved_models_rebuild_the_same_trained_and_deployed_networks(tmp_path, name, one_thread):
    family = accuracy.FAMILIES[name]
    settings = accuracy.Settings(epochs=1, width=16)
    model, _ = accuracy.build_model(family, settings.width, seed=3)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for step in range(3):  # move every parameter and the schedules away from initialisation
        dynaconv.set_progress(model, (step + 1) / 3)
        x = torch.randn(8, 1, 28, 28, generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x), torch.arange(8) % 10)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    dynaconv.set_progress(model, 1.0)
    model.eval()
    example = torch.randn(16, 1, 28, 28, generator=generator)
    deployed = dynaconv.deploy(model, example_input=example)
    path = accuracy.save_models(tmp_path, family, 3, settings, model, deployed)
    assert path == tmp_path / f"{name}-seed3.pt"
    loaded_name, seed, trained, redeployed = accuracy.load_saved(path, example)
    assert (loaded_name, seed) == (name, 3)
    x = torch.randn(5, 1, 28, 28, generator=generator)
    # Bitwise equality needs both copies to run the same form: measured choices of
    # impl="auto" may differ between calls (a key's third call measures), the rule does not.
    with torch.no_grad(), dynaconv.dispatch.measuring(False):
        assert torch.equal(trained(x), model(x))
        assert torch.equal(redeployed(x), deployed(x))
    assert type(redeployed) is type(deployed)
    assert [type(m) for m in redeployed.modules()] == [type(m) for m in deployed.modules()]


def test_first_saved_takes_the_lowest_seed_of_each_family(tmp_path):
    for stem in ("dgc-seed10", "dgc-seed2", "plain-seed0", "plain-seed1"):
        (tmp_path / f"{stem}.pt").write_bytes(b"")
    families = [accuracy.FAMILIES[n] for n in ("plain", "dgc", "lgc")]
    assert accuracy.first_saved(tmp_path, families) == {
        "plain": tmp_path / "plain-seed0.pt",
        "dgc": tmp_path / "dgc-seed2.pt",
    }


def test_latency_from_an_empty_directory_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no saved models"):
        accuracy.main(["--latency-from", str(tmp_path), "--out", str(tmp_path / "out")])


@needs_fashion
def test_accuracy_without_latency_then_latency_from_saved_models(tmp_path, capsys, one_thread):
    common = ["--test-subset", "100", "--out", str(tmp_path / "out")]
    common += ["--plot-dir", str(tmp_path / "img"), "--families", "lgc", "dgconv"]
    code = accuracy.main(
        [
            *common,
            "--epochs", "1",
            "--train-subset", "64",
            "--batch-size", "32",
            "--seeds", "2",
            "--width", "16",
            "--no-latency",
            "--save-models", str(tmp_path / "models"),
        ]
    )  # fmt: skip
    assert code == 0
    names = ["plain", "lgc", "dgconv"]
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted(
        f"{n}-seed{s}.pt" for n in names for s in (0, 1)
    )
    column = {h: i for i, h in enumerate(accuracy.HEADERS)}
    table = read_csv(tmp_path / "out" / "accuracy.csv")
    for row in table[1:]:
        assert row[column["ms batch 1"]] == row[column["ms batch 256"]] == "not measured"
    trained = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert all(r["latency_ms"] is None for r in trained["summary"])
    capsys.readouterr()

    code = accuracy.main(
        [*common, "--latency-from", str(tmp_path / "models"), "--latency-reps", "1",
         "--latency-warmup", "1"]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "| family | seed | ms batch 1 | ms batch 256 |" in printed
    merged = read_csv(tmp_path / "out" / "accuracy.csv")
    assert [row[0] for row in merged[1:]] == names
    for before, after in zip(table[1:], merged[1:], strict=True):
        assert float(after[column["ms batch 1"]]) > 0 and float(after[column["ms batch 256"]]) > 0
        unchanged = [i for h, i in column.items() if not h.startswith("ms batch")]
        assert [after[i] for i in unchanged] == [before[i] for i in unchanged]
    payload = json.loads((tmp_path / "out" / "accuracy.json").read_text())
    assert payload["runs"] == trained["runs"]
    assert payload["latency"]["seeds"] == {n: 0 for n in names}
    assert all(set(r["latency_ms"]) == {"1", "256"} for r in payload["summary"])
    assert "latency: " in (tmp_path / "out" / "accuracy.md").read_text()


def test_expected_minutes_counts_every_family_seed_and_step():
    settings = accuracy.Settings(epochs=2, batch_size=100)
    # 2 epochs x 10 steps x 3 seeds x (0.1 + 0.2) s = 18 s
    assert accuracy.expected_minutes({"a": 0.1, "b": 0.2}, 1000, settings, 3) == pytest.approx(
        18 / 60
    )


@needs_fashion
def test_accuracy_time_only_prints_the_expected_total(capsys, one_thread):
    code = accuracy.main(
        [
            "--time-only",
            "--train-subset", "160",
            "--test-subset", "50",
            "--batch-size", "8",
            "--width", "16",
            "--families", "dgc",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "ms per training step: plain " in printed and ", dgc " in printed
    assert "expected training time of the whole study" in printed


# --------------------------------------------------------------------------------------------
# DO-Conv demo


def test_demo_pair_starts_as_the_same_function():
    models = doconv_fashion.build_pair(seed=2)
    x = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    plain, doconv = models["plain"].double(), models["doconv"].double()
    assert sum(1 for _ in dynaconv.dynaconv_layers(doconv)) == 3
    torch.testing.assert_close(doconv(x), plain(x), rtol=1e-9, atol=1e-12)
    assert plain(x).shape == (4, 10)


def test_demo_gap_is_the_paired_difference():
    results = [
        doconv_fashion.SeedResult(0, 90.0, 90.5, 0, [90.0], [90.5], 1.0, 1.2),
        doconv_fashion.SeedResult(1, 91.0, 90.9, 0, [91.0], [90.9], 1.0, 1.2),
        doconv_fashion.SeedResult(2, 89.0, 89.6, 2, [89.0], [89.6], 1.0, 1.2),
    ]
    seed_rows, summary_rows, record = doconv_fashion.tables(results)
    assert [row[3] for row in seed_rows] == ["+0.50", "-0.10", "+0.60"]
    assert seed_rows[2][4] == "NO (2 changed)"
    assert record["gap_mean"] == pytest.approx(1.0 / 3)
    assert record["gap_std"] == pytest.approx(0.3785938897, rel=1e-8)
    assert record["doconv_ahead_seeds"] == 2
    assert record["all_deployed_same_labels"] is False
    assert summary_rows[0][3].startswith("0.33 ± 0.38")


@needs_fashion
def test_doconv_demo_end_to_end_on_a_subset(tmp_path, capsys, one_thread):
    code = doconv_fashion.main(
        [
            "--epochs", "2",
            "--train-subset", "320",
            "--test-subset", "300",
            "--seeds", "2",
            "--out", str(tmp_path / "out"),
            "--plot-dir", str(tmp_path / "img"),
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "expected total" in printed
    assert "| " + " | ".join(doconv_fashion.SUMMARY_HEADERS) + " |" in printed
    table = read_csv(tmp_path / "out" / "doconv_fashion.csv")
    assert table[0] == list(doconv_fashion.SEED_HEADERS)
    assert [row[0] for row in table[1:]] == ["0", "1"]
    assert all(row[4] == "yes" for row in table[1:])
    payload = json.loads((tmp_path / "out" / "doconv_fashion.json").read_text())
    assert payload["summary"]["all_deployed_same_labels"] is True
    assert all(len(seed["plain_curve"]) == 2 for seed in payload["seeds"])
    assert (tmp_path / "img" / "doconv_fashion.png").stat().st_size > 0


@needs_fashion
def test_doconv_demo_time_only_prints_the_expected_total(capsys, one_thread):
    code = doconv_fashion.main(["--time-only", "--train-subset", "128", "--test-subset", "64"])
    assert code == 0
    assert "expected total for 5 seeds x 15 epochs" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# CPU deployment speed


def _small_network() -> nn.Module:
    def block(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 16),
        *block(16, 16),
        *block(16, 16, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


@pytest.mark.parametrize("method", ["dgc", "dgconv", "lgc", "condconv"])
def test_plain_counterpart_swaps_every_layer_for_a_conv_of_its_shape(method):
    converted = dynaconv.convert(_small_network(), method, exclude="0")
    dense = bench_deploy_cpu.plain_counterpart(converted)
    assert not list(dynaconv.dynaconv_layers(dense))
    layers = dict(dynaconv.dynaconv_layers(converted))
    for name, layer in layers.items():
        conv = dense.get_submodule(name)
        assert type(conv) is nn.Conv2d
        assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
        )
    assert dense(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert list(dynaconv.dynaconv_layers(converted))  # the original is untouched


@pytest.mark.parametrize("groups", [1, 2, 8, 64])
def test_set_dgconv_groups_gives_each_layer_that_many_groups(groups):
    model = dynaconv.convert(_small_network(), "dgconv", exclude="0")
    bench_deploy_cpu.set_dgconv_groups(model, groups)
    for _, layer in dynaconv.dynaconv_layers(model):
        assert layer.num_groups == min(groups, layer.in_channels)
        deployed = layer.deploy()
        assert type(deployed) is nn.Conv2d  # contiguous groups: no permutation
        assert deployed.groups == min(groups, layer.in_channels)
    with pytest.raises(ValueError, match="power of two"):
        bench_deploy_cpu.set_dgconv_groups(model, 3)


def test_calibrate_batchnorm_normalises_its_batch_at_every_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, eps=1e-12),
        nn.ReLU(),
        nn.Conv2d(4, 5, 1),
        nn.BatchNorm2d(5, eps=1e-12),
    ).double()
    batch = 3 + 2 * torch.randn(6, 3, 7, 7, dtype=torch.float64)
    bench_deploy_cpu.calibrate_batchnorm(model, batch)
    assert not model.training
    outputs = {}
    for index in (1, 4):
        model[index].register_forward_hook(lambda m, i, o, k=index: outputs.__setitem__(k, o))
    with torch.no_grad():
        model(batch)
    for out in outputs.values():  # weight 1, bias 0: mean 0 and variance 1 per channel
        torch.testing.assert_close(out.mean((0, 2, 3)), torch.zeros(out.shape[1], dtype=out.dtype))
        variance = out.var((0, 2, 3), unbiased=False)
        torch.testing.assert_close(variance, torch.ones_like(variance))


def test_calibrated_random_dyresnet18_stays_finite_and_deploys(one_thread):
    # Regression: with the initial BatchNorm statistics a random DyResNet-18 overflows in
    # eval mode at 64px (DGC's saliencies grow with their input), so deploy's check saw NaN.
    torch.manual_seed(0)
    model = dynaconv.models.dyresnet18(num_classes=10)
    dynaconv.set_progress(model, 1.0)
    images = torch.randn(
        bench_deploy_cpu.CALIBRATION_BATCH, 3, 64, 64, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        assert not torch.isfinite(model.eval()(images)).all()
    bench_deploy_cpu.calibrate_batchnorm(model, images)
    with torch.no_grad():
        assert torch.isfinite(model(images)).all()
        assert torch.isfinite(model(images[3:5])).all()  # eval mode: each image on its own
    dynaconv.deploy(model, example_input=images[:2])


def _small_case(method: str) -> bench_deploy_cpu.Case:
    def build(args) -> nn.Module:
        return dynaconv.convert(_small_network(), method, exclude="0")

    return bench_deploy_cpu.Case(
        f"small-{method}", build, bench_deploy_cpu.plain_counterpart, "plain convs", size=32
    )


def test_deploy_benchmark_reports_a_failing_network_and_goes_on():
    def broken(args) -> nn.Module:
        raise RuntimeError("cannot build")

    case = bench_deploy_cpu.Case("broken", broken, bench_deploy_cpu.plain_counterpart, "-", 32)
    args = bench_deploy_cpu.parse_args(["--runtimes", "eager", "--reps", "1"])
    result = bench_deploy_cpu.measure_case(case, args)
    assert result.error == "RuntimeError: cannot build"
    (row,) = bench_deploy_cpu.table_rows([result])
    assert row[3] == "FAILED: RuntimeError: cannot build"


def test_condensenet_verdict_says_whether_the_speed_up_holds():
    faster = bench_deploy_cpu.Result("condensenet86", "dense", 32)
    faster.ms = {1: {"dense eager": 10.0, "deployed eager": 5.0, "undeployed eager": 12.0}}
    slower = bench_deploy_cpu.Result("condensenet74-imagenet-g4", "dense", 128)
    slower.ms = {1: {"dense onnx": 2.0, "deployed onnx": 3.0}}
    other = bench_deploy_cpu.Result("dyresnet18", "dense", 128)
    other.ms = {1: {"dense eager": 1.0, "deployed eager": 2.0}}
    lines = bench_deploy_cpu.condensenet_verdict([faster, slower, other])
    assert len(lines) == 2
    assert "eager PyTorch 0.50x (faster)" in lines[0]
    assert "deployed / masked (undeployed) eager 0.42x" in lines[0]
    assert "onnxruntime 1.50x (NOT faster)" in lines[1]


def test_deploy_benchmark_times_every_variant_after_checking_onnx(
    tmp_path, capsys, monkeypatch, one_thread
):
    monkeypatch.setitem(bench_deploy_cpu.CASES, "small-lgc", _small_case("lgc"))
    code = bench_deploy_cpu.main(
        [
            "--only", "small-lgc",
            "--batches", "1", "3",
            "--reps", "1",
            "--warmup", "1",
            "--json", str(tmp_path / "deploy.json"),
            "--plot-dir", str(tmp_path),
        ]
    )  # fmt: skip
    assert code == 0  # built, deployed (verified), exported and checked in onnxruntime
    printed = capsys.readouterr().out
    assert "| " + " | ".join(bench_deploy_cpu.HEADERS) + " |" in printed
    assert "onnxruntime" in printed and evidence_common.cpu_model() in printed
    payload = json.loads((tmp_path / "deploy.json").read_text())
    assert payload["machine"]["cpu"] == evidence_common.cpu_model()
    (result,) = payload["results"]
    assert result["error"] == "" and result["notes"] == []
    assert set(result["ms"]) == {"1", "3"}
    variants = {"dense eager", "undeployed eager", "deployed eager", "dense onnx", "deployed onnx"}
    for ms in result["ms"].values():
        assert set(ms) == variants and all(value > 0 for value in ms.values())
    assert all(0 <= error <= 1e-4 for error in result["onnx_errors"].values())
    assert result["macs_active"] < result["macs_dense"]  # condensed to a quarter of the inputs
    table = [line for line in printed.splitlines() if line.startswith("| small-lgc |")]
    assert len(table) == 2 and all(
        line.count("|") == len(bench_deploy_cpu.HEADERS) + 1 for line in table
    )
    assert (tmp_path / "deploy_cpu_latency.png").stat().st_size > 0


def test_deploy_benchmark_only_measures_the_cpu(capsys):
    assert bench_deploy_cpu.main(["--device", "cuda"]) == 0
    assert "skipped" in capsys.readouterr().out


def test_every_listed_network_has_a_builder():
    expected = {
        "condensenet86",
        "condensenet74-imagenet-g4",
        "dydensenet86",
        "dyresnet18",
        "g-resnext50",
        "efficientnet-b0-condconv8",
        *(f"resnet18-{m}" for m in ("doconv", "condconv", "dgc", "dgconv", "lgc")),
    }
    assert set(bench_deploy_cpu.CASES) == expected


@pytest.mark.slow
def test_deploy_benchmark_quick_on_two_networks(tmp_path):
    code = bench_deploy_cpu.main(
        ["--quick", "--only", "condensenet86", "resnet18-dgconv", "--plot-dir", str(tmp_path)]
    )
    assert code == 0

"""DO-Conv networks exported: torch.export with a dynamic batch, ONNX run in onnxruntime."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dynaconv
from dynaconv.models import DigitsCNN


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = dynaconv.convert(DigitsCNN(), "doconv")
    for _, layer in dynaconv.dynaconv_layers(model):
        if layer.D is not None:
            nn.init.normal_(layer.D, std=0.1)
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 1, 8, 8))  # BatchNorm statistics
    return model.eval()


@pytest.mark.parametrize("deployed", [False, True], ids=["doconv", "deployed"])
def test_export_with_dynamic_batch(deployed):
    model = _model()
    if deployed:
        model = dynaconv.deploy(model, input_shape=(4, 1, 8, 8))
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(
        model, (torch.randn(4, 1, 8, 8),), dynamic_shapes={"x": {0: batch}}
    )
    exported = program.module()
    for size in (1, 7):
        x = torch.randn(size, 1, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-6)


def test_onnx_export_runs_in_onnxruntime_at_another_batch(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = _model()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.onnx.export(
        model,
        (torch.randn(4, 1, 8, 8),),
        dynamo=True,
        dynamic_shapes={"x": {0: batch}},
        verbose=False,
    )
    path = tmp_path / "digits_doconv.onnx"
    program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (input_meta,) = session.get_inputs()
    x = torch.randn(9, 1, 8, 8)
    (actual,) = session.run(None, {input_meta.name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(actual), expected, rtol=1e-4, atol=1e-5)

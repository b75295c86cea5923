"""torch.compile (fullgraph) and ONNX export of models that contain DY-ReLU-B and DY-ReLU-C."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import dyrelu
import dyrelu.fused
from dyrelu import DyReLU


class Small(nn.Module):
    def __init__(self, variants=("B", "C"), impl="auto"):
        super().__init__()
        layers, cin = [], 3
        for v in variants:
            layers += [nn.Conv2d(cin, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), DyReLU(8, variant=v, impl=impl, hyper_init="random")]
            cin = 8
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3))), self.body(x)


def _small(variants=("B", "C"), seed=0, impl="auto"):
    torch.manual_seed(seed)
    m = Small(variants, impl)
    with torch.no_grad():  # non-trivial BN statistics and a peaked spatial attention
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
            if isinstance(mod, DyReLU) and mod.spatial is not None:
                mod.spatial.weight.mul_(5)
    return m


# ---- torch.compile ------------------------------------------------------------------------------------
def _check_compiled(backend, variants, impl="auto", **compile_kwargs):
    torch._dynamo.reset()
    model = _small(variants, impl=impl).train()
    x = torch.randn(2, 3, 12, 10)
    ref_out = model(x)
    ref_out[0].sum().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, backend=backend, fullgraph=True, **compile_kwargs)  # fullgraph: no graph break
    out = compiled(x)
    out[0].sum().backward()
    torch.testing.assert_close(out[0], ref_out[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], ref_out[1], rtol=1e-5, atol=1e-5)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "auto"])  # auto: the fused path's compile-traceable Function
def test_compile_fullgraph_aot_eager(impl):
    _check_compiled("aot_eager", ("A", "B", "C"), impl)


def test_compile_dynamic_shapes_one_graph():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = _small().eval()
    cnt = CompileCounter()
    compiled = torch.compile(model, backend=cnt, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for shape in [(2, 3, 12, 10), (3, 3, 7, 9), (4, 3, 16, 16)]:  # (sizes 0 and 1 are always specialised)
            x = torch.randn(shape)
            torch.testing.assert_close(compiled(x)[1], model(x)[1])
    assert cnt.frame_count == 1


@pytest.mark.slow
def test_compile_fullgraph_inductor():
    _check_compiled("inductor", ("B", "C"))


# ---- ONNX -------------------------------------------------------------------------------------------------
def _poison_fused(monkeypatch):
    """Pretend a fused path claims every input: export must still take the reference path."""

    def boom(module, x):
        raise AssertionError("the fused path must not run while exporting")

    monkeypatch.setattr(dyrelu.fused, "supports", lambda module, x: True)
    monkeypatch.setattr(dyrelu.fused, "forward", boom)


def _ort_outputs(path, x):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in sess.run(None, {sess.get_inputs()[0].name: x.numpy()})]


def _compare(model, path, shapes):
    for shape in shapes:
        x = torch.randn(shape)
        with torch.no_grad():
            expected = model(x)
        got = _ort_outputs(path, x)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_onnx_torchscript_exporter(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    model = _small().eval()
    _poison_fused(monkeypatch)
    path = tmp_path / "dyrelu_bc.onnx"
    x = torch.randn(2, 3, 12, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), str(path), dynamo=False, opset_version=17,
            input_names=["x"], output_names=["logits", "features"],
            dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n"}, "features": {0: "n", 2: "h", 3: "w"}},
        )
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))
    monkeypatch.undo()
    _compare(model, path, [(2, 3, 12, 10), (1, 3, 12, 10), (3, 3, 7, 15)])  # dynamic batch and resolution


def test_onnx_dynamo_exporter(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    model = _small().eval()
    _poison_fused(monkeypatch)
    path = tmp_path / "dyrelu_bc_dynamo.onnx"
    x = torch.randn(2, 3, 12, 10)
    batch, height, width = torch.export.Dim("n", min=1), torch.export.Dim("h", min=2), torch.export.Dim("w", min=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (x,), str(path), dynamo=True, opset_version=18,
            dynamic_shapes={"x": {0: batch, 2: height, 3: width}}, verbose=False,
        )
    monkeypatch.undo()
    # dynamic batch and resolution: gamma = H*W/3 of Eq. 4 is computed from the input's shape
    _compare(model, path, [(2, 3, 12, 10), (1, 3, 12, 10), (3, 3, 6, 14)])

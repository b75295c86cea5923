"""dyrelu.prepare_for_inference: BN folding + one precomputed path per DY-ReLU, same outputs."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import dyrelu
import models
from dyrelu.inference import InferenceDyReLU, fold_batchnorm, prepare_for_inference


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so that folding has work to do."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            if isinstance(m, dyrelu.DyReLU):
                m.fc2.weight.copy_(torch.randn(m.fc2.weight.shape, generator=g) * 0.2)
    return model.eval()


@pytest.mark.parametrize("name,act", [
    ("mbv2_035", "dyrelu_a"), ("mbv2_035", "dyrelu_b"), ("mbv2_035", "dyrelu_c"), ("mbv2_035", "relu"),
    ("mbv3_small", "dyrelu_b"), ("resnet10", "dyrelu_c"),
    ("mbv2_035", {"name": "dyrelu_b", "k": 3, "dynamic_segments": 2}),
    ("mbv2_035", {"name": "dyrelu_b", "use_bias": False, "init_b": [0.1, 0.0]}),
])
def test_prepared_matches_eval_model(name, act):
    torch.manual_seed(0)
    model = _randomise_bn(models.build_model(name, act=act, num_classes=7))
    prepared = prepare_for_inference(model)
    assert not any(isinstance(m, (nn.BatchNorm2d, dyrelu.DyReLU)) for m in prepared.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()), "the original is left alone"
    for shape in [(1, 3, 64, 64), (3, 3, 48, 40)]:
        x = torch.randn(shape)
        with torch.inference_mode():
            want = model(x)
            got = prepared(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        with torch.no_grad():  # the broadcast (trace / export) path
            torch.testing.assert_close(prepared(x.requires_grad_()), want, rtol=1e-4, atol=1e-5)


def test_inference_dyrelu_matches_module_on_all_shapes():
    torch.manual_seed(1)
    for variant in ("A", "B", "C"):
        m = dyrelu.DyReLU(6, hyper_init="random", variant=variant, k=2, reduction=2).eval()
        with torch.no_grad():
            m.fc2.weight.normal_(0, 0.5)
        inf = InferenceDyReLU(m)
        shapes = [(2, 6, 5, 7), (1, 6, 3, 3), (2, 6, 9)] + ([(3, 6)] if variant != "C" else [])
        for shape in shapes:
            x = torch.randn(shape)
            with torch.inference_mode():
                torch.testing.assert_close(inf(x), m(x), rtol=1e-5, atol=1e-6)


def test_fold_batchnorm_counts_and_bad_mode():
    model = _randomise_bn(models.build_model("resnet10", act="relu", num_classes=3))
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert fold_batchnorm(model) == n_bn  # conv/bn siblings, the stem and the shortcut Sequentials
    with pytest.raises(ValueError, match="mode='fast' is not one of"):
        prepare_for_inference(model, mode="fast")
    with pytest.raises(ValueError, match="example_input"):
        prepare_for_inference(model, mode="jit")


def test_jit_mode_and_onnx_export(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _randomise_bn(models.build_model("mbv2_035", act="dyrelu_c", num_classes=5))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        want = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = prepare_for_inference(model, mode="jit", example_input=x)
        with torch.no_grad():
            torch.testing.assert_close(traced(x), want, rtol=1e-4, atol=1e-5)
        path = tmp_path / "prepared.onnx"
        prepared = prepare_for_inference(model)
        torch.onnx.export(prepared, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"],
                          dynamic_axes={"x": {0: "n"}})
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (2, 1):
        got = torch.from_numpy(sess.run(None, {"x": x[:n].numpy()})[0])
        torch.testing.assert_close(got, want[:n], rtol=1e-4, atol=1e-4)


def test_exported_prepared_model_is_plain_aten():
    """The deployment path: a prepared model exports to ATen ops only (no dyrelu:: op that would make
    an AOTInductor package call back into Python) with the module's outputs. (docs/performance.md's
    recipe, which test_docs runs, compiles such an export into a package and checks its outputs.)"""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), dyrelu.DyReLU(8, variant="c"),
                        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), dyrelu.DyReLU(8, variant="b"))
    model = _randomise_bn(net)
    x = torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        want = model(x)
        ep = torch.export.export(prepare_for_inference(model), (x,))
        namespaces = {n.target.namespace for n in ep.graph.nodes
                      if n.op == "call_function" and hasattr(n.target, "namespace")}
        assert namespaces == {"aten"}
        got = ep.module()(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_exported_from_package():
    assert dyrelu.prepare_for_inference is prepare_for_inference


def test_native_site_and_inplace_only_where_the_input_is_fresh(monkeypatch):
    """The one-call C kernel runs the A / B sites; it writes over its input only in a Sequential
    chain after a conv / BN, never where the input is read again (ResNet's act after the sum)."""
    from dyrelu.fused import _native

    assert _native.library() is not None  # CI has a C++ compiler
    calls = []
    site = _native.site
    monkeypatch.setattr(_native, "site", lambda *a, **k: calls.append(k.get("inplace", False)) or site(*a, **k))
    torch.manual_seed(0)
    model = _randomise_bn(models.build_model("mbv2_035", act="dyrelu_b", num_classes=7))
    prepared = prepare_for_inference(model)
    sites = [m for m in prepared.modules() if isinstance(m, InferenceDyReLU)]
    assert sites and all(m.inplace for m in sites)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-4, atol=1e-5)
    assert len(calls) == len(sites) and all(calls)

    chain = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), dyrelu.DyReLU(4), nn.Conv2d(4, 4, 1), nn.Identity(),
                          dyrelu.DyReLU(4))
    prepared = prepare_for_inference(chain)
    assert [m.inplace for m in prepared.modules() if isinstance(m, InferenceDyReLU)] == [True, True]
    for first in (nn.ReLU(), nn.Identity()):  # no conv / BN before it: its input may be the caller's
        prepared = prepare_for_inference(nn.Sequential(first, dyrelu.DyReLU(3)))
        assert not prepared[1].inplace
        x = torch.randn(1, 3, 8, 8)
        keep = x.clone()
        with torch.inference_mode():
            prepared(x)
        assert torch.equal(x, keep)
    # variant C in place: pi comes from the input, before the apply overwrites it (a small tau makes
    # pi depend strongly on the input, so a pi taken from the output would show)
    torch.manual_seed(0)
    site = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                         dyrelu.DyReLU(8, variant="C", tau=0.05, hyper_init="random"))
    prepared = prepare_for_inference(_randomise_bn(site))
    assert prepared[2].inplace
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(prepared(x), site(x), rtol=1e-4, atol=1e-5)
    resnet = prepare_for_inference(models.build_model("resnet10", act="dyrelu_b", num_classes=3))
    assert not any(m.inplace for m in resnet.modules() if isinstance(m, InferenceDyReLU) and m.channels == 512)

"""dyrelu.convert on torchvision and timm models (random weights, no downloads) and on toy models."""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import dyrelu
from dyrelu import DyReLU, convert
from dyrelu.convert import ByChannels, Replacement

TARGETS = (nn.ReLU, nn.ReLU6, nn.Hardswish)
SIZE = (1, 3, 64, 64)  # small dummy input keeps the tests fast


def _left(model, types=TARGETS):
    return [n for n, m in model.named_modules() if isinstance(m, types)]


def _forward_backward(model, size=(2, 3, 64, 64)):
    model.train()
    out = model(torch.randn(size))
    out.sum().backward()
    assert torch.isfinite(out).all()
    return out


def test_torchvision_resnet18(caplog, capsys):
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.resnet18(weights=None)
    with caplog.at_level(logging.INFO, logger="dyrelu.convert"):
        report = convert(model, "dyrelu_b", input_size=SIZE)
    assert report.model is model and capsys.readouterr().out == ""  # quiet unless verbose=True
    assert _left(model) == []
    # stem relu + one (shared) relu per BasicBlock, used twice at the block's width
    rep = model.dyrelu_converted
    assert list(report) == report.replaced == rep and len(report) == 9
    assert all(isinstance(r, Replacement) for r in rep)
    expected = [("relu", "ReLU", 64)] + [
        (f"layer{i}.{j}.relu", "ReLU", 64 * 2 ** (i - 1)) for i in range(1, 5) for j in range(2)
    ]
    assert [tuple(r) for r in rep] == expected
    assert isinstance(model.relu, DyReLU) and model.relu.channels == 64
    assert isinstance(model.layer4[1].relu, DyReLU) and model.layer4[1].relu.channels == 512
    assert "replaced 9 activations (ReLU: 9) by dyrelu_b" in caplog.text
    assert "called at several sites" in caplog.text
    _forward_backward(model)
    assert model.layer4[1].relu.fc1.weight.grad is not None


def test_torchvision_resnet50_bottleneck_widths():
    """torchvision's Bottleneck calls one self.relu at two widths: one DyReLU per width."""
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet50(weights=None)
    convert(model, "dyrelu_a", input_size=(1, 3, 32, 32))
    relu = model.layer1[0].relu
    assert isinstance(relu, ByChannels) and sorted(relu.acts) == ["256", "64"]
    assert _left(model) == []
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
    with pytest.raises(ValueError, match="shared='error'"):
        convert(tv.models.resnet50(weights=None), input_size=(1, 3, 32, 32), shared="error")


def test_torchvision_mobilenet_v2():
    tv = pytest.importorskip("torchvision")
    model = tv.models.mobilenet_v2(weights=None)
    n_relu6 = len(_left(model, nn.ReLU6))
    convert(model, {"name": "dyrelu_c", "k": 2}, input_size=SIZE, reduction=4)
    assert _left(model) == [] and len(model.dyrelu_converted) == n_relu6 == 35
    assert {r.old_type for r in model.dyrelu_converted} == {"ReLU6"}
    first = model.features[0][2]
    assert isinstance(first, DyReLU) and first.variant == "C" and first.reduction == 4 and first.channels == 32
    assert dyrelu.set_tau(model, 1.0) == 35
    _forward_backward(model)


def test_timm_mobilenetv3_batchnormact_and_hardswish():
    timm = pytest.importorskip("timm")
    model = timm.create_model("mobilenetv3_large_100", pretrained=False)
    before = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, TARGETS)}
    assert any(n.endswith("bn1.act") for n in before)  # activations inside BatchNormAct2d
    convert(model, "dyrelu_b", input_size=SIZE)
    assert _left(model) == []
    assert {r.path: r.old_type for r in model.dyrelu_converted} == before
    assert {"Hardswish", "ReLU"} == {r.old_type for r in model.dyrelu_converted}
    assert isinstance(model.blocks[1][0].bn1.act, DyReLU) and model.blocks[1][0].bn1.act.channels == 64
    _forward_backward(model)


def test_timm_mobilenetv3_remove_se():
    timm = pytest.importorskip("timm")
    model = timm.create_model("mobilenetv3_large_100", pretrained=False)
    n_se = sum(type(m).__name__ == "SqueezeExcite" for m in model.modules())
    convert(model, "dyrelu_c", input_size=SIZE, remove_se=True)
    assert len(model.dyrelu_removed_se) == n_se == 8
    assert not any(type(m).__name__ == "SqueezeExcite" for m in model.modules())
    assert not any(r.path.endswith(".se.act1") for r in model.dyrelu_converted)
    assert _left(model) == []


def test_timm_efficientnet_silu_inside_batchnormact():
    timm = pytest.importorskip("timm")
    model = timm.create_model("efficientnet_b0", pretrained=False)
    convert(model, "dyrelu_b", input_size=SIZE, types=(nn.SiLU,), exclude="*.se.*")
    assert isinstance(model.bn1.act, DyReLU) and model.bn1.act.channels == 32
    assert isinstance(model.blocks[1][0].se.act1, nn.SiLU)  # excluded
    assert _left(model, nn.SiLU) == [n for n, _ in model.named_modules() if n.endswith(".se.act1")]
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_timm_resnet18_static_act_callable_and_half():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False)
    convert(model, "prelu", input_size=SIZE, init=0.1)
    assert _left(model) == [] and isinstance(model.act1, nn.PReLU) and model.act1.weight.shape == (64,)
    model = timm.create_model("resnet18", pretrained=False).to(torch.bfloat16)
    convert(model, lambda c: DyReLU(c, k=1, init_a=(1.0,)), input_size=SIZE)
    assert model.act1.fc1.weight.dtype == torch.bfloat16 and model.act1.k == 1


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 1)
        self.act = nn.ReLU()  # used twice, at widths 8 and 16
        self.alias = self.act  # the same module registered under a second name
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.Hardswish())
        self.unused = nn.ReLU6()

    def forward(self, x):
        x = self.act(self.bn(self.conv1(x)))
        x = self.alias(self.conv2(x))
        return self.head(x.mean((2, 3), keepdim=True))


def test_toy_shared_aliased_unused(caplog):
    torch.manual_seed(0)
    model = Toy()
    bn_state = {k: v.clone() for k, v in model.bn.state_dict().items()}
    model.train()
    with caplog.at_level(logging.WARNING, logger="dyrelu.convert"):
        convert(model, "dyrelu_b", example_input=torch.randn(2, 3, 9, 7))
    assert model.training and model.bn.training  # modes restored
    for k, v in model.bn.state_dict().items():  # the dummy forward ran in eval mode
        assert torch.equal(v, bn_state[k])
    assert isinstance(model.act, ByChannels) and model.alias is model.act
    assert sorted(model.act.acts) == ["16", "8"]
    assert isinstance(model.head[2], DyReLU) and model.head[2].channels == 4  # (N, C) input
    assert isinstance(model.unused, nn.ReLU6) and model.dyrelu_skipped == ["unused"]
    assert sorted((r.path, r.channels) for r in model.dyrelu_converted) == [("act", 8), ("act", 16), ("head.2", 4)]
    assert "not called" in caplog.text
    model(torch.randn(2, 3, 9, 7)).sum().backward()


def test_bad_arguments():
    with pytest.raises(ValueError, match="valid names"):
        convert(Toy(), "swish", input_size=(1, 3, 8, 8))
    with pytest.raises(ValueError, match="'negative_slope'"):
        convert(Toy(), "dyrelu_b", input_size=(1, 3, 8, 8), negative_slope=0.1)
    with pytest.raises(ValueError, match="channel count"):
        convert(Toy(), "maxout", input_size=(1, 3, 8, 8))
    with pytest.raises(ValueError, match="shared"):
        convert(Toy(), "dyrelu_b", input_size=(1, 3, 8, 8), shared="split")


def test_verbose_prints_the_report_it_returns(capsys):
    """The report reaches the user without any logging configured."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.Hardswish())
            self.unused = nn.ReLU6()

        def forward(self, x):
            return self.body(x)

    report = convert(Net(), "dyrelu_c", input_size=(1, 3, 16, 16), verbose=True)
    assert capsys.readouterr().out.splitlines() == [
        "dyrelu.convert: replaced 2 activations (Hardswish: 1, ReLU: 1) by dyrelu_c; skipped 1 never called (unused)",
        "  body.1: ReLU(8) -> dyrelu_c",
        "  body.3: Hardswish(4) -> dyrelu_c",
    ]
    assert report.skipped == ["unused"] and [r.path for r in report] == ["body.1", "body.3"]

"""Model zoo: registry, activation placement, shapes, parameter counts (no fvcore here: fast)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dyrelu
from dyrelu import DyReLU, Maxout
from models import build_model, build_pose_model, list_models
from models.mobilenetv2 import ConvBNAct

MODELS = ["mbv2_035", "mbv2_050", "mbv2_075", "mbv2_100", "mbv3_large", "mbv3_small",
          "resnet10", "resnet18", "resnet34", "resnet50"]
ACTS = list(dyrelu.ACT_NAMES)


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def dyrelus(m: nn.Module) -> dict:
    return {n: mod for n, mod in m.named_modules() if isinstance(mod, DyReLU)}


def test_registry_names_and_errors():
    assert list_models() == sorted(MODELS)
    with pytest.raises(ValueError, match="mbv2_100"):  # lists the valid names
        build_model("mobilenet_v2")
    with pytest.raises(ValueError, match="dyrelu_b"):
        build_model("mbv2_035", act="dyrelu_z")


def _supported(name: str, act: str) -> bool:
    return not (act == "maxout" and not name.startswith("mbv2"))


def _forward(name: str, act, **kw) -> nn.Module:
    torch.manual_seed(0)
    m = build_model(name, act=act, num_classes=10, **kw).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        y = m(x)
        f = m.forward_features(x)
    assert y.shape == (2, 10) and torch.isfinite(y).all()
    assert f.dim() == 4 and f.shape[:2] == (2, m.num_features) and f.shape[2] == 2  # stride 32
    return m


@pytest.mark.parametrize("name", MODELS)
def test_every_model_relu_and_dyrelu_b(name):
    _forward(name, "relu")
    m = _forward(name, {"name": "dyrelu_b", "k": 2, "reduction": 8})
    assert len(dyrelus(m)) > 0


@pytest.mark.parametrize("act", ACTS)
def test_every_act_on_mbv2_035(act):
    m = _forward("mbv2_035", act)
    if act == "maxout":
        assert any(isinstance(x, Maxout) for x in m.modules())


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("act", ACTS)
def test_every_model_x_act(name, act):
    if not _supported(name, act):
        with pytest.raises(ValueError, match="Maxout"):
            build_model(name, act=act)
        return
    _forward(name, act)


@pytest.mark.parametrize("name", ["mbv3_large", "resnet18"])
def test_maxout_refused_outside_mobilenetv2(name):
    with pytest.raises(ValueError, match="Maxout"):
        build_model(name, act="maxout")


def test_training_step_dyrelu_c():
    m = build_model("mbv2_035", act="dyrelu_c", num_classes=5)
    y = m(torch.randn(2, 3, 64, 48))
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


# ---- MobileNetV2 placement ---------------------------------------------------------------------
def _site_kinds(m: nn.Module):
    """{(block index, site): module} for the 17 blocks."""
    out = {}
    for i, b in enumerate(m.blocks):
        out[(i, "a1")] = None if b.conv_pw is None else b.conv_pw.act
        out[(i, "a2")] = b.conv_dw.act
        out[(i, "a3")] = b.conv_pwl.act
    return out


def test_mbv2_relu_placement():
    m = build_model("mbv2_100")
    sites = _site_kinds(m)
    assert len(m.blocks) == 17 and m.blocks[0].conv_pw is None  # t=1 block: no expand, no A1
    for (i, s), mod in sites.items():
        if s == "a3":
            assert isinstance(mod, nn.Identity)
        elif mod is not None:
            assert isinstance(mod, nn.ReLU)
    assert isinstance(m.stem.act, nn.ReLU) and isinstance(m.conv_head.act, nn.ReLU)
    assert m.num_features == 1280 and m.dropout.p == 0.2
    assert build_model("mbv2_035").dropout.p == 0.1
    assert build_model("mbv2_035", dropout=0.3).dropout.p == 0.3


def test_mbv2_dynamic_placement_and_k1_at_a3():
    m = build_model("mbv2_035", act={"name": "dyrelu_b", "k": 3})
    for (i, s), mod in _site_kinds(m).items():
        if mod is None:
            continue
        assert isinstance(mod, DyReLU)
        if s == "a3":
            assert mod.k == 1 and mod.init_a.tolist() == [1.0] and mod.init_b.tolist() == [0.0]
        else:
            assert mod.k == 3
    assert isinstance(m.stem.act, DyReLU) and isinstance(m.conv_head.act, DyReLU)
    m2 = build_model("mbv2_035", act="dyrelu_b", dynamic_stem_last=False)
    assert isinstance(m2.stem.act, nn.ReLU) and isinstance(m2.conv_head.act, nn.ReLU)


@pytest.mark.parametrize("positions", [[], ["a1"], ["a2"], ["a3"], ["a1", "a2"], ["a1", "a3"], ["a2", "a3"], ["a1", "a2", "a3"]])
def test_mbv2_positions_switch(positions):
    m = build_model("mbv2_035", act="dyrelu_b", positions=positions)
    for (i, s), mod in _site_kinds(m).items():
        if mod is None:
            continue
        if s in positions:
            assert isinstance(mod, DyReLU)
        else:
            assert isinstance(mod, nn.Identity if s == "a3" else nn.ReLU)
    with pytest.raises(ValueError, match="positions"):
        build_model("mbv2_035", act="dyrelu_b", positions=["a4"])


def test_mbv2_static_acts_keep_a3_linear():
    for act, cls in [("prelu", nn.PReLU), ("hswish", nn.Hardswish), ("se_relu", dyrelu.SEReLU)]:
        m = build_model("mbv2_035", act=act)
        for (i, s), mod in _site_kinds(m).items():
            if mod is not None:
                assert isinstance(mod, nn.Identity if s == "a3" else cls), (act, i, s)


def test_mbv2_maxout_sites_and_channels():
    m = build_model("mbv2_035", act={"name": "maxout", "k": 3})
    b = m.blocks[3]
    assert b.conv_pw.conv.out_channels == 3 * b.hidden_channels and isinstance(b.conv_pw.act, Maxout)
    assert b.conv_pwl.conv.out_channels == 3 * b.out_channels and isinstance(b.conv_pwl.act, Maxout)
    assert b.conv_dw.conv.out_channels == b.hidden_channels and isinstance(b.conv_dw.act, nn.ReLU)
    assert m.stem.conv.out_channels == 3 * 16 and m.conv_head.conv.out_channels == 3 * 1280
    m2 = build_model("mbv2_035", act="maxout", maxout_sites=["a2"])
    dw = m2.blocks[3].conv_dw
    assert dw.conv.out_channels == 2 * dw.conv.in_channels and dw.conv.groups == dw.conv.in_channels


def test_maxout_depthwise_maxes_filters_of_one_channel():
    torch.manual_seed(0)
    block = ConvBNAct(6, 6, 3, groups=6, act=Maxout(k=2, channels=6), expansion=2).eval()
    x = torch.zeros(1, 6, 5, 5)
    x[0, 4] = torch.randn(5, 5)
    y = block(x)
    nonzero = [c for c in range(6) if y[0, c].abs().sum() > 0]
    assert nonzero == [4]  # output channel c only sees input channel c
    w = block.conv.weight[8:10, 0]  # the two filters of input channel 4
    ref = torch.maximum(*(torch.nn.functional.conv2d(x[:, 4:5], f[None, None], padding=1) for f in w))
    bn = block.bn
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps))[8]  # identical for 8 and 9 at init
    assert torch.allclose(y[:, 4:5], ref * scale, atol=1e-6)


def test_hyper_sizing_rules():
    m = build_model("mbv2_100", act="dyrelu_b")
    b = m.blocks[5]  # 32 -> 192 expand
    assert b.conv_pw.act.hidden == max(8, b.in_channels // 8)  # conv_in rule: block input for A1
    assert b.conv_dw.act.hidden == b.hidden_channels // 8
    assert b.conv_pwl.act.hidden == b.hidden_channels // 8
    assert m.stem.act.hidden == 8  # 3 input channels -> the minimum
    m = build_model("mbv2_100", act={"name": "dyrelu_b", "reduction": 16}, hyper_sizing="act")
    assert m.blocks[5].conv_pw.act.hidden == 192 // 16
    m = build_model("mbv2_100", act={"name": "dyrelu_b", "hidden": 5})  # an explicit hidden wins
    assert {d.hidden for d in dyrelus(m).values()} == {5}
    assert build_model("mbv3_large", act="dyrelu_b").blocks[3].conv_pw.act.hidden == 72 // 8  # MobileNetV3: act rule
    se = build_model("mbv2_100", act="se_relu").blocks[5].conv_pw.act  # SE+ReLU: same rule as DY-ReLU
    assert isinstance(se, dyrelu.SEReLU) and se.hidden == 8


# ---- MobileNetV3 ---------------------------------------------------------------------------------
def test_mbv3_baseline_and_dynamic():
    for act in ("relu", "relu_se_hswish"):
        m = build_model("mbv3_large", act=act)
        assert sum(type(x).__name__ == "SEModule" for x in m.modules()) == 8
        assert any(isinstance(x, nn.Hardswish) for x in m.modules())
        assert not dyrelus(m)
    m = build_model("mbv3_small", act="dyrelu_b")
    assert not any(type(x).__name__ == "SEModule" for x in m.modules())
    assert not any(isinstance(x, (nn.ReLU, nn.Hardswish)) for n, x in m.named_modules() if "." not in n or "act" in n)
    assert all(b.conv_pwl.act.k == 1 for b in m.blocks)
    assert m.dropout.p == 0.1 and build_model("mbv3_large").dropout.p == 0.2
    assert build_model("mbv3_small", act="dyrelu_b", se=True).blocks[0].se.__class__.__name__ == "SEModule"


def test_mbv3_params_near_paper():
    assert n_params(build_model("mbv3_large")) / 1e6 == pytest.approx(5.4, rel=0.03)
    assert n_params(build_model("mbv3_large", act="dyrelu_b")) / 1e6 == pytest.approx(9.8, rel=0.03)


# ---- ResNet --------------------------------------------------------------------------------------
def test_resnet_v1_stride_and_acts():
    m = build_model("resnet50", act="dyrelu_b")
    blk = m.layer2[0]
    assert blk.conv1.stride == (2, 2) and blk.conv2.stride == (1, 1)  # v1: stride in the first 1x1
    assert isinstance(blk.act3, DyReLU) and isinstance(m.stem.act, DyReLU)
    assert len(dyrelus(m)) == 1 + 3 * 16
    r10 = build_model("resnet10")
    assert [len(s) for s in (r10.layer1, r10.layer2, r10.layer3, r10.layer4)] == [1, 1, 1, 1]
    assert r10.dropout.p == 0.1 and r10.num_features == 512 and m.num_features == 2048


@pytest.mark.parametrize("name,paper", [("resnet18", 11.1), ("resnet34", 21.3), ("resnet50", 23.5)])
def test_resnet_params_without_fc(name, paper):
    m = build_model(name)
    assert (n_params(m) - n_params(m.fc)) / 1e6 == pytest.approx(paper, rel=0.02)


# ---- parameter counts of Table 4 -----------------------------------------------------------------
# Relative gaps to the paper that the docs state (model zoo, "DY-ReLU hyper-function size"): no
# sizing rule reproduces x0.35's 2.7 M together with the other widths; ours is 15 % under. Every
# other row must match the paper within the tolerance, so a change in the counts shows up here.
DOCUMENTED_GAP = {"mbv2_035": -0.15}
PARAM_TOL = 0.03


@pytest.mark.parametrize("name,relu,dy", [("mbv2_035", 1.7, 2.7), ("mbv2_050", 2.0, 3.1), ("mbv2_075", 2.6, 5.0), ("mbv2_100", 3.5, 7.5)])
def test_mbv2_params_against_the_paper(name, relu, dy):
    """Table 4's ReLU and DY-ReLU-B parameter counts (millions)."""
    assert n_params(build_model(name)) / 1e6 == pytest.approx(relu, rel=PARAM_TOL)
    gap = n_params(build_model(name, act="dyrelu_b")) / 1e6 / dy - 1
    assert gap == pytest.approx(DOCUMENTED_GAP.get(name, 0.0), abs=PARAM_TOL)


# ---- pose ----------------------------------------------------------------------------------------
def test_pose_output_shape():
    m = build_pose_model("mbv2_050", act="dyrelu_c", head_act="dyrelu_c").eval()
    with torch.no_grad():
        y = m(torch.randn(2, 3, 256, 192))
    assert y.shape == (2, 17, 64, 48)
    assert not hasattr(m.backbone, "classifier") or isinstance(m.backbone.classifier, nn.Identity)
    a3 = m.head.blocks[2].conv_pwl.act
    assert isinstance(a3, DyReLU) and a3.k == 1 and a3.variant == "C"


@pytest.mark.parametrize("backbone", ["mbv2_100", "mbv3_small", "mbv3_large"])
def test_pose_backbones_small_input(backbone):
    m = build_pose_model(backbone, act="relu", head_act="dyrelu_c", num_joints=5).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 64, 64)).shape == (1, 5, 16, 16)
    with pytest.raises(ValueError, match="mbv2_050"):
        build_pose_model("resnet50")

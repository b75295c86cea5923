"""The static twin (dyrelu/static.py): DY-ReLU's Eq. 3 with learned constants in place of the hyper function."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

import dyrelu
from dyrelu import DyReLU, StaticDyReLU, build_act, is_dynamic, set_tau
from dyrelu.fused.bn_act import bn_dyrelu

VARIANTS = pytest.mark.parametrize("variant", ["A", "B", "C"])


def _twin(variant, c=6, **kw):
    return build_act(f"dyrelu_{variant.lower()}_static", c, **kw)


@VARIANTS
def test_registered_and_learns_only_its_constants(variant):
    m = _twin(variant, 8, k=3)
    assert type(m) is StaticDyReLU and isinstance(m, DyReLU) and m.variant == variant
    assert is_dynamic(f"dyrelu_{variant.lower()}_static")  # takes DyReLU's keywords and sites
    width = 1 if variant == "A" else 8
    expected = {"fc2.bias": (2 * 3 * width,)}
    if variant == "C":
        expected["spatial.weight"] = (1, 8, 1, 1)
    assert {n: tuple(p.shape) for n, p in m.named_parameters()} == expected
    # the zero FCs are not in the state_dict: a checkpoint holds what is learned and the constants
    assert not any(k.startswith("fc1.") or k == "fc2.weight" for k in m.state_dict())


@VARIANTS
def test_zero_start_is_the_initial_function(variant):
    m = _twin(variant, impl="reference")
    assert torch.count_nonzero(m.fc2.bias) == 0
    x = torch.randn(3, 6, 5, 7)
    pi = m.attention(x)
    assert torch.equal(m(x), F.relu(x) if pi is None else F.relu(x) * pi)


def test_hyper_init_random_draws_like_fc2s_bias():
    torch.manual_seed(0)
    m = _twin("B", 32, hidden=4, hyper_init="random")
    c = m.fc2.bias.detach()
    assert c.abs().max() <= 1 / math.sqrt(4) and c.std() > 0.1  # U(-1/2, 1/2) has std 0.29
    assert torch.count_nonzero(_twin("B", 32, hyper_init="small").fc2.bias) == 0


@VARIANTS
def test_same_coefficients_for_every_image_and_eq3_of_the_constants(variant):
    torch.manual_seed(1)
    m = _twin(variant, hyper_init="random")
    x = torch.randn(5, 6, 4, 4) * torch.arange(1, 6).view(5, 1, 1, 1)  # very different contexts
    co = m.coefficients(x)
    assert torch.equal(co.a, co.a[:1].expand_as(co.a)) and torch.equal(co.b, co.b[:1].expand_as(co.b))
    width = m.coef_width
    theta = (2 * torch.sigmoid(m.fc2.bias.detach()) - 1).view(2, 2, width)
    torch.testing.assert_close(co.a[0], m.init_a.view(2, 1) + m.lambda_a * theta[0])
    torch.testing.assert_close(co.b[0], m.init_b.view(2, 1) + m.lambda_b * theta[1])
    if variant == "C":  # the spatial branch stays input-dependent
        assert not torch.allclose(co.pi[0], co.pi[1])


@VARIANTS
def test_fused_paths_match_the_reference(variant):
    """auto (the fused ops), the fused BN site and the reference agree in float64, values and gradients."""
    torch.manual_seed(2)
    m = _twin(variant, hyper_init="random").double()
    bn = nn.BatchNorm2d(6).double().train()
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    outs = []
    for run in ("reference", "auto", "bn_site"):
        m.impl = "reference" if run == "reference" else "auto"
        y = bn_dyrelu(x, bn, m) if run == "bn_site" else m(bn(x))
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum(),
                                    [x] + list(m.parameters()))
        outs.append((y,) + grads)
    for other in outs[1:]:
        for r, o in zip(outs[0], other):
            torch.testing.assert_close(o, r, rtol=1e-10, atol=1e-10)
    assert outs[0][1 + 1].abs().sum() > 0  # the constants learn


def test_convert_set_tau_and_inference():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.ReLU())
    report = dyrelu.convert(net, "dyrelu_c_static", input_size=(1, 3, 12, 12))
    assert len(report) == 2 and all(type(net[i]) is StaticDyReLU for i in (2, 4))
    assert set_tau(net, 7.0) == 2 and float(net[2].tau) == 7.0
    with torch.no_grad():
        net[2].fc2.bias.uniform_(-1, 1)
    x = torch.randn(2, 3, 12, 12)
    prepared = dyrelu.prepare_for_inference(net)
    torch.testing.assert_close(prepared(x), net.eval()(x), rtol=1e-5, atol=1e-5)


def test_optimizer_groups_the_constants_with_the_hyper_functions():
    """The constants are what FC2's bias is in the dynamic module: same lr scale and decay (hyper group);
    C's spatial conv stays in its own group, as in DY-ReLU-C."""
    from engine.optim import build_optimizer

    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), _twin("C", 8))
    cfg = OmegaConf.create(dict(name="sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
                                base_batch_size=256, scale_lr=False, decay_norm_and_bias=True, hyper_lr_scale=0.5,
                                spatial_lr_scale=0.1, hyper_weight_decay=0.0))
    opt = build_optimizer(net, cfg, global_batch=256)
    scale = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    assert scale[id(net[2].fc2.bias)] == 0.5 and scale[id(net[2].spatial.weight)] == 0.1
    assert scale[id(net[0].weight)] == 1.0


@pytest.mark.parametrize("variant", ["B", "C"])
def test_complexity_counts_no_hyper_function(variant):
    """fvcore: params are the constants (+ C's spatial conv); MAdds lose the pooling and both FCs."""
    from dyrelu.flops import count_complexity

    def net(act):
        return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), act)

    dyn = count_complexity(net(build_act(f"dyrelu_{variant.lower()}", 16)), (8, 8))
    twin = count_complexity(net(_twin(variant, 16)), (8, 8))
    conv = 3 * 16 * 9 + 16
    assert twin["params"] == conv + 2 * 2 * 16 + (16 if variant == "C" else 0)
    fcs = 16 * 2 + 2 * 2 * 2 * 16  # FC1 (16 -> 2), FC2 (2 -> 64)
    assert twin["madds_base"] == dyn["madds_base"] - fcs
    assert "mean" not in twin["by_operator"] and "linear" not in twin["by_operator"]
    pool = 16 * 8 * 8
    assert dyn["madds_dynamic"] - twin["madds_dynamic"] >= pool
    # the paper's convention: the K multiply-adds per element (+ C's scaling) stay, the FCs go
    assert twin["madds_paper"] == dyn["madds_paper"] - fcs


def test_model_builds_with_the_twin_at_every_site():
    from models import build_model

    m = build_model("mbv2_035", act="dyrelu_b_static", num_classes=3)
    twins = [x for x in m.modules() if isinstance(x, DyReLU)]
    assert twins and all(type(x) is StaticDyReLU for x in twins)
    y = m(torch.randn(2, 3, 32, 32))
    y.sum().backward()
    assert all(x.fc2.bias.grad is not None for x in twins)


@pytest.mark.parametrize("variant", ["a", "b", "c"])
def test_config_composes_validates_and_mirrors_the_dynamic_one(variant):
    """act=dyrelu_X_static: the same values as act=dyrelu_X (only the name differs), valid for the engine."""
    from runs import compose

    from engine.validate import validate

    twin = compose([f"act=dyrelu_{variant}_static", "data=imagenet", "data.root=/unused"])
    dyn = compose([f"act=dyrelu_{variant}", "data=imagenet", "data.root=/unused"])
    validate(twin)
    assert twin.act.name == f"dyrelu_{variant}_static"
    assert {k: v for k, v in twin.act.items() if k != "name"} == {k: v for k, v in dyn.act.items() if k != "name"}

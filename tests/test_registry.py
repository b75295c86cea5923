"""The activation registry (dyrelu/registry.py): every name of the paper, specs, overrides, expansion."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import dyrelu
from dyrelu import ACT_NAMES, DyReLU, Maxout, act_expansion, act_name, build_act, is_dynamic, list_acts, make_act

PAPER_NAMES = {
    "relu", "relu6", "leaky_relu", "prelu", "prelu_shared", "rrelu", "hswish", "se_relu",
    "dyrelu_a", "dyrelu_b", "dyrelu_c", "maxout",
}
#: not the paper's: DY-ReLU's Eq. 3 with learned constants in place of the hyper function (dyrelu/static.py)
STATIC_TWINS = {"dyrelu_a_static", "dyrelu_b_static", "dyrelu_c_static"}


def test_names():
    assert set(ACT_NAMES) == PAPER_NAMES | STATIC_TWINS and list_acts() == list(ACT_NAMES)


@pytest.mark.parametrize("name", sorted(PAPER_NAMES))
def test_every_name_builds_and_runs(name):
    c = 8
    act = build_act(name, c)
    assert isinstance(act, nn.Module)
    k = act_expansion(name)
    x = torch.randn(2, k * c, 5, 7, requires_grad=True)
    y = act.train()(x)
    assert y.shape == (2, c, 5, 7)
    y.sum().backward()
    assert x.grad is not None
    assert act.eval()(x).shape == (2, c, 5, 7)


def test_what_each_name_builds():
    assert type(build_act("relu", 4)) is nn.ReLU and type(build_act("relu6", 4)) is nn.ReLU6
    assert build_act("leaky_relu", 4).negative_slope == 0.01
    assert build_act("leaky_relu", 4, negative_slope=0.2).negative_slope == 0.2
    assert build_act("prelu", 6).weight.shape == (6,)  # channel-wise
    assert build_act("prelu_shared", 6).weight.shape == (1,)
    rr = build_act("rrelu", 4)
    assert isinstance(rr, nn.RReLU) and (rr.lower, rr.upper) == (1 / 8, 1 / 3)
    assert isinstance(build_act("hswish", 4), nn.Hardswish)
    se = build_act("se_relu", 64)
    assert se.hidden == 8 and se.fc2.out_features == 64
    assert build_act("se_relu", 64, reduction=4).hidden == 16
    for v in "abc":
        m = build_act(f"dyrelu_{v}", 16)
        assert isinstance(m, DyReLU) and m.variant == v.upper() and m.k == 2 and m.reduction == 8
    m = build_act("dyrelu_c", 16, k=3, reduction=4, lambda_a=2.0, init_a=(1.0, 0.0, 0.5), tau=5.0, impl="reference", hidden=3)
    assert (m.k, m.reduction, m.hidden, m.impl, float(m.lambda_a), float(m.tau)) == (3, 4, 3, "reference", 2.0, 5.0)
    assert isinstance(build_act("maxout", 4, k=3), Maxout) and build_act("maxout", 4, k=3).k == 3


def test_maxout_layout():
    """y[:, c] = max_j x[:, j*C + c]: k blocks of C channels (k convolutions' outputs concatenated)."""
    m = Maxout(3)
    x = torch.randn(2, 12, 3, 5)
    expected = torch.stack([x[:, j * 4 : (j + 1) * 4] for j in range(3)]).amax(0)
    assert torch.equal(m(x), expected)
    assert m(torch.randn(2, 6)).shape == (2, 2) and m(torch.randn(2, 6, 9)).shape == (2, 2, 9)
    xc = x.contiguous(memory_format=torch.channels_last)
    assert m(xc).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="multiple of k=3"):
        m(torch.randn(2, 7, 3, 3))
    with pytest.raises(ValueError, match=r"\(N, 8"):
        build_act("maxout", 4)(torch.randn(2, 6, 3, 3))  # built for 4 outputs: wants 2*4 inputs


def test_act_expansion_and_is_dynamic():
    assert act_expansion("maxout") == 2
    assert act_expansion({"name": "maxout", "k": 3}) == 3
    for name in PAPER_NAMES - {"maxout"}:
        assert act_expansion(name) == 1
    assert {n for n in PAPER_NAMES if is_dynamic(n)} == {"dyrelu_a", "dyrelu_b", "dyrelu_c"}
    assert is_dynamic({"name": "dyrelu_b", "k": 1}) and not is_dynamic("se_relu")


def test_act_name_normalises():
    assert act_name("DyReLU-B") == "dyrelu_b"
    assert act_name({"name": " Leaky-ReLU ", "negative_slope": 0.1}) == "leaky_relu"


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        build_act("swish", 8)
    for name in PAPER_NAMES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="valid names"):
        make_act({"name": "gelu"}, 8)
    with pytest.raises(ValueError, match="no 'name' key"):
        make_act({"k": 2}, 8)
    with pytest.raises(TypeError):
        make_act(3, 8)


@pytest.mark.parametrize(
    "name,key",
    [("relu", "k"), ("leaky_relu", "reduction"), ("prelu", "negative_slope"), ("maxout", "reduction"),
     ("se_relu", "k"), ("hswish", "tau"), ("dyrelu_b", "negative_slope"), ("dyrelu_b", "variant")],
)
def test_bad_override_names_key_and_act(name, key):
    with pytest.raises(ValueError) as err:
        build_act(name, 8, **{key: 1})
    assert repr(key) in str(err.value) and repr(name) in str(err.value)
    with pytest.raises(ValueError):
        make_act({"name": name, key: 1}, 8)


def test_make_act_spec_and_extra():
    m = make_act({"name": "dyrelu_b", "k": 3, "init_a": [1.0, 0.0, 0.5]}, 16)
    assert m.k == 3 and m.init_a.tolist() == [1.0, 0.0, 0.5]
    # a model builder's site-specific extras (MobileNetV2's A3) override the spec for dynamic acts...
    a3 = dict(k=1, init_a=(1.0,), init_b=(0.0,))
    m = make_act({"name": "dyrelu_c", "k": 2, "reduction": 4}, 16, **a3)
    assert (m.k, m.reduction, m.init_a.tolist(), m.variant) == (1, 4, [1.0], "C")
    # ...and are ignored by static ones (maxout keeps its own k)
    assert type(make_act("relu", 16, **a3)) is nn.ReLU
    assert make_act({"name": "maxout", "k": 3}, 16, **a3).k == 3
    assert make_act("leaky_relu", 16, **a3).negative_slope == 0.01
    with pytest.raises(ValueError, match="'negative_slope'"):
        make_act("leaky_relu", 16, negative_slope=0.1)  # extras must be DyReLU keywords


def test_dictconfig_spec():
    omegaconf = pytest.importorskip("omegaconf")
    cfg = omegaconf.OmegaConf.create({"act": {"name": "dyrelu_b", "k": 2, "init_a": [1.0, 0.0], "hidden": None}})
    m = make_act(cfg.act, 16, k=1)
    assert isinstance(m, DyReLU) and m.k == 1 and m.hidden == 2
    assert act_name(cfg.act) == "dyrelu_b" and is_dynamic(cfg.act) and act_expansion(cfg.act) == 1
    cfg = omegaconf.OmegaConf.create({"name": "leaky_relu", "negative_slope": 0.1})
    assert make_act(cfg, 4).negative_slope == 0.1
    with pytest.raises(ValueError, match="'k'"):
        make_act(omegaconf.OmegaConf.create({"name": "relu", "k": 2}), 4)


def test_fresh_module_each_call():
    a, b = build_act("dyrelu_b", 8), build_act("dyrelu_b", 8)
    assert a is not b and a.fc1.weight.data_ptr() != b.fc1.weight.data_ptr()


def test_public_api():
    for name in ["DyReLU", "Coefficients", "set_tau", "build_act", "make_act", "act_expansion", "is_dynamic",
                 "act_name", "list_acts", "ACT_NAMES", "Maxout", "convert"]:
        assert hasattr(dyrelu, name) and name in dyrelu.__all__


def test_import_is_cheap():
    import subprocess
    import sys

    code = "import sys, dyrelu; print(sorted(m for m in ('timm', 'torchvision', 'hydra', 'omegaconf', 'models', 'data', 'engine', 'onnx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

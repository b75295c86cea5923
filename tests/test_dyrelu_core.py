"""DyReLU (dyrelu/core.py) against the paper: Eq. 1-4, Table 1's special cases, and REFERENCE.md section 2's bugs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dyrelu
import dyrelu.fused
from dyrelu import Coefficients, DyReLU, set_tau

# the math tests run both paths: "auto" takes dyrelu.fused where fused.supports() says so
IMPLS = pytest.mark.parametrize("impl", ["reference", "auto"])


def _zero_hyper(m: DyReLU) -> DyReLU:
    """fc1 = fc2 = 0, so the hyper function's residual 2*sigmoid(0) - 1 is exactly 0."""
    with torch.no_grad():
        for p in list(m.fc1.parameters()) + list(m.fc2.parameters()):
            p.zero_()
    return m


# ---- Table 1: ReLU, LeakyReLU, PReLU and SE are special cases ------------------------------------
@IMPLS
@pytest.mark.parametrize("variant", ["A", "B"])
def test_zero_hyper_is_relu(variant, impl):
    m = _zero_hyper(DyReLU(6, variant=variant, impl=impl))
    x = torch.randn(3, 6, 5, 7)
    assert torch.equal(m(x), F.relu(x))


@IMPLS
@pytest.mark.parametrize("variant", ["A", "B"])
def test_zero_hyper_is_leaky_relu(variant, impl):
    m = _zero_hyper(DyReLU(6, variant=variant, init_a=(1.0, 0.01), impl=impl))
    x = torch.randn(3, 6, 5, 7)
    torch.testing.assert_close(m(x), F.leaky_relu(x, 0.01), rtol=0, atol=0)


def test_static_hyper_is_prelu():
    """fc2's weight 0 and bias = logit((a_c + 1) / 2) on the second slope: a_c^2 = a_c, i.e. PReLU(C)."""
    c = 5
    slopes = torch.tensor([-0.5, -0.1, 0.0, 0.25, 0.7])
    m = _zero_hyper(DyReLU(c, variant="B", use_bias=False))
    with torch.no_grad():
        m.fc2.bias[c : 2 * c] = torch.logit((slopes + 1) / 2)
    prelu = nn.PReLU(c)
    with torch.no_grad():
        prelu.weight.copy_(slopes)
    x = torch.randn(2, c, 4, 3)
    torch.testing.assert_close(m(x), prelu(x), rtol=1e-6, atol=1e-6)


def test_k1_without_intercept_is_se():
    """K=1, b=0, init_a=0.5, lambda_a=0.5: a_c = 0.5 + 0.5 (2 sigmoid(z) - 1) = sigmoid(z), SE's gate."""
    torch.manual_seed(0)
    c = 16
    m = DyReLU(c, variant="B", k=1, use_bias=False, init_a=(0.5,), lambda_a=0.5, init_b=(0.0,))
    assert m.fc2.out_features == c and not m.has_intercept
    x = torch.randn(2, c, 5, 7)
    # squeeze-and-excitation written out with the same weights
    s = torch.sigmoid(F.linear(F.relu(F.linear(x.mean((2, 3)), m.fc1.weight, m.fc1.bias)), m.fc2.weight, m.fc2.bias))
    torch.testing.assert_close(m(x), x * s[:, :, None, None], rtol=1e-6, atol=1e-6)
    a = m.coefficients(x).a
    assert a.shape == (2, 1, c) and bool(((a >= 0) & (a <= 1)).all())
    # and the registry's SE+ReLU is ReLU of it
    se = dyrelu.build_act("se_relu", c)
    se.load_state_dict({k: v for k, v in m.state_dict().items() if k.startswith("fc")})
    torch.testing.assert_close(se(x), F.relu(m(x)), rtol=1e-6, atol=1e-6)


# ---- Eq. 1-4 written out from the paper, independent of core's helpers ----------------------------
def _paper_dyrelu(m: DyReLU, x: torch.Tensor, variant: str, K: int, lam_a, lam_b, alpha, beta, tau) -> torch.Tensor:
    N, C, H, W = x.shape
    W1, b1, W2, b2 = m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias
    out = torch.empty_like(x)
    for n in range(N):
        ctx = [sum(x[n, c, h, w] for h in range(H) for w in range(W)) / (H * W) for c in range(C)]  # GAP
        hid = [max(sum(W1[j, c] * ctx[c] for c in range(C)) + b1[j], 0.0) for j in range(W1.shape[0])]
        theta = [2 * torch.sigmoid(sum(W2[i, j] * hid[j] for j in range(len(hid))) + b2[i]) - 1 for i in range(W2.shape[0])]
        width = 1 if variant == "A" else C
        # Eq. 2: [a^1_1..a^1_C, ..., a^K_C, b^1_1, ..., b^K_C]
        da = [[theta[k * width + c] for c in range(width)] for k in range(K)]
        db = [[theta[K * width + k * width + c] for c in range(width)] for k in range(K)]
        if variant == "C":  # Eq. 4
            wz = m.spatial.weight.reshape(-1)
            z = [[sum(wz[c] * x[n, c, h, w] for c in range(C)) for w in range(W)] for h in range(H)]
            den = sum(math.exp(float(z[h][w]) / tau) for h in range(H) for w in range(W))
            gamma = H * W / 3
            pi = [[min(gamma * math.exp(float(z[h][w]) / tau) / den, 1.0) for w in range(W)] for h in range(H)]
        for c in range(C):
            cc = 0 if variant == "A" else c
            a = [alpha[k] + lam_a * da[k][cc] for k in range(K)]  # Eq. 3
            b = [beta[k] + lam_b * db[k][cc] for k in range(K)]
            for h in range(H):
                for w in range(W):
                    y = max(a[k] * x[n, c, h, w] + b[k] for k in range(K))  # Eq. 1
                    out[n, c, h, w] = y * pi[h][w] if variant == "C" else y
    return out


@IMPLS
@pytest.mark.parametrize("variant,K", [("A", 2), ("B", 2), ("C", 2), ("B", 3)])
def test_matches_paper_equations(variant, K, impl):
    torch.manual_seed(1)
    # binary fractions: the buffers hold them exactly in any float dtype
    alpha, beta = (1.0, 0.25, -0.375)[:K], (0.0625, -0.125, 0.03125)[:K]
    lam_a, lam_b, tau = 1.5, 0.5, 2.0
    m = DyReLU(4, variant=variant, k=K, reduction=2, lambda_a=lam_a, lambda_b=lam_b, init_a=alpha, init_b=beta, tau=tau, impl=impl).double()
    with torch.no_grad():
        m.fc2.weight.mul_(4)  # make the residuals matter
        if m.spatial is not None:
            m.spatial.weight.mul_(10)
    x = torch.randn(2, 4, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        expected = _paper_dyrelu(m, x, variant, K, lam_a, lam_b, alpha, beta, tau)
        torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)


# ---- gradients --------------------------------------------------------------------------------------
@IMPLS
@pytest.mark.parametrize("variant", ["A", "B", "C"])
@pytest.mark.parametrize("shape", [(3, 4), (2, 4, 5), (1, 4, 3, 5)], ids=["NC", "NCL", "NCHW_1x3x5"])
def test_gradcheck(variant, shape, impl):
    torch.manual_seed(2)
    m = DyReLU(4, variant=variant, reduction=2, impl=impl).double()
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    def fn(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(fn, (x,) + params, eps=1e-6, atol=1e-5, rtol=1e-4)


@IMPLS
def test_gradcheck_no_bias_static_segment(impl):
    torch.manual_seed(3)
    m = DyReLU(4, variant="B", k=3, reduction=2, use_bias=False, dynamic_segments=2, init_a=(1.0, 0.0, 0.5), impl=impl).double()
    x = torch.randn(1, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(m, (x,), eps=1e-6, atol=1e-5)


# ---- coefficients() ---------------------------------------------------------------------------------
@IMPLS
@pytest.mark.parametrize("variant", ["A", "B", "C"])
def test_coefficients_match_forward(variant, impl):
    torch.manual_seed(4)
    m = DyReLU(6, variant=variant, k=3, init_a=(1.0, 0.0, 0.5), init_b=(0.0, 0.1, -0.1), impl=impl)
    x = torch.randn(2, 6, 5, 7)
    co = m.coefficients(x)
    assert isinstance(co, Coefficients)
    width = 1 if variant == "A" else 6
    assert co.a.shape == (2, 3, width) and co.b.shape == (2, 3, width)
    assert (co.pi is None) == (variant != "C")
    if co.pi is not None:
        assert co.pi.shape == (2, 1, 5, 7) and bool(((co.pi >= 0) & (co.pi <= 1)).all())
    y = torch.stack([co.a[:, k, :, None, None] * x + co.b[:, k, :, None, None] for k in range(3)]).amax(0)
    if co.pi is not None:
        y = y * co.pi
    torch.testing.assert_close(m(x), y)
    assert not co.a.requires_grad


def test_dynamic_segments_keep_last_segments_static():
    m = DyReLU(6, variant="B", k=3, hyper_init="random", dynamic_segments=1, init_a=(1.0, 0.0, 0.3), init_b=(0.0, 0.2, 0.0))
    assert m.fc2.out_features == 2 * 1 * 6
    co = m.coefficients(torch.randn(2, 6, 4, 4))
    assert torch.equal(co.a[:, 1:], torch.tensor([0.0, 0.3]).reshape(1, 2, 1).expand(2, 2, 6))
    assert torch.equal(co.b[:, 1:], torch.tensor([0.2, 0.0]).reshape(1, 2, 1).expand(2, 2, 6))
    assert not torch.equal(co.a[:, 0], torch.ones(2, 6))


def test_init_values_per_segment():
    m = DyReLU(4, k=3)  # missing slopes/intercepts are 0 (paper default), extra ones dropped
    assert m.init_a.tolist() == [1.0, 0.0, 0.0] and m.init_b.tolist() == [0.0, 0.0, 0.0]
    assert DyReLU(4, k=1).init_a.tolist() == [1.0]
    assert DyReLU(4, k=2, init_a=[0.5, 0.25]).init_a.tolist() == [0.5, 0.25]


def test_k1_and_no_bias():
    m = DyReLU(5, variant="B", k=1, use_bias=False, init_a=1.0, init_b=0.0)
    co = m.coefficients(torch.randn(2, 5, 3, 3))
    assert co.a.shape == (2, 1, 5) and torch.equal(co.b, torch.zeros(2, 1, 5))
    m2 = DyReLU(5, variant="A", k=2, use_bias=False, init_b=(0.0, 0.1))  # static nonzero intercept is kept
    assert m2.has_intercept
    assert torch.equal(m2.coefficients(torch.randn(1, 5, 2, 2)).b[0, :, 0], torch.tensor([0.0, 0.1]))


def test_has_intercept_follows_loaded_state():
    src = DyReLU(4, use_bias=False, init_b=(0.0, 0.3))
    dst = DyReLU(4, use_bias=False)
    assert not dst.has_intercept
    dst.load_state_dict(src.state_dict())
    assert dst.has_intercept
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(dst(x), src(x))


# ---- REFERENCE.md section 2: shapes, devices, dtypes, layouts ----------------------------------------
@pytest.mark.parametrize("variant", ["A", "B", "C"])
@pytest.mark.parametrize("shape", [(1, 6, 3, 8), (2, 6, 9, 4), (1, 6), (1, 6, 11), (2, 6, 2, 3, 4)])
def test_shapes(variant, shape):
    m = DyReLU(6, variant=variant)
    x = torch.randn(*shape)
    y = m(x)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    torch.testing.assert_close(y, m.forward_reference(x))


@IMPLS
@pytest.mark.parametrize("variant", ["A", "B", "C"])
@pytest.mark.parametrize("n", [1, 3])
def test_channels_last_in_channels_last_out(variant, n, impl):
    m = DyReLU(8, variant=variant, impl=impl)
    x = torch.randn(n, 8, 5, 7)
    y_ref = m(x)
    xc = x.contiguous(memory_format=torch.channels_last)
    y = m(xc)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()  # backward through channels_last works


def test_constants_are_buffers_and_follow_dtype_device():
    m = DyReLU(4, variant="C")
    bufs = dict(m.named_buffers())
    assert set(bufs) == {"init_a", "init_b", "lambda_a", "lambda_b", "tau"}
    assert set(bufs) <= set(m.state_dict())
    m = m.double()
    assert all(b.dtype == torch.float64 for b in m.buffers())
    m = m.half()
    assert all(b.dtype == torch.float16 for b in m.buffers())
    # on the meta device nothing may be created on (or mixed with) a CPU tensor
    meta = DyReLU(4, variant="C").to("meta")
    for shape in [(2, 4, 3, 5), (2, 4), (1, 4, 7)]:
        y = meta(torch.empty(*shape, device="meta"))
        assert y.device.type == "meta" and y.shape == shape


@IMPLS
def test_half_module_half_input(impl):
    torch.manual_seed(5)
    m = DyReLU(8, variant="C", impl=impl)
    x = torch.randn(2, 8, 5, 6)
    y16 = m.half()(x.half())
    assert y16.dtype == torch.float16
    torch.testing.assert_close(y16.float(), m.float()(x), rtol=2e-2, atol=2e-2)


@IMPLS
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("variant", ["A", "B", "C"])
def test_cpu_autocast(variant, dtype, impl):
    torch.manual_seed(6)
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), DyReLU(8, variant=variant, impl=impl))
    x = torch.randn(2, 3, 6, 10)
    ref = m(x)
    with torch.autocast("cpu", dtype=dtype):
        y = m(x)
        co = m[1].coefficients(m[0](x))
    assert y.dtype == dtype  # the conv's low-precision output sets the activation's dtype
    assert co.a.dtype == torch.float32  # the hyper function is normalised in fp32
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)
    with torch.autocast("cpu", dtype=dtype):
        y32 = m[1](x.new_ones(2, 8, 3, 3))  # fp32 input stays fp32
    assert y32.dtype == torch.float32


# ---- tau ------------------------------------------------------------------------------------------
def test_set_tau_changes_attention():
    torch.manual_seed(7)
    model = nn.Sequential(DyReLU(4, variant="C"), DyReLU(4, variant="B"), DyReLU(4, variant="C"))
    with torch.no_grad():
        model[0].spatial.weight.mul_(20)
    x = torch.randn(2, 4, 6, 6)
    pi10 = model[0].attention(x)
    assert set_tau(model, 1.0) == 2
    assert float(model[0].tau) == 1.0 and float(model[2].tau) == 1.0
    pi1 = model[0].attention(x)
    assert not torch.allclose(pi1, pi10)
    assert pi1.amin() < pi10.amin()  # a lower temperature sharpens the attention
    with pytest.raises(ValueError):
        set_tau(model, 0.0)


def test_tau_change_after_compile_no_recompile():
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    m = DyReLU(4, variant="C")
    with torch.no_grad():
        m.spatial.weight.mul_(20)
    cnt = CompileCounter()
    cm = torch.compile(m, backend=cnt, fullgraph=True)
    x = torch.randn(2, 4, 5, 6)
    torch.testing.assert_close(cm(x), m(x))
    set_tau(m, 0.5)
    torch.testing.assert_close(cm(x), m.forward_reference(x))
    assert cnt.frame_count == 1


# ---- argument checks and dispatch -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [dict(variant="D"), dict(impl="cuda"), dict(k=0), dict(dynamic_segments=3), dict(init_a=()), dict(tau=0.0), dict(hidden=0)],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        DyReLU(4, **kwargs)


def test_wrong_channels():
    with pytest.raises(ValueError, match=r"expects \(N, 4"):
        DyReLU(4)(torch.randn(2, 5, 3, 3))


def test_hidden_and_reduction():
    assert DyReLU(64).hidden == 8 and DyReLU(64, reduction=4).hidden == 16
    assert DyReLU(4).hidden == 1 and DyReLU(64, hidden=3).fc1.out_features == 3
    assert DyReLU(64, variant="A", k=3).fc2.out_features == 2 * 3
    assert DyReLU(64, variant="B", k=3).fc2.out_features == 2 * 3 * 64


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_dispatch(monkeypatch):
    calls = []
    monkeypatch.setattr(dyrelu.fused, "supports", lambda module, x: True)
    monkeypatch.setattr(dyrelu.fused, "forward", lambda module, x: calls.append(1) or module.forward_reference(x))
    m = DyReLU(4)
    x = torch.randn(1, 4, 3, 3)
    m(x)
    assert calls == [1]
    DyReLU(4, impl="reference")(x)
    assert calls == [1]
    torch.jit.trace(m, (x,), check_trace=False)  # tracing/export contexts always take the reference path
    assert calls == [1]
    monkeypatch.setattr(dyrelu.fused, "supports", lambda module, x: False)
    with pytest.raises(ValueError, match="impl='fused'"):
        DyReLU(4, impl="fused")(x)

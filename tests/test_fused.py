"""dyrelu.fused (the fast path) against the reference path of dyrelu/core.py.

CPU only and fast: tiny shapes. Backends: "native" (CPU eager default: the C kernels), "bn" (CPU
eager without a C compiler, and half dtypes), "torch" (broadcast ops, the torch.compile path) and "triton" (run by Triton's interpreter in a subprocess, TRITON_INTERPRET=1).
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import dyrelu.fused as fused
from dyrelu import DyReLU
from dyrelu.fused import piecewise_apply
from runs import load_script

ROOT = Path(__file__).resolve().parents[1]
CPU_BACKENDS = ["native", "bn", "torch"]


@pytest.fixture
def backend(request, monkeypatch):
    monkeypatch.setenv("DYRELU_FUSED_BACKEND", request.param)
    return request.param


def make(channels, variant="B", k=2, use_bias=True, dyn=None, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    m = DyReLU(channels, hyper_init="random", variant=variant, k=k, reduction=2, use_bias=use_bias, dynamic_segments=dyn,
               init_a=(1.0, 0.0, 0.5)[:k], init_b=(0.0, 0.0, 0.1)[:k], **kw)
    with torch.no_grad():  # random hyper weights: coefficients far from the init, crossings inside the data
        for p in m.parameters():
            p.normal_(0.0, 0.5)
    return m.to(dtype)


def run(m, x, impl, g=None):
    """Output, grad of x and grads of every parameter for one impl."""
    m.impl = impl
    m.zero_grad(set_to_none=True)
    xi = x.detach().clone().requires_grad_(True)
    y = m(xi)
    if g is None:
        g = torch.randn_like(y)
    y.backward(g)
    grads = {n: p.grad.detach().clone() for n, p in m.named_parameters()}
    return y.detach(), xi.grad.detach(), grads, g


def assert_same(m, x, atol=1e-5, rtol=1e-5):
    y_r, gx_r, gp_r, g = run(m, x, "reference")
    y_f, gx_f, gp_f, _ = run(m, x, "fused", g)
    torch.testing.assert_close(y_f, y_r, atol=atol, rtol=rtol)
    torch.testing.assert_close(gx_f, gx_r, atol=atol, rtol=rtol)
    assert set(gp_f) == set(gp_r) and gp_r
    for name in gp_r:
        torch.testing.assert_close(gp_f[name], gp_r[name], atol=atol, rtol=rtol, msg=lambda s: f"{name}: {s}")
    return y_f


SHAPES = [(3, 8), (2, 8, 19), (2, 8, 5, 7), (1, 8, 6, 11)]


# ---- fused == reference, fp32, output and every gradient -------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("variant,k,use_bias", [(v, k, ub) for v in "ABC" for k in (1, 2, 3) for ub in (True, False)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference_fp32(backend, variant, k, use_bias, shape):
    m = make(shape[1], variant, k, use_bias)
    x = torch.randn(*shape)
    y = assert_same(m, x)
    assert y.shape == x.shape


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("variant", ["A", "B", "C"])
def test_channels_last(backend, variant):
    m = make(8, variant, 2)
    x = torch.randn(2, 8, 5, 9).to(memory_format=torch.channels_last)
    y = assert_same(m, x)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("variant,k,dyn", [("B", 2, 1), ("C", 3, 1), ("A", 3, 2)])
def test_dynamic_segments(backend, variant, k, dyn):
    m = make(6, variant, k, dyn=dyn)
    assert_same(m, torch.randn(2, 6, 4, 9))


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_non_contiguous_and_5d(backend):
    m = make(6, "B", 2)
    x = torch.randn(2, 9, 6, 7).transpose(1, 2)[:, :, :, 1:]  # (2, 6, 9, 6), odd strides
    assert_same(m, x)
    assert_same(make(6, "C", 2), torch.randn(2, 6, 3, 4, 5))


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
def test_bigger_values_fp32(backend):
    """Sums over many positions: still within 1e-5 relative."""
    m = make(16, "B", 2)
    assert_same(m, 3 * torch.randn(4, 16, 23, 17), atol=1e-5, rtol=1e-5)


# ---- bf16 within bf16 rounding -----------------------------------------------------------------------
def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("variant", ["A", "B", "C"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_bf16_within_rounding(backend, variant, layout):
    m32 = make(8, variant, 2)
    x = torch.randn(2, 8, 6, 10).bfloat16()
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    truth = run(m32, x.float(), "reference")  # fp32 math on the same (bf16-valued) input
    m16 = make(8, variant, 2, dtype=torch.bfloat16)
    y_f, gx_f, gp_f, _ = run(m16, x, "fused", truth[3].bfloat16())
    y_r, gx_r, gp_r, _ = run(m16, x, "reference", truth[3].bfloat16())
    assert y_f.dtype == torch.bfloat16 and gx_f.dtype == torch.bfloat16
    eps = 2.0 ** -8  # bf16 unit roundoff
    # elementwise: the output is one bf16 rounding (plus the bf16 hyper weights) away from fp32
    torch.testing.assert_close(y_f.float(), truth[0], atol=8 * eps, rtol=8 * eps)
    assert _rel(y_f, truth[0]) <= max(2 * _rel(y_r, truth[0]), 4 * eps)
    assert _rel(gx_f, truth[1]) <= max(2 * _rel(gx_r, truth[1]), 4 * eps)
    for name in truth[2]:
        assert _rel(gp_f[name], truth[2][name]) <= max(2 * _rel(gp_r[name], truth[2][name]), 8 * eps), name


# ---- low-precision inputs: the coefficient sums are fp32 sums ------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [2, 3])
def test_shared_coefficient_grads_are_exact_sums_in_low_precision(backend, dtype, k):
    """Variant A sums g * x over all C * L positions of a sample; with fp16 / bf16 x and g that sum
    must be accumulated in fp32 (an fp16 accumulator over 18816 terms loses ~1e-2, the size of the
    H200 run's A K=3 fp16 gradient error, which turned out to be the check's truth instead)."""
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(1, 24, 28, 28, generator=gen).to(dtype)
    g = torch.randn(x.shape, generator=gen).to(dtype)
    a = (torch.randn(1, k, 1, generator=gen) * 0.5).requires_grad_(True)
    b = (torch.randn(1, k, 1, generator=gen) * 0.1).requires_grad_(True)
    torch.autograd.backward(piecewise_apply(x, a, b, None), g)
    # exact sums (fp64) over the segments the kernels pick: fp32 a_k x + b_k, lowest k on ties
    u = x.float()[:, None] * a.detach()[..., None, None] + b.detach()[..., None, None]  # (1, K, C, H, W)
    sel = u.argmax(1)
    xd, gd = x.double(), g.double()
    for j in range(k):
        on = sel == j
        torch.testing.assert_close(a.grad[0, j, 0].double(), (gd * xd * on).sum(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.grad[0, j, 0].double(), (gd * on).sum(), rtol=1e-5, atol=1e-5)


# ---- gradcheck in float64 ------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("variant,k,use_bias,shape", [
    ("A", 2, True, (2, 3, 4, 5)), ("B", 2, True, (2, 3, 4, 5)), ("B", 3, False, (2, 3, 9)),
    ("C", 2, True, (1, 3, 4, 3)), ("B", 1, True, (2, 3)),
])
def test_gradcheck_module(backend, variant, k, use_bias, shape):
    m = make(shape[1], variant, k, use_bias, dtype=torch.float64)
    m.impl = "fused"
    names = [n for n, _ in m.named_parameters()]
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().clone().requires_grad_(True) for p in m.parameters())

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x,) + params, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("w,k,with_b,with_pi", [(3, 2, True, False), (1, 3, True, True), (3, 1, False, True)])
def test_gradcheck_apply(backend, w, k, with_b, with_pi):
    torch.manual_seed(0)
    dt = torch.float64
    x = torch.randn(2, 3, 4, 5, dtype=dt, requires_grad=True)
    a = torch.randn(2, k, w, dtype=dt, requires_grad=True)
    b = torch.randn(2, k, w, dtype=dt, requires_grad=True) if with_b else None
    pi = torch.rand(2, 1, 4, 5, dtype=dt, requires_grad=True) if with_pi else None
    inputs = tuple(t for t in (x, a, b, pi) if t is not None)

    def f(*ts):
        it = iter(ts)
        xx, aa = next(it), next(it)
        bb = next(it) if with_b else None
        pp = next(it) if with_pi else None
        return piecewise_apply(xx, aa, bb, pp)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


# ---- dispatch: auto picks fused; export / tracing picks reference ---------------------------------------
class _Spy:
    def __init__(self, monkeypatch):
        self.calls = 0
        real = fused.forward

        def spy(module, x):
            self.calls += 1
            return real(module, x)

        monkeypatch.setattr(fused, "forward", spy)


@pytest.mark.parametrize("variant", ["A", "B", "C"])
def test_auto_picks_fused_train_and_inference(monkeypatch, variant):
    spy = _Spy(monkeypatch)
    m = make(8, variant, 2)  # impl="auto"
    assert m.impl == "auto"
    x = torch.randn(2, 8, 5, 6)
    assert fused.supports(m, x)
    m.train()
    m(x.requires_grad_()).sum().backward()
    m.eval()
    with torch.no_grad():
        m(x)
    with torch.inference_mode():
        y = m(x)
    assert spy.calls == 3
    torch.testing.assert_close(y, m.forward_reference(x).detach(), atol=1e-5, rtol=1e-5)


def test_auto_picks_triton_on_cuda_and_native_on_cpu(monkeypatch):
    monkeypatch.delenv("DYRELU_FUSED_BACKEND", raising=False)
    assert fused.select_backend(torch.randn(2, 3)) == "native"  # CI has gcc: the kernels must build
    assert fused.select_backend(torch.randn(2, 3, dtype=torch.bfloat16)) == "bn"
    if torch.cuda.is_available():  # pragma: no cover - no GPU in CI
        expect = "triton" if fused._triton.HAS_TRITON else "torch"
        assert fused.select_backend(torch.randn(2, 3, device="cuda")) == expect
    monkeypatch.setenv("DYRELU_FUSED_BACKEND", "nope")
    from dyrelu.errors import BadValueError  # a user error: one line and exit 2 from train.py

    with pytest.raises(BadValueError, match="DYRELU_FUSED_BACKEND='nope' is not one of"):
        fused.select_backend(torch.randn(2, 3))


def test_supports_false_cases():
    m = make(8, "B", 2)
    assert fused.supports(m, torch.randn(2, 8, 3, 3))
    assert fused.supports(m, torch.randn(2, 8, dtype=torch.float64))
    assert not fused.supports(m, torch.randn(2, 7, 3, 3))  # wrong channels
    assert not fused.supports(m, torch.randn(8))  # no batch dim
    assert not fused.supports(m, torch.zeros(2, 8, 3, 3, dtype=torch.int32))
    assert not fused.supports(m, torch.randn(0, 8, 3, 3))
    assert not fused.supports(m, torch.randn(2, 8, 3, 3, device="meta"))


def test_functorch_transforms_use_reference():
    m = make(4, "B", 2)
    x = torch.randn(3, 2, 4, 5)
    out = torch.vmap(m)(x)  # per-sample (2, 4, 5) inputs: reference path inside vmap
    ref = torch.stack([m.forward_reference(xi) for xi in x])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_jit_trace_uses_reference(monkeypatch):
    seen = []
    real = fused.supports
    monkeypatch.setattr(fused, "supports", lambda mod, x: seen.append(real(mod, x)) or seen[-1])
    m = make(8, "C", 2).eval()
    x = torch.randn(1, 8, 5, 6)
    with torch.no_grad():
        traced = torch.jit.trace(m, x, check_trace=False)
    assert not any(seen)  # never the fused path while tracing
    graph = str(traced.graph)
    assert "prim::PythonOp" not in graph  # no opaque autograd.Function in the trace
    torch.testing.assert_close(traced(x), m.forward_reference(x), atol=1e-5, rtol=1e-5)

    def probe(t):  # fused.supports itself says no while tracing
        seen.append(real(m, t))
        return t * 2

    seen.clear()
    torch.jit.trace(probe, x, check_trace=False)
    assert seen == [False]


def test_onnx_export_uses_reference(monkeypatch):
    pytest.importorskip("onnx")

    def boom(module, x):
        raise AssertionError("fused path used during ONNX export")

    monkeypatch.setattr(fused, "forward", boom)
    m = make(8, "B", 2).eval()
    buf = io.BytesIO()
    torch.onnx.export(m, (torch.randn(1, 8, 5, 6),), buf, dynamo=False)
    assert buf.getvalue()


# ---- torch.compile: the registered ops are in the graph (no graph break) ---------------------------------------------
@pytest.mark.parametrize("variant", ["B", "C"])
def test_compile_fullgraph_uses_fused_function(variant):
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        keep = lambda g, _: make_boxed_func(g)  # noqa: E731  (run the traced graphs as they are)
        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    m = make(8, variant, 2)
    x = torch.randn(2, 8, 5, 6)
    y_r, gx_r, gp_r, g = run(m, x, "reference")
    m.impl = "auto"
    m.zero_grad(set_to_none=True)
    cm = torch.compile(m, fullgraph=True, backend=backend)
    xi = x.clone().requires_grad_(True)
    y = cm(xi)
    y.backward(g)
    assert graphs and "torch.ops.dyrelu.apply" in graphs[0].code and "torch.ops.dyrelu.coefs" in graphs[0].code
    torch.testing.assert_close(y, y_r, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xi.grad, gx_r, atol=1e-5, rtol=1e-5)
    for name, p in m.named_parameters():
        torch.testing.assert_close(p.grad, gp_r[name], atol=1e-5, rtol=1e-5)


def test_compile_aot_eager_fullgraph_in_a_network():
    torch._dynamo.reset()
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), DyReLU(8, k=2, hyper_init="random"),
                              torch.nn.Conv2d(8, 8, 1), DyReLU(8, variant="C", hyper_init="random"), torch.nn.AdaptiveAvgPool2d(1))
    cm = torch.compile(net, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 6, 7)
    cm(x).sum().backward()
    g_c = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    for mod in net.modules():
        if isinstance(mod, DyReLU):
            mod.impl = "reference"
    net(x).sum().backward()
    for a, b in zip(g_c, (p.grad for p in net.parameters())):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ---- Triton kernels through the interpreter ----------------------------------------------------------------
TRITON_SCRIPT = textwrap.dedent(
    """
    import itertools, os, sys, torch
    sys.path.insert(0, {root!r})
    import triton  # imported after TRITON_INTERPRET=1 is set by the parent
    import dyrelu
    from dyrelu.fused import _triton, piecewise_apply
    from dyrelu.fused.function import global_pool, select_backend
    assert _triton.interpreting() and select_backend(torch.randn(1, 2)) == "triton"
    torch.manual_seed(0)

    def make(c, variant, k, use_bias, dtype):
        torch.manual_seed(c * 100 + k)
        m = dyrelu.DyReLU(c, hyper_init="random", variant=variant, k=k, reduction=2, use_bias=use_bias,
                          init_a=(1.0, 0.0, 0.5)[:k], init_b=(0.0, 0.0, 0.1)[:k])
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0.0, 0.5)
        return m.to(dtype)

    def run(m, x, impl, g=None):
        m.impl = impl
        m.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_(True)
        y = m(xi)
        g = torch.randn_like(y) if g is None else g
        y.backward(g)
        return [y.detach(), xi.grad] + [p.grad for p in m.parameters()], g

    n_cases = 0
    worst = {{torch.float64: 0.0, torch.float32: 0.0}}
    cases = [
        ("A", 2, True, (2, 5, 9, 10), False), ("B", 1, True, (2, 5, 9, 10), False),
        ("B", 2, False, (2, 70, 3, 5), False), ("B", 3, True, (1, 6, 130), False),
        ("C", 2, True, (2, 5, 9, 10), False), ("C", 3, False, (1, 4, 3, 7), True),
        ("B", 2, True, (2, 70, 5, 3), True), ("A", 1, False, (3, 6), False), ("C", 1, True, (2, 6, 11), False),
    ]
    for (variant, k, ub, shape, cl), dtype in itertools.product(cases, [torch.float64, torch.float32]):
        m = make(shape[1], variant, k, ub, dtype)
        x = torch.randn(*shape, dtype=dtype)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        ref, g = run(m, x, "reference")
        out, _ = run(m, x, "fused", g)
        if cl:
            assert out[0].is_contiguous(memory_format=torch.channels_last)
        for r, o in zip(ref, out):
            err = ((r - o).abs() / (1 + r.abs())).max().item()
            worst[dtype] = max(worst[dtype], err)
        n_cases += 1
    assert worst[torch.float64] < 1e-12, worst
    assert worst[torch.float32] < 1e-5, worst

    # the pool kernel, both layouts
    for cl in (False, True):
        x = torch.randn(2, 70, 9, 11)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        torch.testing.assert_close(global_pool(x), x.mean((2, 3)), atol=1e-6, rtol=1e-5)
    # gradcheck through the Triton kernels (float64)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    pi = torch.rand(2, 1, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: piecewise_apply(*t), (x, a, b, pi), eps=1e-6, atol=1e-6)
    # bf16 storage, fp32 math
    m = make(8, "B", 2, True, torch.float32)
    x = torch.randn(2, 8, 5, 6).bfloat16()
    y32 = m.forward_reference(x.float())
    m16 = make(8, "B", 2, True, torch.bfloat16)
    m16.impl = "fused"
    y16 = m16(x)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, atol=0.05, rtol=0.03)

    # the fp64 pool divides in fp64 (an fp32 1/L is off by ~1e-8 relative)
    x = torch.randn(3, 5, 3, 7, dtype=torch.float64) + 1.0
    torch.testing.assert_close(global_pool(x), x.mean((2, 3)), atol=0, rtol=1e-14)
    # long rows: the pool and the backward split L over several programs (partial sums)
    x = torch.randn(2, 8, 3001, dtype=torch.float64)
    assert _triton.plan_backward(tuple(x.shape), 0, x.dtype, 2, True).split > 1
    assert _triton.plan_pool(tuple(x.shape), 0, x.dtype).split > 1
    torch.testing.assert_close(global_pool(x), x.mean(2), atol=0, rtol=1e-13)

    # deterministic algorithms: the backward twice gives the same bits (fixed split, no atomics)
    torch.use_deterministic_algorithms(True)
    for cl in (False, True):
        x = torch.randn(2, 70, 9, 40)
        if cl:
            x = x.to(memory_format=torch.channels_last)
        a = torch.randn(2, 3, 70, requires_grad=True)
        b = torch.randn(2, 3, 70, requires_grad=True)
        pi = torch.rand(2, 1, 9, 40, requires_grad=True)
        g = torch.randn_like(x)
        runs = []
        for _ in range(2):
            xi = x.clone().requires_grad_(True)
            torch.autograd.backward(piecewise_apply(xi, a, b, pi), g)
            runs.append([t.grad.clone() for t in (xi, a, b, pi)])
            for t in (a, b, pi):
                t.grad = None
        for u, v in zip(*runs):
            assert torch.equal(u, v)
        xr = x.clone().requires_grad_(True)
        os.environ["DYRELU_FUSED_BACKEND"] = "torch"
        torch.autograd.backward(piecewise_apply(xr, a, b, pi), g)
        os.environ["DYRELU_FUSED_BACKEND"] = "triton"
        for u, v in zip(runs[0], [t.grad for t in (xr, a, b, pi)]):
            torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-4)
    torch.use_deterministic_algorithms(False)
    print("TRITON_OK", n_cases, worst)
    """
)


def test_triton_kernels_in_interpreter(tmp_path):
    pytest.importorskip("triton")
    script = tmp_path / "triton_check.py"
    script.write_text(TRITON_SCRIPT.format(root=str(ROOT)))
    env = dict(os.environ, TRITON_INTERPRET="1", DYRELU_FUSED_BACKEND="triton", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "TRITON_OK" in proc.stdout


# ---- a Triton failure cannot kill a run: one warning, then the torch kernels -----------------------------
class _RaisingKernel:
    """Stands for a jit function whose launch raises (a compile error, an unsupported GPU)."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append(self.name)
            raise RuntimeError(f"PTX compile failed in {self.name} (simulated)")

        return launch


def _tiny_net(seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), DyReLU(8, k=2, hyper_init="random"),
        torch.nn.Conv2d(8, 8, 1), DyReLU(8, variant="C", hyper_init="random"), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(8, 3),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, DyReLU):
                for p in m.parameters():
                    p.normal_(0.0, 0.5)
    return net


def _train_step(net, x, y):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    loss = torch.nn.functional.cross_entropy(net(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach()


def test_triton_failure_falls_back_once_per_configuration(monkeypatch):
    pytest.importorskip("triton")
    tri = fused._triton
    monkeypatch.delenv("DYRELU_FUSED_BACKEND", raising=False)
    monkeypatch.setattr(tri, "_OK", set())
    monkeypatch.setattr(fused._latch, "FAILED", {})
    calls, guarded = [], []
    for name in ("_pool_kernel", "_apply_fwd_kernel", "_apply_bwd_kernel"):
        monkeypatch.setattr(tri, name, _RaisingKernel(name, calls))
    for name in ("_pi_fwd_kernel", "_pi_bwd_kernel"):  # variant C's Eq. 4 (_triton_site's, in the kernel table)
        monkeypatch.setitem(tri.KERNELS, name, _RaisingKernel(name, calls))
    real_guard = tri.device_guard
    monkeypatch.setattr(tri, "device_guard", lambda d: guarded.append(d) or real_guard(d))
    monkeypatch.setattr(fused.backend, "choose", lambda x: "triton")  # as on a CUDA tensor
    x, y = torch.randn(4, 3, 6, 5), torch.tensor([0, 1, 2, 1])
    ref = _tiny_net()
    for m in ref.modules():
        if isinstance(m, DyReLU):
            m.impl = "reference"
    net = _tiny_net()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        loss = _train_step(net, x, y)
    assert torch.isfinite(loss)
    msgs = [str(w.message) for w in rec if issubclass(w.category, RuntimeWarning) and "dyrelu: Triton" in str(w.message)]
    first_calls = len(calls)
    assert len(msgs) == first_calls == len(fused._latch.FAILED) >= 6  # pool, forward (B, C), backward, pi: once each
    for kernel in ("_pool_kernel", "_apply_fwd_kernel", "_apply_bwd_kernel", "_pi_fwd_kernel", "_pi_bwd_kernel"):
        assert any(f"PTX compile failed in {kernel}" in m and "fallback kernels" in m for m in msgs), kernel
    assert all(d == x.device for d in guarded)  # launches run under the tensor's device
    torch.testing.assert_close(loss, _train_step(ref, x, y), atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-5, msg=lambda s: f"{name}: {s}")
    with warnings.catch_warnings():  # the failed configurations are not retried, nor warned about again
        warnings.simplefilter("error")
        _train_step(net, x, y)
    assert len(calls) == first_calls


def test_native_kernels_unavailable_fall_back_to_bn(monkeypatch, tmp_path):
    """No C compiler: one warning naming why, then the ATen kernels compute the same function;
    a forced DYRELU_FUSED_BACKEND=native raises instead."""
    nat = fused._native
    monkeypatch.setattr(nat, "_state", {})
    monkeypatch.setenv("CXX", "no-such-compiler-dyrelu")
    monkeypatch.setattr(nat, "_loaded", lambda: False)  # as in a process that has not loaded them
    monkeypatch.setenv("DYRELU_NATIVE_CACHE", str(tmp_path))  # nothing cached there
    monkeypatch.delenv("DYRELU_FUSED_BACKEND", raising=False)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    m = make(8, "B", 2)
    with pytest.warns(RuntimeWarning, match="no-such-compiler-dyrelu"):
        assert fused.select_backend(x) == "bn"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        y = m(x)
    torch.testing.assert_close(y, m.forward_reference(x), atol=1e-6, rtol=1e-6)
    monkeypatch.setenv("DYRELU_FUSED_BACKEND", "native")
    with pytest.raises(RuntimeError, match="native CPU kernels are not available"):
        fused.select_backend(x)


def test_native_kernels_switched_off(monkeypatch):
    monkeypatch.setenv("DYRELU_NATIVE", "0")
    monkeypatch.delenv("DYRELU_FUSED_BACKEND", raising=False)
    assert fused.select_backend(torch.randn(2, 3)) == "bn"
    monkeypatch.setenv("DYRELU_FUSED_BACKEND", "native")
    with pytest.raises(RuntimeError, match="switched off by DYRELU_NATIVE=0"):
        fused.select_backend(torch.randn(2, 3))


def test_native_kernels_use_torch_threads_and_match_at_size(monkeypatch):
    """Big enough for the OpenMP loops to split rows (and, for pi, positions) across threads."""
    monkeypatch.setenv("DYRELU_FUSED_BACKEND", "native")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for variant, k in (("B", 2), ("C", 3), ("A", 1)):
            m = make(16, variant, k)
            x = torch.randn(3, 16, 40, 40, requires_grad=True)
            g = torch.randn(3, 16, 40, 40)
            y = m(x)
            grads = torch.autograd.grad(y, [x] + list(m.parameters()), g)
            x_ref = x.detach().requires_grad_()
            y_ref = m.forward_reference(x_ref)
            refs = torch.autograd.grad(y_ref, [x_ref] + list(m.parameters()), g)
            torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
            for got, want in zip(grads, refs):
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    finally:
        torch.set_num_threads(before)


def test_forced_triton_backend_still_raises(monkeypatch):
    pytest.importorskip("triton")
    tri = fused._triton
    monkeypatch.setenv("DYRELU_FUSED_BACKEND", "triton")
    monkeypatch.setattr(tri, "_OK", set())
    monkeypatch.setattr(fused._latch, "FAILED", {})
    monkeypatch.setattr(tri, "_apply_fwd_kernel", _RaisingKernel("_apply_fwd_kernel", []))
    x, a = torch.randn(2, 8, 5), torch.randn(2, 2, 8)
    with pytest.raises(RuntimeError, match="PTX compile failed"):
        tri.apply_forward(x, a, None, None)
    assert not fused._latch.FAILED


def test_device_guard_names_the_tensor_device():
    pytest.importorskip("triton")
    guard = fused._triton.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


# ---- the benchmark's outside baseline computes the same function --------------------------------------------
def _load_bench():
    return load_script("bench_act")


@pytest.mark.parametrize("shape,k", [((2, 8, 5, 7), 2), ((2, 8, 5, 7), 1), ((2, 8), 2)])
def test_public_style_baseline_matches_reference(shape, k):
    bench = _load_bench()
    m = make(8, "B", k)
    x = torch.randn(*shape)
    torch.testing.assert_close(bench.public_style_module(m)(x), m.forward_reference(x), atol=1e-5, rtol=1e-5)


def test_kernel_table_names_every_kernel_each_backend_implements():
    """backends.KERNELS is the kernel table: every kernel a backend module defines and every kernel an op
    or the prepared network asks ``backend.run`` for is one of its names, the table a newcomer reads
    (the module docstring) has a row for each, and every chain ends with the torch module."""
    import inspect
    import re

    from dyrelu.fused import backend, backends
    from dyrelu.fused.backends import bn, native, torch_ops, triton

    for module in (triton, native, bn, torch_ops):
        defined = {n for n, f in vars(module).items() if inspect.isfunction(f) and f.__module__ == module.__name__
                   and not n.startswith("_")}
        assert defined and defined <= set(backends.KERNELS), (module.__name__, defined - set(backends.KERNELS))
    asked = set()
    for path in ("dyrelu/fused/ops.py", "dyrelu/inference.py"):
        asked |= set(re.findall(r'backend\.run\("([a-z_]+)"', (ROOT / path).read_text()))
    assert asked and asked <= set(backends.KERNELS), asked - set(backends.KERNELS)
    rows = {line.split()[0] for line in backends.__doc__.splitlines() if line.startswith("  ") and line.split()}
    assert set(backends.KERNELS) <= rows, set(backends.KERNELS) - rows
    assert all(chain[-1] == "torch" for chain in backend.CHAINS.values())

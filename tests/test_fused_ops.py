"""The registered ops of dyrelu.fused (ops.py): opcheck, gradients, one path in every mode, no host sync."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import dyrelu
from dyrelu import DyReLU
from dyrelu.fused import ops
from dyrelu.fused.bn_act import BNDyReLU

DT = torch.float64


def _act(c, variant="B", k=2, use_bias=True, dyn=None, dtype=DT, seed=0):
    torch.manual_seed(seed)
    m = DyReLU(c, variant=variant, k=k, reduction=2, use_bias=use_bias, dynamic_segments=dyn, hyper_init="random",
               init_a=(1.0, 0.0, 0.5)[:k], init_b=(0.0, 0.1, 0.2)[:k])
    with torch.no_grad():
        m.fc2.weight.normal_(0, 0.5)
    return m.to(dtype)


def _weights(m, grad=False):
    return [p.detach().clone().requires_grad_(grad) for p in (m.fc1.weight, m.fc1.bias, m.fc2.weight, m.fc2.bias)]


def _consts(m):
    return [m.init_a, m.init_b, m.lambda_a, m.lambda_b]


def _ints(m):
    return [m.dynamic_segments, m.coef_width, m.use_bias]


def _coefs_args(m, x, grad=False):
    sw = None if m.spatial is None else m.spatial.weight.detach().clone().requires_grad_(grad)
    return (x, *_weights(m, grad), *_consts(m), sw, *_ints(m))


# ---- opcheck: schema, fake implementation, autograd registration, AOT dispatch ------------------------
def _opcheck(op, args):
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("variant,k,use_bias,dyn,shape", [
    ("B", 2, True, None, (2, 6, 4, 5)), ("A", 3, False, None, (3, 6, 7)), ("C", 1, True, None, (2, 6)),
    ("B", 3, True, 1, (2, 6, 3, 3)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_coefs_and_apply(variant, k, use_bias, dyn, shape, dtype):
    m = _act(shape[1], variant, k, use_bias, dyn, dtype)
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    _opcheck(torch.ops.dyrelu.coefs.default, _coefs_args(m, x, grad=True))
    a, b, _, _ = torch.ops.dyrelu.coefs(*_coefs_args(m, x.detach()))
    pi = torch.rand((shape[0], 1) + shape[2:], dtype=dtype, requires_grad=True) if variant == "C" else None
    for bb in (b, None):
        _opcheck(torch.ops.dyrelu.apply.default, (x, a.clone().requires_grad_(), bb, pi))
    g = torch.randn(shape, dtype=dtype)
    pi_d = None if pi is None else pi.detach()  # the backward ops are once differentiable
    _opcheck(torch.ops.dyrelu.apply_backward.default, (g, x.detach(), a, b, pi_d, pi is not None))


@pytest.mark.parametrize("shape,dtype", [((2, 1, 4, 5), torch.float32), ((3, 1, 7), torch.float64),
                                         ((2, 1, 4, 5), torch.bfloat16), ((1, 1, 1, 1), torch.float32)])
def test_spatial_pi_op_is_eq4_with_autograd_bits(shape, dtype):
    """dyrelu::spatial_pi computes the reference's Eq. 4, and on the CPU its backward runs the ATen ops
    autograd runs for it: the same bits forward and backward (the cutoff at 1 active: small tau)."""
    from dyrelu._hyper import spatial_attention

    z = (torch.randn(shape) * 3).to(dtype).requires_grad_()
    tau = torch.tensor(0.5)
    _opcheck(torch.ops.dyrelu.spatial_pi.default, (z, tau))
    _opcheck(torch.ops.dyrelu.spatial_pi_backward.default, (torch.randn(shape).to(dtype), z.detach(), tau))
    za = z.detach().clone().requires_grad_()
    pi, ref = torch.ops.dyrelu.spatial_pi(z, tau), spatial_attention(za, tau)
    assert torch.equal(pi, ref) and pi.dtype == dtype
    g = torch.randn(shape).to(dtype)
    pi.backward(g)
    ref.backward(g)
    assert torch.equal(z.grad, za.grad)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_opcheck_bn_ops(layout):
    m = _act(6, "C", 2, dtype=torch.float32)
    x = torch.randn(3, 6, 4, 5) * 2 + 1
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    _opcheck(torch.ops.dyrelu.moments.default, (x,))
    _opcheck(torch.ops.dyrelu.pool.default, (x,))
    mm, var, mu_b = torch.ops.dyrelu.moments(x.detach())
    weight, bias = torch.rand(6) + 0.5, torch.randn(6)
    sw = m.spatial.weight.detach().clone().requires_grad_()
    for mean, run_var, sws in ((None, None, sw), (torch.randn(6), torch.rand(6) + 0.5, None)):
        args = (x, mean, run_var, weight.clone().requires_grad_(), bias.clone().requires_grad_(), 1e-5,
                *_weights(m, grad=True), *_consts(m), sws, *_ints(m))
        _opcheck(torch.ops.dyrelu.bn_coefs.default, args)
        detached = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
        big_a, big_b, z, m_, mu_, var_, state = torch.ops.dyrelu.bn_coefs(*detached)
        batch = mean is None
        back = (torch.randn_like(big_a), torch.randn_like(big_b), None if sws is None else torch.randn_like(z),
                x.detach(), m_, mu_ if batch else mean, var_ if batch else run_var, batch, weight, bias,
                detached[6], detached[8], m.lambda_a, m.lambda_b, None if sws is None else sw.detach(), state,
                *_ints(m))
        _opcheck(torch.ops.dyrelu.bn_coefs_backward.default, back)
    rm, rv, nbt = torch.zeros(6), torch.ones(6), torch.tensor(0)
    for cumulative in (False, True):
        _opcheck(torch.ops.dyrelu.running_update.default, (rm, rv, nbt, mu_b, var, 0.1, cumulative, 60))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("variant,batch", [("B", True), ("A", False)])
def test_opcheck_bn_act(layout, variant, batch):
    m = _act(6, variant, 2, dtype=torch.float32)
    x = torch.randn(3, 6, 4, 5) * 2 + 1
    if layout == "nhwc":
        x = x.to(memory_format=torch.channels_last)
    mean, var = (None, None) if batch else (torch.randn(6), torch.rand(6) + 0.5)
    site = (x.requires_grad_(), mean, var, (torch.rand(6) + 0.5).requires_grad_(), torch.randn(6, requires_grad=True),
            1e-5, *_weights(m, grad=True), *_consts(m), *_ints(m))
    _opcheck(torch.ops.dyrelu.bn_act.default, site)
    y, big_a, big_b, mm, mu_b, var_b, state = torch.ops.dyrelu.bn_act(*(t.detach() if isinstance(t, torch.Tensor)
                                                                          else t for t in site))
    w1, _, w2, _ = _weights(m)
    back = (torch.randn_like(x), x.detach(), big_a, big_b, mm, mu_b if batch else mean, var_b if batch else var,
            batch, site[3].detach(), site[4].detach(), w1, w2, m.lambda_a, m.lambda_b, state, *_ints(m))
    _opcheck(torch.ops.dyrelu.bn_act_backward.default, back)


# ---- gradients of the hand-written backward ops, float64 -----------------------------------------------
@pytest.mark.parametrize("variant,k,use_bias,dyn", [("B", 2, True, None), ("A", 2, True, None), ("B", 3, False, 2),
                                                    ("C", 2, True, None)])
def test_gradcheck_coefs(variant, k, use_bias, dyn):
    m = _act(4, variant, k, use_bias, dyn)
    x = torch.randn(2, 4, 3, 2, dtype=DT, requires_grad=True)
    args = list(_coefs_args(m, x, grad=True))
    sw = args[9]
    inputs = [x, *args[1:5]] + ([sw] if sw is not None else [])

    def f(x, w1, b1, w2, b2, *maybe_sw):
        a, b, _, z = torch.ops.dyrelu.coefs(x, w1, b1, w2, b2, *args[5:9], *(maybe_sw or [None]), *args[10:])
        return (a, b, z) if maybe_sw else (a, b)

    assert torch.autograd.gradcheck(f, tuple(inputs))


@pytest.mark.parametrize("variant,affine,batch", [("B", True, True), ("A", True, False), ("C", False, True),
                                                  ("C", True, False)])
def test_gradcheck_bn_coefs(variant, affine, batch):
    """The statistics and coefficients of a site (and C's logits) against finite differences."""
    m = _act(4, variant)
    w1, b1, w2, b2 = _weights(m, grad=True)
    weight = (torch.rand(4, dtype=DT) + 0.5).requires_grad_() if affine else None
    bias = torch.randn(4, dtype=DT, requires_grad=True) if affine else None
    mean, var = (None, None) if batch else (torch.randn(4, dtype=DT), torch.rand(4, dtype=DT) + 0.5)
    x = torch.randn(3, 4, 2, 3, dtype=DT, requires_grad=True)
    ws = torch.randn(1, 4, 1, 1, dtype=DT, requires_grad=True) if variant == "C" else None
    inputs = [t for t in (x, weight, bias, w1, b1, w2, b2, ws) if t is not None]

    def f(*ts):
        it = iter(ts)
        x_ = next(it)
        weight_ = next(it) if affine else None
        bias_ = next(it) if affine else None
        w1_, b1_, w2_, b2_ = (next(it) for _ in range(4))
        ws_ = next(it) if variant == "C" else None
        big_a, big_b, z, *_ = torch.ops.dyrelu.bn_coefs(x_, mean, var, weight_, bias_, 1e-3, w1_, b1_, w2_, b2_,
                                                        *_consts(m), ws_, *_ints(m))
        return (big_a, big_b, z) if ws_ is not None else (big_a, big_b)

    assert torch.autograd.gradcheck(f, tuple(inputs))


@pytest.mark.parametrize("variant,affine,batch", [("B", True, True), ("A", True, False), ("B", False, True)])
def test_gradcheck_bn_act(variant, affine, batch):
    """The whole A / B site op (statistics, coefficients, apply; its backward by hand) against
    finite differences, in training (batch statistics) and with running statistics."""
    m = _act(4, variant, dyn=1 if variant == "B" and not affine else None)
    x = torch.randn(3, 4, 2, 3, dtype=DT, requires_grad=True)
    weight = (torch.rand(4, dtype=DT) + 0.5).requires_grad_() if affine else None
    bias = torch.randn(4, dtype=DT, requires_grad=True) if affine else None
    mean, var = (None, None) if batch else (torch.randn(4, dtype=DT), torch.rand(4, dtype=DT) + 0.5)
    w1, b1, w2, b2 = _weights(m, grad=True)
    inputs = [t for t in (x, weight, bias, w1, b1, w2, b2) if t is not None]

    def f(*ts):
        it = iter(ts)
        x_ = next(it)
        weight_ = next(it) if affine else None
        bias_ = next(it) if affine else None
        return torch.ops.dyrelu.bn_act(x_, mean, var, weight_, bias_, 1e-3, *it, *_consts(m), *_ints(m))[0]

    assert torch.autograd.gradcheck(f, tuple(inputs))


# ---- one path in every mode ---------------------------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.site1 = BNDyReLU(nn.BatchNorm2d(8), _act(8, "B", dtype=torch.float32))
        self.conv2 = nn.Conv2d(8, 8, 1, bias=False)
        self.site2 = BNDyReLU(nn.BatchNorm2d(8), _act(8, "C", dtype=torch.float32))
        self.conv3 = nn.Conv2d(8, 8, 1)
        self.act3 = _act(8, "A", k=3, dtype=torch.float32)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = self.act3(self.conv3(self.site2(self.conv2(self.site1(self.conv1(x))))))
        return self.head(x.mean((2, 3)))


def _reference(net):
    ref = copy.deepcopy(net)
    for mod in ref.modules():
        if isinstance(mod, DyReLU):
            mod.impl = "reference"
    return ref


def _grads(net, x):
    net.zero_grad(set_to_none=True)
    y = net(x)
    y.square().sum().backward()
    return y.detach(), [p.grad.clone() for p in net.parameters()]


def test_compile_fullgraph_runs_the_registered_ops():
    """torch.compile (fullgraph: zero graph breaks) of a net with plain and BN-fused sites of every
    variant: the graph holds the dyrelu:: ops (forward and backward) and gives the eager gradients."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def keep(g, _):
            graphs.append(g.code)
            return make_boxed_func(g)

        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    net = _Net().train()
    ref = _reference(net)
    x = torch.randn(2, 3, 7, 6)
    y_ref, g_ref = _grads(ref, x)
    compiled = torch.compile(net, backend=backend, fullgraph=True)
    y, g = _grads(compiled, x)
    fw, bw = graphs[0], graphs[-1]
    for op in ("dyrelu.coefs", "dyrelu.bn_coefs", "dyrelu.apply", "dyrelu.running_update", "dyrelu.bn_act"):
        assert f"torch.ops.{op}" in fw, op
    for op in ("dyrelu.apply_backward", "dyrelu.bn_coefs_backward", "dyrelu.coefs_backward",
               "dyrelu.bn_act_backward"):
        assert f"torch.ops.{op}" in bw, op
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for (name, a), b in zip(net.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6, msg=name)


def test_torch_export_sees_the_registered_ops():
    net = _Net().eval()
    x = torch.randn(2, 3, 7, 6)
    ep = torch.export.export(net, (x,))
    code = ep.graph_module.code
    for op in ("dyrelu.coefs", "dyrelu.bn_coefs", "dyrelu.apply", "dyrelu.bn_act"):
        assert f"torch.ops.{op}" in code, op
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), _reference(net)(x), atol=1e-5, rtol=1e-5)


# ---- no host sync in a training step ---------------------------------------------------------------------
class _NoSync(TorchDispatchMode):
    """Fails on any op that copies a device value to the host, inside the dyrelu:: ops too (their
    Python implementations run under this mode, so every ATen op they call is seen)."""

    SYNCS = ("aten::_local_scalar_dense", "aten::is_nonzero", "aten::item")

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.seen.add(name)
        if name in self.SYNCS:
            raise AssertionError(f"host sync: {name}")
        if name.startswith("dyrelu::"):
            impl = ops.IMPLS[name.split("::")[1]]
            with self:
                return impl(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_training_step_has_no_host_sync(momentum):
    net = _Net().train()
    for mod in net.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = momentum
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(2, 3, 7, 6)
    mode = _NoSync()
    with mode:
        for _ in range(2):
            loss = net(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    seen = {"dyrelu::running_update", "dyrelu::bn_coefs_backward", "dyrelu::bn_act_backward", "aten::lerp_"}
    assert seen <= mode.seen
    assert int(net.site1.bn.num_batches_tracked) == 2
    # the guard itself catches a sync
    with pytest.raises(AssertionError, match="host sync"), _NoSync():
        float(torch.ones(1).sum())


def test_fused_does_not_import_core():
    import ast
    import pathlib

    root = pathlib.Path(dyrelu.__file__).parent / "fused"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").endswith("core"), f"{path.name} imports {node.module}"

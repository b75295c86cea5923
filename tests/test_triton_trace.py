"""On CUDA, torch.compile / export's decompositions / AOTInductor trace our ops into Triton kernels.

Without a GPU: the tensors are fake CUDA tensors (``FakeTensorMode``) and ``aot_export_module``
traces under functionalization, as AOTAutograd does inside torch.compile. On the Triton backend each
``dyrelu::`` op's body is traced (ops.py ``_traced_body``): its launches become
``triton_kernel_wrapper_functional`` nodes (``torch.library.wrap_triton``) and no ``dyrelu::`` node
is left, the property AOTInductor needs to pack a network. On the CPU, and with symbolic shapes, the
same ops stay one opaque node each.

Tracing only; running the traced kernels is scripts/gpu_check.py's job (section t). Torch asks Triton
which arguments each kernel writes (its TTIR, for the driver's current target): here the driver is a
stub that names an sm_90 target, and the tests check the answer, since an argument wrongly taken as
written costs the compiled code a copy per launch.
"""
from __future__ import annotations

import collections

import pytest
import torch

pytest.importorskip("triton")

import models  # noqa: E402
from dyrelu import DyReLU  # noqa: E402
from torch._functorch.aot_autograd import aot_export_module  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


OUTPUTS = {"_row_moments_kernel": {"s1_ptr", "s2_ptr"}, "_affine_rows_kernel": {"out_ptr"},
           "_pool_kernel": {"part_ptr"}, "_apply_fwd_kernel": {"y_ptr"},
           "_apply_bwd_kernel": {"gx_ptr", "psx_ptr", "ps_ptr", "ppi_ptr"},
           "_site_fwd1_kernel": {"m_ptr", "r_ptr", "t_ptr", "mub_ptr", "varb_ptr", "ph_ptr", "hpre_ptr", "h_ptr"},
           "_site_fwd2_kernel": {"bA_ptr", "bB_ptr", "sig_ptr", "a_ptr"},
           "_site_bwd1_kernel": {"dlog_ptr", "dh_ptr", "gp_ptr", "gsp_ptr", "gtp_ptr"},
           "_site_bwd2_kernel": {"gw2_ptr", "gb2_ptr", "gw1_ptr", "gb1_ptr", "gw_ptr", "gbias_ptr", "gvar_ptr",
                                 "alpha_ptr", "coefp_ptr", "v_ptr", "gsw_ptr", "wsz_ptr"},
           "_site_dx_kernel": {"gx_ptr"}, "_running_kernel": {"rm_ptr", "rv_ptr", "nbt_ptr"},
           "_site_z_kernel": {"z_ptr"}, "_site_zgrad_kernel": {"zp_ptr", "zq_ptr"},
           "_pi_fwd_kernel": {"pi_ptr"}, "_pi_bwd_kernel": {"gz_ptr"}}


@pytest.fixture(autouse=True)
def _sm90_target(monkeypatch):
    """No GPU driver here: the one Triton asks for the current target says sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget

    class Stub:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    monkeypatch.setattr(triton.runtime.driver, "_active", Stub())


def _nodes(gm) -> collections.Counter:
    """dyrelu:: ops and Triton kernels (by name) in a traced graph."""
    seen = collections.Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            name = kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
            written = set(node.kwargs["tensors_to_clone"])
            assert written <= OUTPUTS[name], f"{name}: taken to write {sorted(written - OUTPUTS[name])}"
            seen["triton:" + name] += 1
        else:  # a mutating op is functionalized: auto_functionalized(op, ...)
            target = node.args[0] if "auto_functionalized" in str(node.target) else node.target
            if str(target).startswith("dyrelu."):
                seen[str(target)] += 1
    return seen


class _Call(torch.nn.Module):
    """forward(*tensors) = op(args with the tensors put back): an op call as an exportable module."""

    def __init__(self, op, args, slots):
        super().__init__()
        self.op, self.args, self.slots = op, args, slots

    def forward(self, *tensors):
        args = list(self.args)
        for (i, j), t in zip(self.slots, tensors):
            if j is None:
                args[i] = t
            else:
                args[i] = list(args[i])
                args[i][j] = t
        out = self.op(*args)
        return tuple(o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor))


def _site_calls(net, x) -> dict:
    """dyrelu:: op calls in one CPU training step: (op, which dims of its first tensor are 1) -> args,
    the first call of each (size-1 dims take other paths: _match's as_strided views)."""
    calls = {}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "dyrelu":
                first = next(a for a in args if isinstance(a, torch.Tensor))
                calls.setdefault((func, tuple(d == 1 for d in first.shape)), args)
            return func(*args, **(kwargs or {}))

    with Record():
        out = net(x)
        out.square().mean().backward()
    return calls


def _network(name: str, act: str, channels_last: bool):
    torch.manual_seed(0)
    if name == "DyReLU":  # the activation alone (no BN before it): dyrelu::coefs and apply
        net, x = DyReLU(16, variant=act[-1].upper()), torch.randn(2, 16, 5, 5)
    else:
        net, x = models.build_model(name, act=act, num_classes=10), torch.randn(2, 3, 32, 32)
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    return net.train(), x.requires_grad_(True)


def _export(op, args, device: str):
    """The op called on fake tensors of ``device`` (shapes, strides and dtypes of ``args``), traced."""
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        def fake(t):
            return mode.from_tensor(t).to(device) if device != "cpu" else mode.from_tensor(t)

        slots, tensors = [], []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                slots.append((i, None))
                tensors.append(fake(a))
            elif isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
                for j, t in enumerate(a):
                    slots.append((i, j))
                    tensors.append(fake(t))
        with torch.no_grad():
            gm, _ = aot_export_module(_Call(op, args, slots), tensors, trace_joint=False)
    return gm


@pytest.mark.parametrize("name, act, channels_last", [
    ("mbv2_035", "dyrelu_a", False), ("mbv2_035", "dyrelu_b", False), ("mbv2_035", "dyrelu_c", False),
    ("resnet10", "dyrelu_c", True),  # channels_last down to 1x1 maps
    ("DyReLU", "dyrelu_b", True), ("DyReLU", "dyrelu_c", False)])
def test_every_op_of_a_training_step_traces_into_triton_kernels_on_cuda(name, act, channels_last):
    calls = _site_calls(*_network(name, act, channels_last))
    ops_called = {op._opname for op, _ in calls}
    site = {"dyrelu_c": "bn_coefs"}.get(act, "bn_act") if name != "DyReLU" else "coefs"
    assert {site, site + "_backward"} <= ops_called, ops_called
    kernels = collections.Counter()
    for (op, _), args in calls.items():
        seen = _nodes(_export(op, args, "cuda"))
        left = [k for k in seen if k.startswith("dyrelu.")]
        assert not left, f"{op} left {left} in the traced graph"
        kernels.update(k for k in seen.elements() if k.startswith("triton:"))
    want = {"triton:_apply_fwd_kernel", "triton:_apply_bwd_kernel"}
    if name != "DyReLU":  # the BN site's statistics and their gradient
        want |= {"triton:_row_moments_kernel", "triton:_site_fwd1_kernel", "triton:_site_bwd1_kernel",
                 "triton:_site_dx_kernel"}
    assert want <= set(kernels), kernels


def test_on_the_cpu_each_op_stays_one_node():
    for (op, _), args in _site_calls(*_network("mbv2_035", "dyrelu_b", False)).items():
        seen = _nodes(_export(op, args, "cpu"))
        assert seen == {str(op): 1}, (op, seen)


@pytest.mark.parametrize("dynamic", [False, True])
def test_export_then_decompose_as_aotinductor_does(dynamic):
    """torch.export keeps the ops; decomposing the program as AOTInductor does traces them into their
    kernels, except with a symbolic batch size, where each stays one node (launch plans need shapes)."""
    torch.manual_seed(0)
    net = models.build_model("resnet10", act="dyrelu_b", num_classes=10).eval()
    sites = sum(1 for m in net.modules() if isinstance(m, DyReLU))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        net = net.to("cuda")
        x = mode.from_tensor(torch.empty(4, 3, 32, 32)).to("cuda")
        shapes = {"x": {0: torch.export.Dim("batch", min=2, max=512)}} if dynamic else None
        ep = torch.export.export(net, (x,), dynamic_shapes=shapes)
        kept = _nodes(ep.graph_module)
        assert kept["dyrelu.apply.default"] + kept["dyrelu.bn_act.default"] == sites, kept
        seen = _nodes(ep.run_decompositions(decompose_custom_triton_ops=True).graph_module)
    if dynamic:
        assert seen == kept, seen
    else:
        assert not [k for k in seen if k.startswith("dyrelu.")], seen
        assert seen["triton:_apply_fwd_kernel"] == sites


# ------------------------------------------------------------------------------------------------
# one joint training step (forward + backward), bf16 autocast, channels_last, through functionalization
# ------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _memoized_write_analysis(monkeypatch):
    """Torch's analysis of which arguments a kernel writes compiles its TTIR at every launch traced; the
    answer depends on the kernel and its constexprs only (every integer is unspecialised), so it is
    computed once per configuration here (a 2x faster test, the same answers)."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    cache, real = {}, tkw.get_mutated_tensors

    def memo(kernel_idx, constant_args_idx, kwargs, tma):
        fn = kernel_side_table.get_kernel(kernel_idx).fn
        consts = kernel_side_table.get_constant_args(constant_args_idx)
        names = {fn.arg_names[i] for i in fn.constexprs}
        key = (fn.__name__, tuple(sorted((k, str(v)) for k, v in consts.items() if k in names)),
               tuple(sorted((k, str(v.dtype)) for k, v in kwargs.items() if isinstance(v, torch.Tensor))))
        if key not in cache:
            cache[key] = real(kernel_idx, constant_args_idx, kwargs, tma)
        return cache[key]

    monkeypatch.setattr(tkw, "get_mutated_tensors", memo)


def _small_net():
    from torch import nn

    from dyrelu.fused.bn_act import BNDyReLU

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), BNDyReLU(nn.BatchNorm2d(8), DyReLU(8, variant="B", reduction=2)),
        nn.Conv2d(8, 8, 1), BNDyReLU(nn.BatchNorm2d(8), DyReLU(8, variant="C", reduction=2)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).train().to(memory_format=torch.channels_last)


def test_joint_training_step_bf16_channels_last_traces_into_triton_kernels():
    """A whole training step (forward, loss, backward) traced as AOTAutograd traces it (make_fx over
    functionalization, parameters and buffers as inputs) on fake CUDA tensors under bf16 autocast:
    every dyrelu:: op (B and C sites, forward and backward) is traced into its Triton kernels, none is
    left opaque. (AOTAutograd's own joint trace calls autograd's engine, which needs a CUDA driver for
    CUDA tensors even when they are fake; scripts/count_ops.backward walks the graph instead.)"""
    from runs import load_script
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    co = load_script("count_ops")
    net = _small_net()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        net = net.to("cuda")
        x = mode.from_tensor(torch.empty(2, 3, 6, 6)).to("cuda").contiguous(memory_format=torch.channels_last)
        names = [n for n, _ in net.named_parameters()]
        bnames = [n for n, _ in net.named_buffers()]

        def step(x, *tensors):
            bufs = dict(zip(bnames, tensors[:len(bnames)]))
            ps = [p.detach().requires_grad_(True) for p in tensors[len(bnames):]]
            with co.bf16_autocast():
                out = torch.func.functional_call(net, {**dict(zip(names, ps)), **bufs}, (x,))
                loss = out.float().square().mean()
            co.backward(loss, torch.ones_like(loss))
            return [p.grad for p in ps]

        gm = make_fx(dispatch_functionalize(step))(x, *net.buffers(), *[p.detach() for p in net.parameters()])
    seen = _nodes(gm)
    assert not [k for k in seen if k.startswith("dyrelu.")], seen
    per_site = {"_row_moments_kernel", "_site_fwd1_kernel", "_site_fwd2_kernel", "_apply_fwd_kernel", "_running_kernel",
                "_apply_bwd_kernel", "_site_bwd1_kernel", "_site_bwd2_kernel", "_site_dx_kernel"}
    assert all(seen["triton:" + k] == 2 for k in per_site), seen
    assert seen["triton:_site_z_kernel"] == seen["triton:_site_zgrad_kernel"] == 1, seen
    assert seen["triton:_pi_fwd_kernel"] == seen["triton:_pi_bwd_kernel"] == 1, seen


def test_a_second_batch_size_launches_the_same_kernel_configurations():
    """Integers are unspecialised: a recompile for another batch size (static shapes) traces the same
    Triton configurations, so Triton's cache serves every kernel again (nothing new to compile)."""
    from runs import load_script

    from dyrelu.fused import _triton

    co = load_script("count_ops")
    net = _small_net()
    configs = []
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        net = net.to("cuda")
        for batch in (2, 5):
            x = mode.from_tensor(torch.empty(batch, 3, 6, 6)).to("cuda").contiguous(memory_format=torch.channels_last)
            with _triton.record_launches() as launched, co._counter():
                with co.bf16_autocast():
                    loss = net(x).float().square().mean()
                co.backward(loss, torch.ones_like(loss))
            configs.append(set(launched))
    assert configs[0] == configs[1] and len(configs[0]) >= 9, configs

#!/usr/bin/env python
"""CUDA kernel launches per BN + activation site and per training step, counted without a GPU.

    python scripts/count_ops.py                          # the budget case (issue 31)
    python scripts/count_ops.py --model resnet10 --res 32 --per-op
    python scripts/count_ops.py --cpu                    # the older CPU dispatch count (issue 21)

On fake CUDA tensors (``FakeTensorMode``), eager mode, bf16 autocast and channels_last, one training
forward + backward (no optimizer step) runs under a ``TorchDispatchMode`` that counts:

* every ATen op that launches a kernel on CUDA: all of them except views, allocations
  (``empty*``), ``detach`` / ``alias`` and size queries; ``convolution_backward`` counts one launch per
  gradient it computes (cuDNN runs grad input and grad weight as separate kernels);
* every Triton launch: a ``dyrelu::`` op's Python implementation runs (not its fake) with
  ``_triton.record_launches`` active, so each launch is recorded by kernel name instead of run.

A host sync (``aten::_local_scalar_dense``: ``.item()``, ``bool(tensor)``) is counted apart and must be
zero in our ops. Eager only: ``torch.compile`` fuses the plain ops further (scripts/gpu_check.py).

Budgets (issue 31): a DY-ReLU-B site (BN included, forward + backward) <= 12 launches, a DY-ReLU-C
site <= 18, a MobileNetV2 x1.0 step with DY-ReLU-B <= 1.6x ReLU's. The LAST stdout line is one JSON
object with ``cuda_launches_per_site`` {relu, dyrelu_b, dyrelu_c}, ``cuda_launches_per_step``
{relu, dyrelu_b}, ``budgets``, ``within_budget``, ``host_syncs`` (and ``per_op`` with --per-op).
Exit status 1 when a count is over its budget.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys

from _bootstrap import ROOT  # noqa: F401  the checkout on sys.path (the framework is not installed)

ACTS = ("relu", "dyrelu_b", "dyrelu_c")
SITE_BUDGETS = {"dyrelu_b": 12, "dyrelu_c": 18}
STEP_RATIO_BUDGET = 1.6
CPU_BUDGETS = {"dyrelu_b": 2.0, "dyrelu_c": 3.0}

# ops that launch nothing on CUDA (besides views, found by ``OpOverload.is_view``)
_NO_LAUNCH = {"aten::empty", "aten::empty_strided", "aten::new_empty", "aten::new_empty_strided", "aten::empty_like",
              "aten::detach", "aten::alias", "aten::lift_fresh", "aten::_unsafe_view", "aten::sym_size",
              "aten::sym_stride", "aten::sym_numel", "aten::sym_storage_offset", "aten::is_same_size",
              "aten::_local_scalar_dense", "aten::set_", "aten::resize_"}


def _launches(func, args) -> int:
    """Kernel launches of one ATen op on CUDA (0 for views and allocations)."""
    name = func._schema.name
    if name in _NO_LAUNCH or func.is_view:
        return 0
    if name == "aten::convolution_backward":  # one kernel per requested gradient
        return max(1, sum(bool(b) for b in args[-1]))
    return 1


def _counter():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from dyrelu.fused import ops

    class Counter(TorchDispatchMode):
        """ATen launches by op name; a dyrelu:: op runs its implementation under this mode."""

        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()
            self.syncs = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func.namespace == "dyrelu":
                with self:  # the op's own ATen calls and Triton launches are what a GPU runs
                    return ops.IMPLS[func._opname](*args, **kwargs)
            if func._schema.name == "aten::_local_scalar_dense":
                self.syncs += 1
            out = func(*args, **kwargs)
            if func._schema.name == "aten::convolution" and args[0].is_contiguous(memory_format=torch.channels_last) \
                    and not out.is_contiguous(memory_format=torch.channels_last):
                # the meta convolution cannot ask cuDNN and returns bf16 outputs NCHW; cuDNN on a GPU keeps
                # channels_last, so the layout is restored (not counted: no such copy runs on a GPU)
                out = out.contiguous(memory_format=torch.channels_last)
            # a launch writes a CUDA tensor (prim::device, promote_types, CPU scalars launch nothing)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if any(isinstance(o, torch.Tensor) and o.device.type == "cuda" for o in outs):
                n = _launches(func, args)
                if n:
                    self.ops[func._schema.name] += n
            return out

    return Counter()


def backward(root, grad) -> None:
    """``root.backward(grad)`` without autograd's engine, which needs a CUDA driver for CUDA tensors (it
    queries the device's context to sync streams) even when they are fake: the graph's nodes are called
    in the engine's order (a node runs once all its consumers have run), gradients reaching the same
    input are summed with ``+`` (the engine's InputBuffer adds too: one launch each), and AccumulateGrad
    leaves are assigned (no launch, as after ``zero_grad(set_to_none=True)``)."""
    import torch

    deps, seen, stack = collections.Counter(), set(), [root.grad_fn]
    while stack:  # consumers per node
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                deps[nxt] += 1
                stack.append(nxt)
    pending = {root.grad_fn: {0: grad}}
    ready = [root.grad_fn]
    while ready:
        node = ready.pop()
        got = pending.pop(node)
        if type(node).__name__ == "AccumulateGrad":
            var = node.variable
            var.grad = got[0] if var.grad is None else var.grad + got[0]
            continue
        grads = [got.get(i) for i in range(len(node._input_metadata))]
        if callable(node):  # a C++ node
            outs = node(*grads)
            outs = outs if isinstance(outs, tuple) else (outs,)
        else:  # a Python Function's (ours): keep the gradients of its tensor arguments
            outs = node.apply(*grads)
            outs = outs if isinstance(outs, tuple) else (outs,)
            outs = [g for g, is_tensor in zip(outs, node.tensor_args) if is_tensor]
        for (nxt, slot), g in zip(node.next_functions, outs):
            if nxt is None:
                continue
            buf = pending.setdefault(nxt, {})
            if isinstance(g, torch.Tensor):
                meta = nxt._input_metadata[slot]
                if tuple(g.shape) != tuple(meta.shape):  # the engine reduces a broadcast gradient (one launch)
                    g = g.sum_to_size(meta.shape)
                buf[slot] = g if buf.get(slot) is None else buf[slot] + g
            deps[nxt] -= 1
            if deps[nxt] == 0:
                ready.append(nxt)


def _run_counted(fn):
    """(Counter of launches by name, ATen and 'triton:<kernel>', host syncs) of fn() on fake CUDA."""
    from dyrelu.fused import _triton

    counter = _counter()
    with _triton.record_launches() as names:
        with counter:
            fn()
    ops = counter.ops
    for name, _ in names:
        ops["triton:" + name] += 1
    _CONFIGS.update(names)
    return ops, counter.syncs


# every Triton configuration launched (kernel, constexprs, num_warps, dtypes) in the counted runs: each is
# one compiled kernel (integer arguments are not specialised), so a compiled step builds this many
_CONFIGS: set = set()


def _fake_cuda(modules, fn):
    """fn(mode, *modules on fake CUDA) under FakeTensorMode (modules are built outside it, on the CPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        return fn(mode, *[m.to("cuda") for m in modules])


def bf16_autocast():
    """autocast("cuda", bfloat16), which switches itself off where torch.cuda.is_available() is False."""
    import torch
    from unittest import mock

    with mock.patch.object(torch.cuda, "is_available", lambda: True), \
            mock.patch.object(torch.cuda, "is_bf16_supported", lambda *a, **k: True):
        return torch.autocast("cuda", dtype=torch.bfloat16)


def count_site(act: str, n: int = 8, c: int = 96, hw: int = 28, seed: int = 0):
    """Launches of one BN + activation site (forward + backward, training, bf16 autocast, channels_last)."""
    import torch
    from torch import nn

    import dyrelu
    from dyrelu.fused.bn_act import bn_dyrelu

    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(c).train()
    act_mod = (dyrelu.make_act(act, c) if act != "relu" else nn.ReLU(inplace=True)).train()

    def run(mode, bn, act_mod):
        x = mode.from_tensor(torch.empty(n, c, hw, hw)).to("cuda").to(torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
        gy = torch.empty_like(x)

        def step():
            with bf16_autocast():
                y = act_mod(bn(x)) if act == "relu" else bn_dyrelu(x, bn, act_mod)
            backward(y, gy)
        return _run_counted(step)
    return _fake_cuda((bn, act_mod), run)


def count_cuda_step(model_name: str, act: str, batch: int, res: int, num_classes: int = 1000, seed: int = 0):
    """Launches of one training step (forward, loss, backward) on fake CUDA, bf16 autocast, channels_last."""
    import torch
    import torch.nn.functional as F

    import models

    torch.manual_seed(seed)
    net = models.build_model(model_name, act=act, num_classes=num_classes).train()
    net = net.to(memory_format=torch.channels_last)  # (on the CPU: fake parameters cannot be swapped)

    def run(mode, net):
        x = mode.from_tensor(torch.empty(batch, 3, res, res)).to("cuda").contiguous(memory_format=torch.channels_last)
        y = mode.from_tensor(torch.zeros(batch, dtype=torch.long)).to("cuda")

        def step():
            with bf16_autocast():
                loss = F.cross_entropy(net(x), y)
            backward(loss, torch.ones_like(loss))
        return _run_counted(step)
    return _fake_cuda((net,), run)


def count_step(model_name: str, act: str, batch: int, res: int, num_classes: int = 10, seed: int = 0) -> collections.Counter:
    """(--cpu) Op name -> calls over one CPU training forward + backward: every op the dispatcher hands
    to Python, ATen and ``dyrelu::`` (an op counted once, the kernels inside it not)."""
    import torch
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    import models

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func._schema.name] += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(seed)
    net = models.build_model(model_name, act=act, num_classes=num_classes).train()
    x = torch.randn(batch, 3, res, res)
    y = torch.randint(0, num_classes, (batch,))
    F.cross_entropy(net(x), y).backward()  # lazily built state (native kernels, caches) is not part of a step
    net.zero_grad(set_to_none=True)
    counter = Counter()
    with counter:
        F.cross_entropy(net(x), y).backward()
    return counter.ops


def _main_cpu(args) -> int:
    counts = {act: count_step(args.model or "mbv2_035", act, args.batch or 8, args.res or 64) for act in ACTS}
    totals = {act: sum(c.values()) for act, c in counts.items()}
    ratios = {act: round(totals[act] / totals["relu"], 3) for act in ACTS if act != "relu"}
    ok = all(ratios[act] <= CPU_BUDGETS[act] for act in CPU_BUDGETS)
    out = {"model": args.model or "mbv2_035", "ops": totals, "ratios_to_relu": ratios, "budgets": CPU_BUDGETS,
           "within_budget": ok}
    if args.per_op:
        out["per_op"] = {act: dict(c.most_common()) for act, c in counts.items()}
    print(json.dumps(out))
    return 0 if ok else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="the step's network (default mbv2_100, MobileNetV2 x1.0)")
    p.add_argument("--batch", type=int, default=None, help="step batch (default 8: counts do not depend on it)")
    p.add_argument("--res", type=int, default=None, help="step resolution (default 224)")
    p.add_argument("--per-op", action="store_true", help="also list the launches of each op / kernel")
    p.add_argument("--cpu", action="store_true", help="the older CPU dispatched-op count instead")
    args = p.parse_args(argv)
    if args.cpu:
        return _main_cpu(args)
    model, batch, res = args.model or "mbv2_100", args.batch or 8, args.res or 224
    sites, steps, syncs, per_op = {}, {}, {}, {}
    for act in ACTS:
        ops, sync = count_site(act)
        sites[act] = sum(ops.values())
        syncs["site:" + act] = sync
        per_op["site:" + act] = dict(ops.most_common())
        print(f"site {act:<9} {sites[act]:>4} launches  " + ", ".join(f"{k} {v}" for k, v in ops.most_common()),
              flush=True)
    for act in ("relu", "dyrelu_b"):
        _CONFIGS.clear()
        ops, sync = count_cuda_step(model, act, batch, res)
        if act == "dyrelu_b":
            kernels = sorted(_CONFIGS)
        steps[act] = sum(ops.values())
        syncs["step:" + act] = sync
        per_op["step:" + act] = dict(ops.most_common())
        print(f"step {model} {act:<9} {steps[act]:>5} launches", flush=True)
    ratio = round(steps["dyrelu_b"] / steps["relu"], 3)
    ok = (all(sites[a] <= b for a, b in SITE_BUDGETS.items()) and ratio <= STEP_RATIO_BUDGET
          and not any(syncs.values()))
    out = {"model": model, "batch": batch, "res": res, "dtype": "bfloat16 autocast", "memory_format": "channels_last",
           "cuda_launches_per_site": sites, "triton_kernels_per_step": len(kernels), "cuda_launches_per_step": steps, "step_ratio_dyrelu_b_to_relu": ratio,
           "budgets": {"site": SITE_BUDGETS, "step_ratio": STEP_RATIO_BUDGET}, "host_syncs": syncs,
           "within_budget": ok}
    if args.per_op:
        out["per_op"] = per_op
        out["triton_kernels"] = [name + " " + " ".join(x if isinstance(x, str) else f"{x[0]}={x[1]}" for x in cfg)
                                 for name, cfg in kernels]
    print(json.dumps(out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

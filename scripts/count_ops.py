#!/usr/bin/env python
"""Dispatched ops per training step, DY-ReLU against ReLU: a launch-count proxy measured on the CPU.

    python scripts/count_ops.py                       # MobileNetV2 x0.35, batch 8, 64 px (the budget case)
    python scripts/count_ops.py --model resnet10 --batch 2 --res 32

One training step (forward, loss, backward; no optimizer step) of the same network built with each
activation, under a ``TorchDispatchMode`` that counts every op the dispatcher hands to Python: ATen
ops and the registered ``dyrelu::`` ops (an op is counted once; the kernels it runs inside are not).
On a GPU each counted op is at least one kernel launch, so where a step is launch-bound (issue 21:
small maps, big batches of tiny kernels) this count, not FLOPs, sets DY-ReLU's cost. Eager mode;
``torch.compile`` fuses the plain ops further (see scripts/gpu_check.py for kernels per step).

Budgets (issue 21): DY-ReLU-B at most 2x ReLU's ops, DY-ReLU-C at most 3x, on MobileNetV2 x0.35.
The LAST stdout line is one JSON object:
  {"model", "batch", "res", "ops": {act: total}, "per_op": {act: {op: count}} (with --per-op),
   "ratios_to_relu": {act: ratio}, "budgets": {act: budget}, "within_budget": bool}
Exit status 1 when a ratio is over its budget (so CI or a script can gate on it).
"""
from __future__ import annotations

import argparse
import collections
import json
import sys

from _bootstrap import ROOT  # noqa: F401  the checkout on sys.path (the framework is not installed)

ACTS = ("relu", "dyrelu_b", "dyrelu_c")
BUDGETS = {"dyrelu_b": 2.0, "dyrelu_c": 3.0}


def count_step(model_name: str, act: str, batch: int, res: int, num_classes: int = 10, seed: int = 0) -> collections.Counter:
    """Op name -> calls over one training forward + backward."""
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
    # one step first: lazily built state (native kernels, caches) is not part of a step
    F.cross_entropy(net(x), y).backward()
    net.zero_grad(set_to_none=True)
    counter = Counter()
    with counter:
        F.cross_entropy(net(x), y).backward()
    return counter.ops


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mbv2_035")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--acts", type=lambda s: s.split(","), default=list(ACTS),
                   help=f"comma-separated activations, relu first (default {','.join(ACTS)})")
    p.add_argument("--per-op", action="store_true", help="also list the count of each op")
    args = p.parse_args(argv)
    if "relu" not in args.acts:
        p.error(f"--acts={','.join(args.acts)} must include relu (the baseline)")
    counts = {act: count_step(args.model, act, args.batch, args.res) for act in args.acts}
    totals = {act: sum(c.values()) for act, c in counts.items()}
    ratios = {act: round(totals[act] / totals["relu"], 3) for act in args.acts if act != "relu"}
    budgets = {act: BUDGETS[act] for act in ratios if act in BUDGETS}
    ok = all(ratios[act] <= budgets[act] for act in budgets)
    out = {"model": args.model, "batch": args.batch, "res": args.res, "ops": totals, "ratios_to_relu": ratios,
           "budgets": budgets, "within_budget": ok}
    if args.per_op:
        out["per_op"] = {act: dict(c.most_common()) for act, c in counts.items()}
    print(json.dumps(out))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

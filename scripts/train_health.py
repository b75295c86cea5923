"""Training-health probe: run the real training loop and record, every few steps, what makes
DY-ReLU train well or badly.

    python scripts/train_health.py --every 25 --out runs/health/b act=dyrelu_b
    python scripts/train_health.py --every 25 --out runs/health/b_random act=dyrelu_b act.hyper_init=random

Takes ``train.py``'s overrides and trains exactly what ``train.py`` would (``engine.loop.run``),
with hooks attached to the model it builds (with ``model.fuse_bn_act=false``: the same function,
computed by the unfused modules that the hooks see). At every ``--every``-th optimizer step it writes one row
per layer to ``<out>/health.csv``:

* ``dyrelu`` rows: mean slope of the first and second segment (``a1``, ``a2``) and intercept (``b1``),
  their spread across the samples of the batch (std over samples, averaged over channels:
  ``a_spread``, ``b_spread``), and for DY-ReLU-C the attention's mean, its largest value and the
  share of positions it switches off, pi < 0.05 (``pi_mean``, ``pi_max``, ``pi_off``), how much it
  varies across the batch's images (``pi_input_var``, dyrelu/dynamics.py's definition), the spatial conv's
  weight norm (``spatial_w``) and the spread of the softmax's input over positions (``z_spread``: std
  over positions of the normalised logits divided by tau, averaged over samples; 0 is a flat pi);
* ``bn`` rows: how far the batch statistics are from the running statistics that evaluation uses
  (``bn_mean_shift`` = mean over channels of |batch mean - running mean| / running std,
  ``bn_var_ratio`` = mean of batch var / running var);
* one ``grad`` row: gradient norms of the hyper-function parameters (all DY-ReLU fc1/fc2/spatial
  weights) and of the conv weights, and the norms of those parameters.

At the end it prints one line per recorded step (medians over layers) and the run's epochs
(``metrics.csv``: train and validation loss, their ratio, top-1 or AP).
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

from _bootstrap import ROOT  # noqa: E402,F401  the checkout on sys.path (the framework is not installed)

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_pre_hook  # noqa: E402

import dyrelu  # noqa: E402
from dyrelu.dynamics import LayerDynamics  # noqa: E402

FIELDS = ["step", "layer", "kind", "a1", "a2", "b1", "a_spread", "b_spread", "pi_mean", "pi_max", "pi_off",
          "pi_input_var", "spatial_w", "z_spread",
          "bn_mean_shift", "bn_var_ratio", "hyper_grad", "conv_grad", "hyper_norm", "conv_norm"]


class HealthProbe:
    """Hooks on one model; rows are recorded on every ``every``-th training step."""

    def __init__(self, model: nn.Module, every: int):
        self.every, self.step, self.rows = int(every), 0, []
        self.dyrelus = [(n, m) for n, m in model.named_modules() if isinstance(m, dyrelu.DyReLU)]
        self.bns = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.hyper = [p for _, m in self.dyrelus for p in m.parameters()]
        hyper_ids = {id(p) for p in self.hyper}
        self.conv = [m.weight for m in model.modules() if isinstance(m, nn.Conv2d) and id(m.weight) not in hyper_ids]
        model.register_forward_pre_hook(self._count)
        for name, m in self.dyrelus:
            m.register_forward_hook(self._dyrelu_hook(name))
        for name, m in self.bns:
            m.register_forward_pre_hook(self._bn_hook(name))
        self._opt_hook = register_optimizer_step_pre_hook(self._grad_hook)

    def close(self) -> None:
        self._opt_hook.remove()

    def _active(self, module: nn.Module) -> bool:
        return module.training and self.step % self.every == 1 % self.every

    def _count(self, module, args) -> None:
        if module.training:
            self.step += 1

    def _dyrelu_hook(self, name: str):
        @torch.no_grad()
        def hook(module: dyrelu.DyReLU, args, out) -> None:
            if not self._active(module):
                return
            c = module.coefficients(args[0])
            a, b = c.a.float(), c.b.float()  # (N, K, C|1)
            row = {"step": self.step, "layer": name, "kind": "dyrelu", "a1": a[:, 0].mean().item(),
                   "a2": a[:, 1].mean().item() if a.shape[1] > 1 else "", "b1": b[:, 0].mean().item(),
                   "a_spread": a.std(0).mean().item() if a.shape[0] > 1 else 0.0,
                   "b_spread": b.std(0).mean().item() if b.shape[0] > 1 else 0.0}
            if c.pi is not None:
                pi = c.pi.float().flatten(1)
                row.update(pi_mean=pi.mean().item(), pi_max=pi.max(1).values.mean().item(),
                           pi_off=(pi < 0.05).float().mean().item(),
                           pi_input_var=LayerDynamics.pi_input_var_of(c.pi),
                           spatial_w=module.spatial.weight.float().norm().item(),
                           z_spread=_softmax_input(module, args[0]).flatten(1).std(1).mean().item())
            self.rows.append(row)
        return hook

    def _bn_hook(self, name: str):
        @torch.no_grad()
        def hook(module, args) -> None:
            if not self._active(module) or module.running_mean is None:
                return
            x = args[0].float()
            dims = [d for d in range(x.dim()) if d != 1]
            mean, var = x.mean(dims), x.var(dims)
            std = (module.running_var.float() + module.eps).sqrt()
            self.rows.append({"step": self.step, "layer": name, "kind": "bn",
                              "bn_mean_shift": ((mean - module.running_mean.float()).abs() / std).mean().item(),
                              "bn_var_ratio": (var / (module.running_var.float() + module.eps)).mean().item()})
        return hook

    @torch.no_grad()
    def _grad_hook(self, optimizer, args, kwargs) -> None:
        if self.step % self.every != 1 % self.every or not self.rows or self.rows[-1]["step"] != self.step:
            return

        def norm(ps, grad):
            ts = [p.grad if grad else p for p in ps if (p.grad is not None or not grad)]
            return torch.linalg.vector_norm(torch.stack([t.float().norm() for t in ts])).item() if ts else 0.0

        self.rows.append({"step": self.step, "layer": "all", "kind": "grad", "hyper_grad": norm(self.hyper, True),
                          "conv_grad": norm(self.conv, True), "hyper_norm": norm(self.hyper, False),
                          "conv_norm": norm(self.conv, False)})


def _softmax_input(module: dyrelu.DyReLU, x: torch.Tensor) -> torch.Tensor:
    """z / tau as the softmax of Eq. 4 sees it (after the logit normalisation), without touching the
    logit BatchNorm's running statistics."""
    xs = x if x.dim() == 4 else x.reshape(x.shape[0], x.shape[1], -1, 1)
    z = module.spatial(xs).float()
    if module.spatial_bn is not None:
        bn = module.spatial_bn
        z = nn.functional.batch_norm(z, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    elif module.spatial_norm == "std":
        z = dyrelu.core.standardise_logits(z)
    return z / module.tau.float()


def summarise(rows: list[dict]) -> list[str]:
    """One line per recorded step: medians over layers."""
    lines = []
    for step in sorted({r["step"] for r in rows}):
        at = [r for r in rows if r["step"] == step]

        def med(kind, key):
            vals = [float(r[key]) for r in at if r["kind"] == kind and r.get(key, "") != ""]
            return statistics.median(vals) if vals else float("nan")

        def top(kind, key):
            vals = [float(r[key]) for r in at if r["kind"] == kind and r.get(key, "") != ""]
            return max(vals) if vals else float("nan")

        g = next((r for r in at if r["kind"] == "grad"), {})
        line = (f"step {step:5d}  a1 {med('dyrelu', 'a1'):.3f} a2 {med('dyrelu', 'a2'):.3f} b1 {med('dyrelu', 'b1'):+.3f}"
                f"  spread a {med('dyrelu', 'a_spread'):.4f} (max {top('dyrelu', 'a_spread'):.3f}) b {med('dyrelu', 'b_spread'):.4f}"
                f"  bn shift {med('bn', 'bn_mean_shift'):.3f} (max {top('bn', 'bn_mean_shift'):.2f}) var ratio {med('bn', 'bn_var_ratio'):.2f}")
        if any(r.get("pi_mean", "") != "" for r in at):
            line += (f"  pi mean {med('dyrelu', 'pi_mean'):.3f} max {med('dyrelu', 'pi_max'):.3f}"
                     f" input var {med('dyrelu', 'pi_input_var'):.4f}"
                     f" off {med('dyrelu', 'pi_off'):.2f} (max {top('dyrelu', 'pi_off'):.2f})"
                     f"  |w_spatial| {med('dyrelu', 'spatial_w'):.2f} (max {top('dyrelu', 'spatial_w'):.2f})"
                     f"  z/tau spread {med('dyrelu', 'z_spread'):.3f} (max {top('dyrelu', 'z_spread'):.3f})")
        if g:
            line += (f"  |grad| hyper {g['hyper_grad']:.3f} conv {g['conv_grad']:.3f}"
                     f"  |w| hyper {g['hyper_norm']:.2f} conv {g['conv_norm']:.2f}")
        lines.append(line)
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=int, default=25, help="record every N-th training step (default 25)")
    parser.add_argument("--out", required=True, help="run folder (health.csv, metrics.csv, checkpoints)")
    parser.add_argument("overrides", nargs="*", help="train.py overrides, e.g. act=dyrelu_b seed=1")
    args = parser.parse_args(argv)

    from engine.config import compose
    from engine.errors import exit_on_user_error
    from engine.tasks.base import Task

    out = Path(args.out)
    with exit_on_user_error(out):
        # The fused BN + DY-ReLU op computes the same function without calling DyReLU.forward,
        # which the hooks need; the probe trains the unfused pair.
        cfg = compose(list(args.overrides) + ["trainer.progress=false", "model.fuse_bn_act=false"])
        from engine.loop import run

        probes = []
        build = Task.build_model

        def build_with_probe(self):
            model = build(self)
            probes.append(HealthProbe(model, args.every))
            return model

        Task.build_model = build_with_probe  # every task builds its model through this method
        try:
            for sub in Task.__subclasses__():
                if "build_model" in vars(sub):
                    raise RuntimeError(f"{sub.__name__} overrides Task.build_model; the probe would miss its model")
            run(cfg, out)
        finally:
            Task.build_model = build
            for p in probes:
                p.close()
    rows = probes[0].rows
    with open(out / "health.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    print("\n".join(summarise(rows)))
    with open(out / "metrics.csv") as f:
        for r in csv.DictReader(f):
            metric = next(k for k in ("top1", "ap") if k in r and r[k] != "")
            ratio = float(r["val_loss"]) / max(float(r["train_loss"]), 1e-12)
            print(f"epoch {int(r['epoch']):3d}  train_loss {float(r['train_loss']):.4g}  val_loss {float(r['val_loss']):.4g}"
                  f"  val/train {ratio:.3g}  {metric} {float(r[metric]):.2f}")
    print(f"rows: {out / 'health.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DY-ReLU's residual warmup (``trainer.dyrelu_warmup_epochs``).

Every DY-ReLU computes a^k = alpha^k + lambda_a * da^k(x) and b^k = beta^k + lambda_b * db^k(x) (Eq. 3).
The warmup ramps lambda_a and lambda_b of every DY-ReLU in the model linearly from 0 to their built
values over the first epochs, step by step, so a network whose hyper functions start away from zero
(``act.hyper_init=random``) begins as exactly its initial function (ReLU) and lets the dynamic residuals
in while the rest of the network settles, as a learning-rate warmup lets the steps grow
(docs/training-health.md has the evidence). The lambdas are buffers, so every path (reference, fused,
compiled) sees the ramp.

The targets are read from the freshly built model, before a checkpoint is loaded, so a run resumed
mid-warmup continues the same ramp from its global step.
"""
from __future__ import annotations

from typing import Optional

import torch


class ResidualWarmup:
    def __init__(self, model: torch.nn.Module, steps: int):
        from dyrelu import DyReLU

        self.steps = int(steps)
        self.targets = [(m, float(m.lambda_a), float(m.lambda_b)) for m in model.modules() if isinstance(m, DyReLU)]
        self.done = False

    @classmethod
    def from_config(cls, cfg, model: torch.nn.Module, steps_per_epoch: int) -> Optional["ResidualWarmup"]:
        epochs = float(cfg.trainer.get("dyrelu_warmup_epochs") or 0.0)
        warmup = cls(model, round(epochs * steps_per_epoch))
        return warmup if warmup.steps > 0 and warmup.targets else None

    @torch.no_grad()
    def __call__(self, global_step: int) -> None:
        """Set the lambdas for the optimizer step that follows ``global_step`` steps."""
        if self.done:
            return
        frac = min(1.0, global_step / self.steps)
        for m, lambda_a, lambda_b in self.targets:
            m.lambda_a.fill_(lambda_a * frac)
            m.lambda_b.fill_(lambda_b * frac)
        self.done = frac >= 1.0

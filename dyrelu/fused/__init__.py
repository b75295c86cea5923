"""Fast paths for DyReLU behind custom autograd Functions (placeholder dispatch: reference)."""
from __future__ import annotations

import torch


def supports(module, x: torch.Tensor) -> bool:
    return False


def forward(module, x: torch.Tensor) -> torch.Tensor:
    raise NotImplementedError

"""trainer.deterministic=true: deterministic kernels only, and the model changes that need."""
from __future__ import annotations

import os

import torch


def use_deterministic_algorithms() -> None:
    """Deterministic kernels, or an error naming the operation that has none (warn_only=False)."""
    # cuBLAS needs a fixed workspace to be deterministic (CUDA docs, "Reproducibility";
    # torch.use_deterministic_algorithms raises without it). Set before the first cuBLAS call.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=False)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


class GlobalAvgPool2d(torch.nn.Module):
    """AdaptiveAvgPool2d(1) as a mean: the same numbers, and a backward that
    torch.use_deterministic_algorithms accepts on CUDA (AdaptiveAvgPool2d's raises there)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3), keepdim=True)


def use_deterministic_pooling(module: torch.nn.Module) -> torch.nn.Module:
    """Replace every global AdaptiveAvgPool2d by GlobalAvgPool2d (no parameters or buffers, so
    checkpoints are unchanged)."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.AdaptiveAvgPool2d) and child.output_size in (1, (1, 1)):
            setattr(module, name, GlobalAvgPool2d())
        else:
            use_deterministic_pooling(child)
    return module

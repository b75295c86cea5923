"""Fast path of DyReLU: the same function as ``DyReLU.forward_reference``, with fused kernels.

``supports(module, x)`` says whether the fast path applies; ``forward(module, x)`` runs it:
pooled = mean over the spatial dims, (a, b) = module.hyper(pooled), pi = module.attention(x)
for variant C, then the fused apply (``piecewise_apply``, a custom autograd Function with a
hand-written one-pass backward). See function.py for the backends (Triton on CUDA, ATen
batch-norm loops on the CPU, plain torch ops under torch.compile) and README.md (Performance).
"""
from __future__ import annotations

import torch

from .function import (
    BACKENDS,
    DyReLUApply,
    DyReLUApplyTraceable,
    forced_backend,
    global_pool,
    piecewise_apply,
    select_backend,
)

__all__ = [
    "supports", "forward", "piecewise_apply", "global_pool", "select_backend", "forced_backend",
    "DyReLUApply", "DyReLUApplyTraceable", "BACKENDS", "SUPPORTED_DTYPES",
]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
SUPPORTED_DEVICES = ("cpu", "cuda")


def _exporting() -> bool:
    """TorchScript tracing / scripting and ONNX export must see the reference ops."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return True
    try:
        return bool(torch.onnx.is_in_onnx_export())
    except Exception:  # pragma: no cover - onnx module missing pieces
        return False


def _functorch_wrapped(x: torch.Tensor) -> bool:
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))
    except Exception:  # pragma: no cover
        return False


def supports(module, x: torch.Tensor) -> bool:
    """True where the fused path computes ``module``'s output on ``x``.

    CPU and CUDA tensors of float32 / float64 / bfloat16 / float16, shape (N, C, ...) with
    N >= 1; eager or under torch.compile. False under torch.jit tracing or scripting and ONNX
    export (the reference ops are exported), under torch.func transforms (vmap / grad), on
    other devices, and for empty inputs -- the reference path then runs.
    """
    if _exporting():
        return False
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != getattr(module, "channels", -1):
        return False
    if x.dtype not in SUPPORTED_DTYPES or x.device.type not in SUPPORTED_DEVICES or x.numel() == 0:
        return False
    if not torch.compiler.is_compiling() and _functorch_wrapped(x):
        return False
    return True


def _attention_native(module, x: torch.Tensor):
    """``module.attention(x)`` with the spatial 1x1 conv on the native CPU kernels (variant C)."""
    if module.spatial is None:
        return None
    from .bn_act import _spatial_logits

    w = module.spatial.weight
    return module.spatial_pi(_spatial_logits(x, w.view(-1).to(x.dtype), x.new_zeros(1)))


def forward(module, x: torch.Tensor) -> torch.Tensor:
    """The module's output on ``x`` through the fused apply (caller checked ``supports``)."""
    module._check(x)
    if torch.compiler.is_compiling():
        pooled = global_pool(x, "torch")
        a, b = module.hyper(pooled)
        b = b if module.has_intercept else None
        return DyReLUApplyTraceable.apply(x, a, b, module.attention(x))
    backend = select_backend(x)
    pooled = global_pool(x, backend)
    a, b = module.hyper(pooled)
    pi = module.attention(x) if backend != "native" or x.dim() != 4 else _attention_native(module, x)
    b = b if module.has_intercept else None
    return DyReLUApply.apply(x, a, b, pi, backend)

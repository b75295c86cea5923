"""Fast path of DyReLU: the same function as ``DyReLU.forward_reference``, as registered ops.

``supports(module, x)`` says whether the fast path applies; ``forward(module, x)`` runs it: one
``dyrelu::coefs`` op (pool, FC1, ReLU, FC2, 2 sigmoid - 1, the coefficients of Eq. 3, and variant
C's spatial logits z), for C ``dyrelu::spatial_pi`` or ``module.spatial_pi(z)`` (the module owns pi's math), and one
``dyrelu::apply`` op. Eager mode, torch.compile, CUDA graphs and torch.export run these same ops;
each picks its kernels at run time (``backend.py``: Triton on CUDA, C kernels or ATen loops on the
CPU). See ops.py, and docs/performance.md for what it costs.

This package imports ``dyrelu._hyper``, never ``dyrelu.core`` (core imports this package).
"""
from __future__ import annotations

import torch

from . import backend, ops
from .function import BACKENDS, forced_backend, global_pool, piecewise_apply, select_backend
from .._hyper import in_export_context

__all__ = [
    "supports", "forward", "pi_from_logits", "piecewise_apply", "global_pool", "select_backend", "forced_backend",
    "BACKENDS", "SUPPORTED_DTYPES", "backend", "ops",
]

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
SUPPORTED_DEVICES = ("cpu", "cuda")


def _functorch_wrapped(x: torch.Tensor) -> bool:
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(x))
    except Exception:  # pragma: no cover
        return False


def supports(module, x: torch.Tensor) -> bool:
    """True where the fused path computes ``module``'s output on ``x``.

    CPU and CUDA tensors of float32 / float64 / bfloat16 / float16, shape (N, C, ...) with
    N >= 1; eager, under torch.compile and under torch.export. False under torch.jit tracing or
    scripting and ONNX export (the reference ops are exported), under torch.func transforms (vmap /
    grad), on other devices, and for empty inputs -- the reference path then runs.
    """
    if in_export_context():
        return False
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != getattr(module, "channels", -1):
        return False
    if x.dtype not in SUPPORTED_DTYPES or x.device.type not in SUPPORTED_DEVICES or x.numel() == 0:
        return False
    # (Dynamo traces through functorch's own wrappers; the check itself does not trace)
    if not torch.compiler.is_compiling() and _functorch_wrapped(x):
        return False
    return True


def pi_from_logits(module, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Variant C's pi (N, 1, *spatial) from its logits z through ``module.spatial_pi`` (the module owns
    that math: normalisation, softmax, cutoff); where that is Eq. 4 alone (no logit normalisation),
    through ``dyrelu::spatial_pi``, the same function in one op (one launch per direction on CUDA)."""
    if module.spatial_bn is None and module.spatial_norm == "none":
        return torch.ops.dyrelu.spatial_pi(z, module.tau)  # the softmax runs over all positions, any rank
    if x.dim() == 4:
        return module.spatial_pi(z)
    # other ranks: spatial_pi sees (N, 1, L, 1), as the reference's attention does
    return module.spatial_pi(z.reshape(x.shape[0], 1, -1, 1)).reshape(z.shape)


def forward(module, x: torch.Tensor) -> torch.Tensor:
    """The module's output on ``x`` through the registered ops (caller checked ``supports``)."""
    module._check(x)
    spatial_w = None if module.spatial is None else module.spatial.weight
    a, b, _, z = torch.ops.dyrelu.coefs(x, module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias,
                                        module.init_a, module.init_b, module.lambda_a, module.lambda_b, spatial_w,
                                        module.dynamic_segments, module.coef_width, module.use_bias)
    pi = None if spatial_w is None else pi_from_logits(module, x, z)
    return torch.ops.dyrelu.apply(x, a, b if module.has_intercept else None, pi)

"""Which kernels run a fused op on a given tensor: the one place that decides.

The registered ops (ops.py) ask ``choose(x)`` at run time, inside their implementations, so
eager, torch.compile, CUDA graphs and torch.export all run the same kernels; nothing is decided
while tracing.

  triton  CUDA tensors when Triton imports (CPU tensors too when TRITON_INTERPRET=1 and forced with
          DYRELU_FUSED_BACKEND=triton: that is how the tests run the kernels). A kernel
          configuration whose first launch raises warns once and runs the torch kernels from then
          on, unless the backend was forced, which raises instead;
  native  CPU float32 / float64, NC-contiguous, K <= 3: the one-pass C kernels (_native.py), and the
          fused BN's coefficient math in C++;
  bn      CPU otherwise (no C compiler, half dtypes): ATen batch-norm loops used as per-(n, c)
          affine / reduction kernels (_torch_kernels.py);
  torch   plain broadcast ops: any device, any layout.

``DYRELU_FUSED_BACKEND`` = auto (default) | triton | native | bn | torch overrides the choice; its
value is parsed and checked once per distinct value (train.py checks it with the config).
"""
from __future__ import annotations

import functools
import os

import torch

from ..errors import BadValueError
from . import _native, _triton

BACKENDS = ("auto", "triton", "native", "bn", "torch")


@functools.lru_cache(maxsize=8)
def _parse(raw: str) -> str:
    value = raw or "auto"
    if value not in BACKENDS:
        raise BadValueError(f"DYRELU_FUSED_BACKEND={value!r} is not one of {BACKENDS}")
    return value


def forced() -> str:
    """``DYRELU_FUSED_BACKEND`` ("auto" when unset), checked: a value outside BACKENDS is a user error."""
    return _parse(os.environ.get("DYRELU_FUSED_BACKEND", "auto"))


def strict() -> bool:
    """Forced Triton: launch errors propagate (debugging) instead of falling back."""
    return forced() == "triton"


def choose(x: torch.Tensor) -> str:
    """The backend for kernels reading ``x``: triton, native, bn or torch."""
    want = forced()
    if want == "triton" and not _triton.available(x.device):
        raise RuntimeError(
            f"DYRELU_FUSED_BACKEND=triton but Triton cannot run on {x.device} "
            "(CUDA needs a GPU; CPU tensors need TRITON_INTERPRET=1 set before triton is imported)"
        )
    if want == "native" and _native.library() is None:
        raise RuntimeError(f"DYRELU_FUSED_BACKEND=native but the native CPU kernels are not available: {_native.error()}")
    if want != "auto":
        return want
    if x.device.type == "cuda" and _triton.available(x.device):
        return "triton"
    if x.device.type == "cpu":
        return "native" if x.dtype in _native.DTYPES and _native.library() is not None else "bn"
    return "torch"


def native(x3: torch.Tensor, k: int = 1) -> bool:
    """The C kernels take this (N, C, L) view (chosen backend native, dtype, layout, K)."""
    return choose(x3) == "native" and _native.ok(x3, k)


def native_coefs(m: torch.Tensor, w1: torch.Tensor) -> bool:
    """The fused BN's coefficient math runs in C++ (``dyrelu_cpu::bn_coefs``) for these statistics m (N, C)
    and hyper-function weights: chosen backend native, float32 / float64, no autocast."""
    return choose(m) == "native" and _native.coefs_ok(m, w1)


def triton(x: torch.Tensor) -> bool:
    return choose(x) == "triton"

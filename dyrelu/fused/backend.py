"""Which kernels run a fused op on a given tensor: the one place that decides, and the kernel table.

The registered ops (ops.py) call ``run(kernel, x, ...)`` at run time, inside their implementations, so
eager, torch.compile, CUDA graphs and torch.export all run the same kernels; nothing is decided
while tracing. ``choose(x)`` picks the first backend; ``kernels(x)`` is its chain of backend modules
(``backends/``: one module per backend, the same kernel names in each).

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
from .backends import bn as _k_bn, native as _k_native, torch_ops as _k_torch, triton as _k_triton

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


# the order in which the backend modules are asked, by the backend ``choose`` picks: the first module
# whose kernel returns a result computes it (backends/__init__.py has the table of kernels)
CHAINS = {"triton": ("triton", "torch"), "native": ("native", "bn", "torch"), "bn": ("bn", "torch"),
          "torch": ("torch",)}
MODULES = {"triton": _k_triton, "native": _k_native, "bn": _k_bn, "torch": _k_torch}
_CHAIN_MODULES = {first: tuple(MODULES[name] for name in chain) for first, chain in CHAINS.items()}


def kernels(x: torch.Tensor) -> tuple:
    """The backend modules for kernels reading ``x``, in the order they are asked."""
    return _CHAIN_MODULES[choose(x)]


def run(name: str, on: torch.Tensor, *args, **kwargs):
    """Kernel ``name`` on ``args`` from the first module of ``kernels(on)`` that implements it and takes the
    input, or None where none does (the caller composes the result from smaller kernels). ``on`` is the
    tensor the kernel reads (x; the chain depends on its device and dtype). A module whose kernel failed
    has warned once, through the one failure latch (``_latch``), and returns None."""
    for module in kernels(on):
        fn = getattr(module, name, None)
        if fn is not None:
            out = fn(*args, **kwargs)
            if out is not None:
                return out
    return None

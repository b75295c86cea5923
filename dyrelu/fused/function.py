"""The fused apply behind a custom autograd Function, and the backend choice.

``piecewise_apply(x, a, b, pi)`` computes ``max_k(a_k x + b_k)`` (times ``pi`` for variant C)
for x of shape (N, C, *spatial), a and b of shape (N, K, C|1), pi of shape (N, 1, *spatial).
Forward saves only x, a, b (and pi), no K-sized temporaries; backward recomputes the winning
segment and returns grad_x = g * a_sel [* pi], grad_a_k = sum_L(g x [sel == k]),
grad_b_k = sum_L(g [sel == k]) and, for C, grad_pi = sum_c(g * max_k(...)): one pass over
(g, x) in the Triton kernel; on the CPU a few in-place / read-only ATen passes (see
_torch_kernels.py). Ties pick the lowest k.

Backends (``select_backend``):
  triton  CUDA tensors when Triton imports (CPU tensors too when TRITON_INTERPRET=1 and
          forced with DYRELU_FUSED_BACKEND=triton: that is how the tests run the kernels).
          A kernel configuration whose first launch raises (compile error, unsupported GPU)
          warns once and runs the torch kernels from then on; K > 3 always does. Forced
          DYRELU_FUSED_BACKEND=triton raises instead;
  native  CPU eager, float32 / float64, NC-contiguous, K <= 3: the one-pass C kernels of
          _cpu_kernels.c (built at first use, see _native.py);
  bn      CPU eager otherwise (no C compiler, half dtypes): ATen batch-norm loops used as
          per-(n, c) affine / reduction kernels;
  torch   plain broadcast ops: any device, any layout, and always under torch.compile,
          where Dynamo traces this Function (forward and backward) into the graph and
          Inductor fuses the ops.
``DYRELU_FUSED_BACKEND`` = auto (default) | triton | native | bn | torch overrides the choice.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from ..errors import BadValueError
from . import _native
from . import _torch_kernels as tk
from . import _triton

BACKENDS = ("auto", "triton", "native", "bn", "torch")


def forced_backend() -> str:
    """``DYRELU_FUSED_BACKEND`` ("auto" when unset), checked: a value outside BACKENDS is a user error.

    train.py checks it with the config, before anything is built."""
    forced = os.environ.get("DYRELU_FUSED_BACKEND", "auto") or "auto"
    if forced not in BACKENDS:
        raise BadValueError(f"DYRELU_FUSED_BACKEND={forced!r} is not one of {BACKENDS}")
    return forced


def select_backend(x: torch.Tensor) -> str:
    if torch.compiler.is_compiling():
        return "torch"
    forced = forced_backend()
    if forced == "triton" and not _triton.available(x.device):
        raise RuntimeError(
            f"DYRELU_FUSED_BACKEND=triton but Triton cannot run on {x.device} "
            "(CUDA needs a GPU; CPU tensors need TRITON_INTERPRET=1 set before triton is imported)"
        )
    if forced == "native" and _native.library() is None:
        raise RuntimeError(f"DYRELU_FUSED_BACKEND=native but the native CPU kernels are not available: {_native.error()}")
    if forced != "auto":
        return forced
    if x.device.type == "cuda" and _triton.available(x.device):
        return "triton"
    if x.device.type == "cpu":
        return "native" if x.dtype in _native.DTYPES and _native.library() is not None else "bn"
    return "torch"


def _as3d(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C, L) without a copy when the spatial dims collapse (NCHW, NHWC)."""
    n, c = x.shape[:2]
    try:
        return x.view(n, c, -1)
    except RuntimeError:
        return x.reshape(n, c, -1)


def _unview(t: torch.Tensor, shape) -> torch.Tensor:
    """``t`` reshaped to ``shape`` as a tensor of its own (not an autograd view) where possible.

    Autograd adds a second gradient into the first one in place only when the first is not a
    view; a view here costs one extra full-size pass (out-of-place add) at every DyReLU input.
    """
    if torch.compiler.is_compiling():
        return t.reshape(shape)
    if tuple(t.shape) == tuple(shape) and not t._is_view():
        return t
    try:
        return torch.ops.aten._unsafe_view(t, shape)
    except RuntimeError:
        return t.reshape(shape)


def _coef(t: Optional[torch.Tensor], cdt: torch.dtype) -> Optional[torch.Tensor]:
    return None if t is None else t.to(cdt)


def _pi3(pi: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    return None if pi is None else pi.reshape(n, 1, -1).contiguous()


def _forward_kernels(ctx, x, a, b, pi, backend):
    """Runs the forward kernels; on the bn backend leaves the row constants in ``ctx.rows``."""
    n, c = x.shape[0], x.shape[1]
    x3 = _as3d(x)
    cdt = tk.compute_dtype(x.dtype)
    af, bf, pi3 = _coef(a, cdt), _coef(b, cdt), _pi3(pi, n)
    y3 = _triton.apply_forward(x3, af, bf, pi3) if backend == "triton" else None  # None: fell back
    if backend == "native" and x.dtype == cdt and _native.ok(x3, a.shape[1]):
        if ctx is not None:
            ctx.native = True
        y3 = _native.forward(x3, af.contiguous(), None if bf is None else bf.contiguous(),
                             None if pi3 is None else pi3.to(x.dtype))
    elif y3 is None and backend in ("native", "bn") and tk.bn_ok(x3):
        rows = tk.Rows(af, bf, c)
        if ctx is not None:
            ctx.rows = rows
        y3 = tk.bn_forward(x3, rows, pi3)
    elif y3 is None:
        y3 = tk.torch_forward(x3, af, bf, pi3)
    return _unview(y3, x.shape)


def _backward_kernels(ctx, g, x, a, b, pi, backend, need_pi):
    n = x.shape[0]
    x3 = _as3d(x)
    g3 = _as3d(g)
    cdt = tk.compute_dtype(x.dtype)
    pi3 = _pi3(pi, n)
    if getattr(ctx, "native", False):
        af, bf = _coef(a, cdt).contiguous(), None if b is None else _coef(b, cdt).contiguous()
        return _native.backward(g3.contiguous(), x3, af, bf, None if pi3 is None else pi3.to(x.dtype), need_pi)
    rows = getattr(ctx, "rows", None)
    if backend in ("native", "bn") and rows is not None:
        return tk.bn_backward(g3, x3, rows, pi3, need_pi, cdt)
    af, bf = _coef(a, cdt), _coef(b, cdt)
    if backend == "triton":
        out = _triton.apply_backward(g3, x3, af, bf, pi3, need_pi)
        if out is not None:
            return out
    return tk.torch_backward(g3, x3, af, bf, pi3, need_pi)


def _grads(ctx, x, a, b, pi, gx3, sum_gx, sum_g, gpi):
    gx = _unview(gx3, x.shape) if (ctx.needs_input_grad[0] and gx3 is not None) else None
    grad_a = grad_b = grad_pi = None
    if ctx.needs_input_grad[1]:
        grad_a = sum_gx if a.shape[2] == sum_gx.shape[2] else sum_gx.sum(2, keepdim=True)
        grad_a = grad_a.to(a.dtype)
    if b is not None and ctx.needs_input_grad[2]:
        grad_b = sum_g if b.shape[2] == sum_g.shape[2] else sum_g.sum(2, keepdim=True)
        grad_b = grad_b.to(b.dtype)
    if pi is not None and ctx.needs_input_grad[3]:
        grad_pi = gpi.reshape(pi.shape).to(pi.dtype)
    return gx, grad_a, grad_b, grad_pi


class _NoAutocast:
    """Autocast off inside the kernels (they pick their own dtypes); free when autocast is off."""

    def __init__(self, device_type: str):
        self.cm = torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else None

    def __enter__(self):
        if self.cm is not None:
            self.cm.__enter__()

    def __exit__(self, *exc):
        if self.cm is not None:
            self.cm.__exit__(*exc)


class DyReLUApply(torch.autograd.Function):
    """y = max_k(a_k x + b_k) [* pi]; eager kernels (triton / bn / torch), once differentiable."""

    @staticmethod
    def forward(ctx, x, a, b, pi, backend):
        with _NoAutocast(x.device.type):
            y = _forward_kernels(ctx, x, a, b, pi, backend)
        ctx.save_for_backward(x, a, b, pi)
        ctx.backend = backend
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, gy):
        x, a, b, pi = ctx.saved_tensors
        need_pi = pi is not None and ctx.needs_input_grad[3]
        with _NoAutocast(x.device.type):
            out = _backward_kernels(ctx, gy, x, a, b, pi, ctx.backend, need_pi)
        return _grads(ctx, x, a, b, pi, *out) + (None,)


class DyReLUApplyTraceable(torch.autograd.Function):
    """The same Function with torch-op kernels only, for torch.compile (Dynamo traces it)."""

    @staticmethod
    def forward(ctx, x, a, b, pi):
        y = _forward_kernels(None, x, a, b, pi, "torch")
        ctx.save_for_backward(x, a, b, pi)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, a, b, pi = ctx.saved_tensors
        need_pi = pi is not None and ctx.needs_input_grad[3]
        out = _backward_kernels(None, gy, x, a, b, pi, "torch", need_pi)
        return _grads(ctx, x, a, b, pi, *out)


class GlobalPool(torch.autograd.Function):
    """Mean over the spatial dims (Triton kernel on the triton backend, ATen mean otherwise).

    Backward returns g / L *broadcast* (an expand, never materialised): autograd adds it into
    the input's gradient with one in-place pass, where ``mean``'s own backward first writes a
    full-size tensor and then adds it.
    """

    @staticmethod
    def forward(ctx, x, backend):
        x3 = _as3d(x)
        ctx.shape, ctx.length = x.shape, x3.shape[2]
        if backend == "triton":
            pooled = _triton.pool(x3)
            if pooled is not None:
                return pooled.to(x.dtype)
        return x3.mean(2)

    @staticmethod
    def backward(ctx, gp):
        g = gp / ctx.length
        return g.reshape(g.shape + (1,) * (len(ctx.shape) - 2)).expand(ctx.shape), None


def global_pool(x: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C) mean over the spatial dims; (N, C) is returned as is."""
    if x.dim() == 2:
        return x
    if torch.compiler.is_compiling():
        return x.mean(dim=tuple(range(2, x.dim())))
    return GlobalPool.apply(x, select_backend(x) if backend is None else backend)


def piecewise_apply(x: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor] = None,
                    pi: Optional[torch.Tensor] = None, backend: Optional[str] = None) -> torch.Tensor:
    """max_k(a_k x + b_k) [* pi] with the fused forward and one-pass backward."""
    if x.dim() < 2 or a.dim() != 3 or a.shape[0] != x.shape[0] or a.shape[2] not in (1, x.shape[1]):
        raise ValueError(f"piecewise_apply: x {tuple(x.shape)} needs a of shape (N, K, C|1), got {tuple(a.shape)}")
    if b is not None and b.shape != a.shape:
        raise ValueError(f"piecewise_apply: b {tuple(b.shape)} must match a {tuple(a.shape)}")
    if torch.compiler.is_compiling():
        return DyReLUApplyTraceable.apply(x, a, b, pi)
    backend = select_backend(x) if backend is None else backend
    return DyReLUApply.apply(x, a, b, pi, backend)

"""BatchNorm2d followed by DY-ReLU, fused: ``bn_dyrelu(x, bn, act)`` == ``act(bn(x))``.

The BN output is affine in its input per channel, z = s x + t with s = gamma / sqrt(var + eps) and
t = beta - mu s, and every DY-ReLU segment is affine in z, so

    y = max_k(a_k z + b_k) = max_k(A_k x + B_k),   A_k = a_k s,  B_k = a_k t + b_k     (per (n, c))

is the existing fused apply (``piecewise_apply``) run on the *conv output* x with folded
coefficients: z is never written, and only x is kept for backward (the unfused pair keeps x for BN
and z for DY-ReLU). The statistics come from one read of x: ``Moments`` returns the per-(n, c)
means and variances; the channel mean and variance follow from them (law of total variance), and
the pooled context the hyper function needs is m_nc s + t, so DY-ReLU's pooling pass is gone too.
Variant C's spatial conv on z is a conv on x with weights w s and bias sum(w t).

Backward: the apply's per-(n, c, k) sums of g x and g (already computed for grad a, b) give
grad A, B, hence grad s, t and, through autograd on (C,)-sized tensors, grad gamma, beta, mu, var.
``Moments``' backward turns grad m_nc and grad var into one per-(n, c) affine pass over x
(grad_x += alpha_c x + beta_nc), which autograd adds into the apply's grad_x in place. So the
BN's own backward reductions ride on the apply's.

Where the fusion does not apply (see ``supports_bn_act``: a BN subclass such as ``SyncBatchNorm``
or the engine's global batch norm, whose statistics need collectives; a non-DyReLU activation;
``impl="reference"``; tracing / export; unsupported inputs) ``bn_dyrelu`` returns ``act(bn(x))``.
Training-mode statistics and running-stat updates follow ``torch.nn.BatchNorm2d`` exactly
(momentum or cumulative average, unbiased running variance, num_batches_tracked).
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import _native
from . import _torch_kernels as tk
from . import _triton_bn
from .function import global_pool, piecewise_apply, select_backend

__all__ = ["bn_dyrelu", "supports_bn_act", "BNDyReLU", "Moments", "moments"]

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------
# statistics: per-(n, c) mean and channel variance in one read of x
# ---------------------------------------------------------------------------------------
def _as3d(x: Tensor) -> Tensor:
    n, c = x.shape[:2]
    try:
        return x.view(n, c, -1)
    except RuntimeError:
        return x.reshape(n, c, -1)


_TRITON_FAILED: list = []  # the first launch error, once one happened (then torch ops from then on)


def _use_triton(x: Tensor) -> bool:
    if torch.compiler.is_compiling():  # plain torch ops: Dynamo traces them and Inductor fuses them
        return False
    return not _TRITON_FAILED and select_backend(x) == "triton" and _triton_bn.available(x.device)


def _strict() -> bool:
    """DYRELU_FUSED_BACKEND=triton: launch errors propagate (debugging) instead of falling back."""
    return os.environ.get("DYRELU_FUSED_BACKEND", "") == "triton"


def _triton_or_none(launch, *args):
    """Runs a Triton launcher; a failure warns once and switches these kernels to torch ops, so a
    compile or launch problem on some GPU cannot kill a training run."""
    try:
        return launch(*args)
    except Exception as err:
        if _strict():
            raise
        _TRITON_FAILED.append(repr(err))
        warnings.warn(f"dyrelu fused BN + DY-ReLU: Triton kernel {launch.__name__} failed ({err!r}); "
                      "using torch ops for its statistics from now on", RuntimeWarning, stacklevel=3)
        return None


def _on_native(x3: Tensor) -> bool:
    """Eager, and the native CPU kernels take this (N, C, L) tensor."""
    return not torch.compiler.is_compiling() and select_backend(x3) == "native" and _native.ok(x3, 1)


def _rows_ok(x3: Tensor) -> bool:
    """The CPU batch-norm-loop kernels apply (eager only)."""
    return not torch.compiler.is_compiling() and tk.bn_ok(x3)


def _moments_forward(x3: Tensor, cdt: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(per-(n, c) mean, per-(n, c) biased variance) over L, both (N, C) in ``cdt``.

    CPU: two passes over the (1, N*C, L) row view that ATen runs vectorised and in parallel: the
    row means, then the inference-mode BN backward (sums only) with g = x and mean = the row mean,
    which gives sum (x - m) x and sum x per row in one read; sum (x - m)^2 follows exactly in math.
    (``torch.var_mean`` and the training-mode BN statistics take 5 to 20 times longer here.) In
    float32 the variance keeps a relative error of about 2e-8 * (mean / std)^2 of a row.
    """
    n, c, l = x3.shape
    if _use_triton(x3):
        got = _triton_or_none(_triton_bn.row_moments, x3)
        if got is not None:
            return got
    if x3.dtype == cdt and _on_native(x3):
        return _native.row_moments(x3)
    if _rows_ok(x3):
        rows = n * c
        x1 = x3.view(1, rows, l)
        m = x1.mean(2, dtype=cdt).view(rows)
        zeros, ones = tk._consts(rows, cdt)
        _, s_xc, s_x = torch.ops.aten.native_batch_norm_backward(
            x1, x1, ones, m, ones, None, None, False, 0.0, [False, True, True])
        v = (s_xc.to(cdt) - m * (s_x.to(cdt) - l * m)) / l
        return m.view(n, c), v.view(n, c)
    xc = x3 if x3.dtype == cdt else x3.to(cdt)
    m = xc.mean(2)
    return m, (xc - m[:, :, None]).square().mean(2)


class Moments(torch.autograd.Function):
    """x (N, C, *spatial) -> (m (N, C): mean over the spatial dims, var (C,): biased variance over
    batch and space), in float32 (float64 for float64 x). One read of x forward, one affine pass back."""

    @staticmethod
    def forward(ctx, x: Tensor):
        x3 = _as3d(x)
        cdt = tk.compute_dtype(x.dtype)
        m, v = _moments_forward(x3, cdt)
        mu = m.mean(0)
        # law of total variance: within-row variance plus the variance of the row means (exact)
        var = v.mean(0) + (m - mu).square_().mean(0)
        ctx.save_for_backward(x, mu)
        return m, var

    @staticmethod
    def backward(ctx, g_m: Optional[Tensor], g_var: Optional[Tensor]):
        x, mu = ctx.saved_tensors
        n, c = x.shape[0], x.shape[1]
        x3 = _as3d(x)
        length = x3.shape[2]
        cdt = mu.dtype
        # d m_nc / dx = 1 / L;  d var / dx = 2 (x - mu) / M  (the mean's own term cancels)
        alpha = torch.zeros(c, dtype=cdt, device=x.device) if g_var is None else g_var.to(cdt) * (2.0 / (n * length))
        beta = -(alpha * mu)
        beta = beta.expand(n, c) if g_m is None else g_m.to(cdt) / length + beta
        return _affine_rows(x3, alpha, beta).reshape(x.shape)


def _affine_rows(x3: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """alpha_c x + beta_nc on (N, C, L), output like x (a fresh tensor, one pass)."""
    n, c, l = x3.shape
    if _use_triton(x3):
        got = _triton_or_none(_triton_bn.affine_rows, x3, alpha.contiguous(), beta.contiguous())
        if got is not None:
            return got
    if _rows_ok(x3):
        rows = n * c
        zeros, ones = tk._consts(rows, alpha.dtype)
        w = alpha.expand(n, c).reshape(rows)
        out = torch.batch_norm(x3.view(1, rows, l), w, beta.reshape(rows), zeros, ones, False, 0.0, 0.0, False)
        return out.view(n, c, l)
    return (x3 * alpha[None, :, None] + beta[:, :, None]).to(x3.dtype)


class SpatialLogits(torch.autograd.Function):
    """Variant C's logits, a 1x1 conv with one output channel, z = sum_c w_c x + bias, on the native
    CPU kernels: one read of x forward; backward one read of x and one write of grad_x. (ATen's
    convolution backward for this shape took 10x longer on the benchmark network.)"""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, bias: Tensor):
        ctx.save_for_backward(x, w)
        z = _native.spatial_forward(_as3d(x), w.contiguous(), bias.contiguous())
        return z.view((x.shape[0], 1) + tuple(x.shape[2:]))

    @staticmethod
    def backward(ctx, gz: Tensor):
        x, w = ctx.saved_tensors
        gx, gw = _native.spatial_backward(_as3d(x), w.contiguous(), gz.reshape(x.shape[0], -1).contiguous())
        return gx.view(x.shape), gw, gz.sum().reshape(1)


def _spatial_logits(x: Tensor, w: Tensor, bias: Tensor) -> Tensor:
    """conv1x1(x; w (C,), bias (1,)) with one output channel (native kernels where they apply)."""
    c = x.shape[1]
    if w.dtype == x.dtype == bias.dtype and _on_native(_as3d(x)):
        return SpatialLogits.apply(x, w, bias)
    return F.conv2d(x, w.view(1, c, 1, 1), bias)


def moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Differentiable (per-(n, c) spatial mean (N, C), channel biased variance (C,))."""
    return Moments.apply(x)


# ---------------------------------------------------------------------------------------
# the fused pair
# ---------------------------------------------------------------------------------------
def supports_bn_act(bn: nn.Module, act: nn.Module, x: Tensor) -> bool:
    """True where ``bn_dyrelu`` runs the fused path (otherwise it computes ``act(bn(x))``)."""
    from ..core import DyReLU, _in_export_context
    from . import supports

    # exactly BatchNorm2d: SyncBatchNorm and the engine's global BN compute their statistics with
    # collectives across ranks, which the fused statistics pass does not do
    if type(bn) is not nn.BatchNorm2d or not isinstance(act, DyReLU) or act.impl == "reference":
        return False
    if x.dim() != 4 or x.shape[1] != bn.num_features or _in_export_context():
        return False
    return supports(act, x)


def _running_update(bn: nn.BatchNorm2d, mu: Tensor, var: Tensor, count: int) -> None:
    """BatchNorm2d's running-stat update: momentum (or cumulative average), unbiased variance."""
    with torch.no_grad():
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:
                factor = 1.0 / float(bn.num_batches_tracked)
        unbiased = var * (count / (count - 1))
        bn.running_mean.lerp_(mu.to(bn.running_mean.dtype), factor)
        bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), factor)


def bn_dyrelu(x: Tensor, bn: nn.Module, act: nn.Module) -> Tensor:
    """``act(bn(x))``, fused where ``supports_bn_act(bn, act, x)``; same values and gradients."""
    if not supports_bn_act(bn, act, x):
        return act(bn(x))
    act._check(x)
    n, c = x.shape[0], x.shape[1]
    batch_stats = bn.training or bn.running_mean is None
    if batch_stats:
        count = x.numel() // c
        if count <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        m, var = Moments.apply(x)
        mu = m.mean(0)
        if bn.training and bn.track_running_stats and bn.running_mean is not None:
            _running_update(bn, mu.detach(), var.detach(), count)
    else:
        m = global_pool(x).to(tk.compute_dtype(x.dtype))
        mu, var = bn.running_mean, bn.running_var
    cdt = m.dtype
    s = torch.rsqrt(var.to(cdt) + bn.eps)
    if bn.affine:
        s = s * bn.weight.to(cdt)
        t = torch.addcmul(bn.bias.to(cdt), mu.to(cdt), s, value=-1.0)
    else:
        t = -mu.to(cdt) * s
    pooled = torch.addcmul(t, m, s)  # DY-ReLU's context: the spatial mean of the BN output
    autocast = torch.is_autocast_enabled(x.device.type)
    a, b = act.hyper(pooled if autocast else pooled.to(act.fc1.weight.dtype))
    a, b = a.to(cdt), b.to(cdt)
    big_a = a * s  # (N, K, W) * (C,) -> (N, K, C)
    big_b = torch.addcmul(b, a, t)  # t != 0 in general: an intercept even without DY-ReLU's own
    pi = None
    if act.spatial is not None:
        w = act.spatial.weight.view(c)
        ws = w * s.to(w.dtype)
        bias = (w * t.to(w.dtype)).sum().reshape(1)
        z = _spatial_logits(x, ws if autocast else ws.to(x.dtype), bias if autocast else bias.to(x.dtype))
        pi = act.spatial_pi(z)
    return piecewise_apply(x, big_a, big_b, pi)


class BNDyReLU(nn.Module):
    """``bn`` then ``act`` (a DyReLU) as one module, fused by ``bn_dyrelu``; state_dict keys
    ``bn.*`` and ``act.*`` are those of ``nn.Sequential(bn, act)`` named ``bn`` / ``act``."""

    def __init__(self, bn: nn.BatchNorm2d, act: nn.Module):
        super().__init__()
        self.bn = bn
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return bn_dyrelu(x, self.bn, self.act)

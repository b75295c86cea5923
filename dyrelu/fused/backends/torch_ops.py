"""The torch backend: plain broadcast ATen ops, any device, any layout; the last module of every chain,
so each kernel here handles every input."""
from __future__ import annotations

import torch

from ... import _hyper
from .. import _torch_kernels as tk
from .._tensors import acc_dtype

Tensor = torch.Tensor


def apply(x3, a, b, pi3):
    return tk.torch_forward(x3, a, b, pi3)


def apply_backward(g3, x3, a, b, pi3, need_pi):
    return tk.torch_backward(g3, x3, a, b, pi3, need_pi)


def pool(x3):
    return x3.mean(2)


def pool_acc(x3):
    return x3.mean(2, dtype=acc_dtype(x3.dtype))


def row_moments(x3, cdt):
    xc = x3 if x3.dtype == cdt else x3.to(cdt)
    m = xc.mean(2)
    return m, (xc - m[:, :, None]).square().mean(2)


def affine_rows(x3, alpha, beta):
    return (x3 * alpha[None, :, None] + beta[:, :, None]).to(x3.dtype)


def spatial_z(x3, ws, bias):
    z = torch.matmul(ws, x3.to(ws.dtype))
    return z if bias is None else z + bias


def spatial_z_backward(x3, ws, gz2):
    """(ws_c gz_nl in the compute dtype, grad ws)."""
    return ws[None, :, None] * gz2[:, None, :], torch.einsum("ncl,nl->c", x3.to(ws.dtype), gz2)


def spatial_pi(z, tau):
    return _hyper.spatial_attention(z, tau)


def spatial_pi_backward(g, z, tau):
    """The ATen ops autograd runs for ``spatial_attention`` (no normalisation), in its order: its bits."""
    zf = z.flatten(1)
    dt = torch.promote_types(zf.dtype, torch.float32)
    s = torch.softmax(zf.to(dt) / tau.to(dt), dim=1)
    gamma = zf.shape[1] / 3.0
    gq = torch.where(s * gamma > 1.0, 0.0, g.reshape(zf.shape).to(dt))  # clamp(max=1)'s backward
    gu = torch._softmax_backward_data(gq * gamma, s, 1, dt)
    return (gu / tau.to(dt)).reshape(z.shape).to(z.dtype)


def running_update(running_mean, running_var, num_batches_tracked, mu, var, momentum, cumulative, count):
    factor: object = 0.0 if cumulative else momentum
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if cumulative:
            factor = num_batches_tracked.to(running_mean.dtype).reciprocal()
    unbiased = var * (count / (count - 1))
    running_mean.lerp_(mu.to(running_mean.dtype), factor)
    running_var.lerp_(unbiased.to(running_var.dtype), factor)
    return True

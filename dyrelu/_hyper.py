"""The hyper function of DY-ReLU (Eq. 2-3) as pure functions of tensors, and its hand-written backward.

``DyReLU.hyper`` (core.py) and the registered coefficient ops (fused/ops.py) both compute their
coefficients here, and variant C's spatial attention (Eq. 4), so the math is written once; ``fused``
imports this module, never ``core``.

theta = 2 * sigmoid(FC2(ReLU(FC1(pooled)))) - 1, laid out as (N, 2|1, m, W) (Eq. 2)
a = init_a + lambda_a * da,  b = init_b + lambda_b * db, segments beyond m stay at init (Eq. 3)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def in_export_context() -> bool:
    """True while tracing / scripting for TorchScript or exporting to ONNX: these see plain torch ops.

    torch.export and torch.compile are not in this list: they capture the registered ``dyrelu::``
    ops of the fused path."""
    return bool(torch.jit.is_scripting() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export())


def pool(x: Tensor) -> Tensor:
    """Global average pool over every dim after the channel dim: (N, C, ...) -> (N, C)."""
    return x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x


def coef_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """The normalisation runs in at least float32 (autocast-safe)."""
    return torch.promote_types(logits_dtype, torch.float32)


def hyper(pooled: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
          init_a: Tensor, init_b: Tensor, lambda_a: Tensor, lambda_b: Tensor,
          segments: int, width: int, use_bias: bool, k: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """(N, C) pooled context -> a, b (N, K, width) in >= float32. Without intercepts b is init_b.

    k: the number of segments (init_a's length; pass it as a Python int where shapes are traced)."""
    _, _, _, a, b = hyper_state(pooled, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, segments, width,
                                use_bias, k)
    return a, b


def hyper_state(pooled: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                init_a: Tensor, init_b: Tensor, lambda_a: Tensor, lambda_b: Tensor,
                segments: int, width: int, use_bias: bool, k: Optional[int] = None):
    """``hyper`` with what its backward needs: (FC1's output h_pre, h = ReLU(h_pre), sig = sigmoid of
    FC2's output, a, b)."""
    h_pre = F.linear(pooled, w1, b1)
    h = F.relu(h_pre)
    sig, a, b = from_logits(F.linear(h, w2, b2), init_a, init_b, lambda_a, lambda_b, segments, width, use_bias, k)
    return h_pre, h, sig, a, b


def from_logits(logits: Tensor, init_a: Tensor, init_b: Tensor, lambda_a: Tensor, lambda_b: Tensor,
                segments: int, width: int, use_bias: bool, k: Optional[int] = None):
    """FC2's output (N, (2|1) * segments * width) -> (sig, a, b): Eq. 2's normalisation and Eq. 3.

    The static twin (static.py) feeds its learned constants here in place of FC2's output."""
    k = init_a.shape[0] if k is None else k
    dt = coef_dtype(logits.dtype)
    sig = torch.sigmoid(logits.to(dt))
    theta = 2.0 * sig - 1.0
    theta = theta.unflatten(1, (2 if use_bias else 1, segments, width))  # (N, 2|1, m, W)
    da = theta[:, 0]
    db = theta[:, 1] if use_bias else None
    if segments < k:  # the last k - m segments stay at their init values (Table 6)
        da = F.pad(da, (0, 0, 0, k - segments))
        db = F.pad(db, (0, 0, 0, k - segments)) if db is not None else None
    a = init_a.to(dt).reshape(1, k, 1) + lambda_a.to(dt) * da
    b_init = init_b.to(dt).reshape(1, k, 1)
    b = b_init + lambda_b.to(dt) * db if db is not None else b_init.expand_as(a)
    return sig, a, b


def hyper_backward(ga: Optional[Tensor], gb: Optional[Tensor], pooled: Tensor, w1: Tensor, b1: Optional[Tensor],
                   w2: Tensor, b2: Optional[Tensor], lambda_a: Tensor, lambda_b: Tensor,
                   segments: int, width: int, use_bias: bool):
    """Gradients of ``hyper`` (a, b) with respect to (pooled, w1, b1, w2, b2), given ga, gb (N, K, W).

    The small FC chain is recomputed (N x C work); its products run in the weights' dtype, the
    sigmoid's derivative in the coefficients' dtype, as the forward does."""
    p = pooled.to(w1.dtype)
    h_pre = F.linear(p, w1, b1)
    h = F.relu(h_pre)
    logits = F.linear(h, w2, b2)
    sig = torch.sigmoid(logits.to(coef_dtype(logits.dtype)))
    gp, gw1, gb1, gw2, gb2 = hyper_backward_from(ga, gb, p, h_pre, h, sig, w1, w2, lambda_a, lambda_b, segments,
                                                 width, use_bias)
    return gp.to(pooled.dtype), gw1, gb1 if b1 is not None else None, gw2, gb2 if b2 is not None else None


def hyper_backward_from(ga: Optional[Tensor], gb: Optional[Tensor], p: Tensor, h_pre: Tensor, h: Tensor, sig: Tensor,
                        w1: Tensor, w2: Tensor, lambda_a: Tensor, lambda_b: Tensor, segments: int, width: int,
                        use_bias: bool):
    """``hyper_backward`` given the forward's p (the context in the weights' dtype), h_pre, h and sig
    (``hyper_state``): (grad p in p's dtype, w1, b1, w2, b2)."""
    dt = sig.dtype
    n = p.shape[0]

    def part(g, lam):  # d theta of one half; an absent gradient is zero
        if g is None:
            return torch.zeros((n, segments, width), dtype=dt, device=p.device)
        return g[:, :segments].to(dt) * lam.to(dt)

    dtheta = torch.stack([part(ga, lambda_a), part(gb, lambda_b)], 1) if use_bias else part(ga, lambda_a)[:, None]
    dlogits = (dtheta.reshape(n, -1) * (2.0 * sig * (1.0 - sig))).to(w2.dtype)
    gw2 = dlogits.t() @ h
    gb2 = dlogits.sum(0)
    dh = (dlogits @ w2).masked_fill_(h_pre <= 0, 0.0)
    gw1 = dh.t() @ p
    gb1 = dh.sum(0)
    return dh @ w1, gw1, gb1, gw2, gb2


def spatial_attention(z: torch.Tensor, tau: torch.Tensor, standardise: bool = False) -> torch.Tensor:
    """pi = min(gamma * softmax(z / tau), 1) over all positions, gamma = positions / 3 (Eq. 4).

    z: (N, 1, *spatial). ``standardise`` first divides z by its standard deviation over positions,
    per sample (the softmax ignores the mean). Computed in (at least) float32, returned in z's dtype.
    """
    zf = (standardise_logits(z) if standardise else z).flatten(1)
    dt = torch.promote_types(zf.dtype, torch.float32)
    attn = torch.softmax(zf.to(dt) / tau.to(dt), dim=1) * (zf.shape[1] / 3.0)
    return attn.clamp(max=1.0).reshape(z.shape).to(z.dtype)


def standardise_logits(z: torch.Tensor) -> torch.Tensor:
    """z (N, 1, *spatial) divided by its standard deviation over positions, per sample (float32 or wider)."""
    zf = z.flatten(1)
    zf = zf.to(torch.promote_types(zf.dtype, torch.float32))
    return (zf / (zf.std(dim=1, correction=0, keepdim=True) + 1e-5)).reshape(z.shape)

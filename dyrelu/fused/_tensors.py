"""Tensor helpers every kernel module of the fused path shares: the (N, C, L) view, outputs with the
strides the fake implementations promise, placeholders, autocast off, and the one accumulation-dtype
rule."""
from __future__ import annotations

from typing import Optional

import torch

from .._hyper import coef_dtype

Tensor = torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every kernel accumulates and keeps coefficients in: float64 for float64, else float32
    (the hyper function's rule, ``_hyper.coef_dtype``; one rule for every backend)."""
    return coef_dtype(dtype)


def as3d(x: Tensor) -> Tensor:
    """(N, C, *spatial) -> (N, C, L) without a copy when the spatial dims collapse (NCHW, NHWC)."""
    n, c = x.shape[:2]
    try:
        return x.view(n, c, -1)
    except RuntimeError:
        return x.reshape(n, c, -1)


def strides_like(like: Tensor) -> tuple:
    return torch.empty_like(like, device="meta").stride()


def match(t: Tensor, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``t`` (a fresh tensor) reshaped to ``like``'s shape with the strides ``empty_like(like)`` has.

    Never an autograd view of ``t`` where the strides already agree: autograd adds a second gradient
    into a first in place only when the first is not a view."""
    dtype = like.dtype if dtype is None else dtype
    t = t.to(dtype)
    if tuple(t.shape) != tuple(like.shape):
        try:
            t = torch.ops.aten._unsafe_view(t, like.shape)
        except RuntimeError:
            t = t.reshape(like.shape)
    if t.stride() == like.stride():  # the common case (like dense, t in its layout): no meta tensor
        return t
    want = strides_like(like)
    if t.stride() == want or all(s == w for s, w, d in zip(t.stride(), want, t.shape) if d > 1):
        return t if t.stride() == want else t.as_strided(t.shape, want)
    out = torch.empty_like(like, dtype=dtype)
    out.copy_(t)
    return out


class Nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def empty(ref: Tensor) -> Tensor:
    """The placeholder for an absent gradient (an op output cannot be None)."""
    return ref.new_empty(0)


class NoAutocast:
    """Autocast off inside the kernels (they pick their own dtypes); free when autocast is off."""

    def __init__(self, device_type: str):
        self.cm = torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else None

    def __enter__(self):
        if self.cm is not None:
            self.cm.__enter__()

    def __exit__(self, *exc):
        if self.cm is not None:
            self.cm.__exit__(*exc)

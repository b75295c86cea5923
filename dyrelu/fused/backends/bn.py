"""The bn backend: ATen's batch-norm loops used as per-row affine and reduction kernels on the CPU
(vectorised and parallel there; see _torch_kernels.py), for inputs the C kernels do not take (half
dtypes, other layouts) or where they are not built."""
from __future__ import annotations

import torch

from .. import _torch_kernels as tk


def _takes(x3) -> bool:
    return x3.device.type == "cpu" and tk.bn_ok(x3)


def apply(x3, a, b, pi3):
    return tk.bn_forward(x3, tk.Rows(a, b, x3.shape[1]), pi3) if _takes(x3) else None


def apply_backward(g3, x3, a, b, pi3, need_pi):
    return tk.bn_backward(g3, x3, tk.Rows(a, b, x3.shape[1]), pi3, need_pi, a.dtype) if _takes(x3) else None


def row_moments(x3, cdt):
    """Two passes over the (1, N*C, L) row view: the row means, then the inference-mode BN backward
    (sums only) with g = x and mean = the row mean, which gives sum (x - m) x and sum x per row in one
    read; sum (x - m)^2 follows exactly in math. (``torch.var_mean`` and the training-mode BN statistics
    take 5 to 20 times longer here.) In float32 the variance keeps a relative error of about
    2e-8 * (mean / std)^2 of a row."""
    if not _takes(x3):
        return None
    n, c, l = x3.shape
    rows = n * c
    x1 = x3.view(1, rows, l)
    m = x1.mean(2, dtype=cdt).view(rows)
    _, ones = tk._consts(rows, cdt)
    _, s_xc, s_x = torch.ops.aten.native_batch_norm_backward(
        x1, x1, ones, m, ones, None, None, False, 0.0, [False, True, True])
    v = (s_xc.to(cdt) - m * (s_x.to(cdt) - l * m)) / l
    return m.view(n, c), v.view(n, c)


def affine_rows(x3, alpha, beta):
    if not _takes(x3):
        return None
    n, c, l = x3.shape
    rows = n * c
    zeros, ones = tk._consts(rows, alpha.dtype)
    w = alpha.expand(n, c).reshape(rows)
    out = torch.batch_norm(x3.view(1, rows, l), w, beta.reshape(rows), zeros, ones, False, 0.0, 0.0, False)
    return out.view(n, c, l)

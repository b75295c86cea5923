"""Kernels of the fused DY-ReLU apply written with PyTorch ops (no compiler needed).

Two families, both computing on an (N, C, L) view of the input:

* ``torch``: broadcast ops, any layout, any device. It is also what runs under
  ``torch.compile``: the ops are plain pointwise + reductions, so Inductor fuses
  forward into one kernel and backward into one or two.
* ``bn``: CPU eager, for (N, C, L) inputs that can be viewed as (1, N*C, L). It
  borrows two ATen batch-norm kernels that are well vectorised and parallel on the
  CPU: the inference-mode BN forward is a one-pass per-row affine ``w * x + b``, and
  the inference-mode BN backward with ``output_mask=[False, True, True]`` returns, in
  one read-only pass over (g, x), the per-row sums of ``g * x`` and ``g`` -- exactly the
  reductions the backward of ``y = a x + b`` needs. Running mean 0, running var 1 and
  eps 0 make them exact. (Its grad_input output is avoided: several times slower.)
  Everything else is in place in the one fresh buffer each direction allocates.

Coefficients: ``a``, ``b`` are (N, K, W) with W = C (variants B, C) or 1 (variant A),
in the compute dtype (float32, or float64 for float64 inputs). ``pi`` is (N, 1, L).
Segment selection in backward (ties): the lowest k among equal maxima, like argmax.
"""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------
# generic broadcast kernels
# ---------------------------------------------------------------------------------------
def _seg(x: Tensor, a: Tensor, b: Optional[Tensor], k: int) -> Tensor:
    u = x * a[:, k, :, None]
    return u if b is None else u + b[:, k, :, None]


def torch_forward(x: Tensor, a: Tensor, b: Optional[Tensor], pi: Optional[Tensor]) -> Tensor:
    """y = max_k(a_k x + b_k) [* pi] on (N, C, L); math in the dtype of ``a``."""
    y = _seg(x, a, b, 0)
    for k in range(1, a.shape[1]):
        y = torch.maximum(y, _seg(x, a, b, k))
    if pi is not None:
        y = y * pi
    return y.to(x.dtype)


def torch_backward(g: Tensor, x: Tensor, a: Tensor, b: Optional[Tensor], pi: Optional[Tensor], need_pi: bool):
    """Returns grad_x (N, C, L) in x.dtype, sum_gx and sum_g (N, K, C) and grad_pi (N, 1, L) or None."""
    cdt = a.dtype
    xf, gf = x.to(cdt), g.to(cdt)
    k_total = a.shape[1]
    best = _seg(xf, a, b, 0)
    idx = None
    for k in range(1, k_total):
        u = _seg(xf, a, b, k)
        better = u > best
        idx = torch.where(better, k, 0 if idx is None else idx)
        best = torch.where(better, u, best)
    grad_pi = None
    if pi is not None:
        if need_pi:
            grad_pi = (gf * best).sum(1, keepdim=True)
        gf = gf * pi
    gx = None
    sum_gx, sum_g = [], []
    for k in range(k_total):
        gk = gf if idx is None else torch.where(idx == k, gf, 0.0)
        term = gk * a[:, k, :, None]
        gx = term if gx is None else gx + term
        sum_gx.append((gk * xf).sum(-1))
        sum_g.append(gk.sum(-1))
    return gx.to(x.dtype), torch.stack(sum_gx, 1), torch.stack(sum_g, 1), grad_pi


# ---------------------------------------------------------------------------------------
# CPU kernels riding on ATen's batch-norm loops
# ---------------------------------------------------------------------------------------
BN_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
BN_MIN_L = 8  # below this the per-row loops of BN cost more than a broadcast op
_CONSTS: dict = {}
_CONSTS_MAX = 1 << 22  # rows per cache (two vectors each)


def bn_ok(x3: Tensor) -> bool:
    return x3.device.type == "cpu" and x3.dtype in BN_DTYPES and x3.shape[2] >= BN_MIN_L and x3.is_contiguous()


def _consts(rows: int, dtype: torch.dtype):
    """Cached zeros / ones of length ``rows`` (running mean 0 and var 1 of the BN kernels; read only).

    At most ~8M cached elements: the cache is dropped when a new entry would exceed that.
    """
    key = (rows, dtype)
    hit = _CONSTS.get(key)
    if hit is None:
        if sum(k[0] for k in _CONSTS) + rows > _CONSTS_MAX:
            _CONSTS.clear()
        with torch.inference_mode(False), torch.no_grad():
            hit = (torch.zeros(rows, dtype=dtype), torch.ones(rows, dtype=dtype))
        _CONSTS[key] = hit
    return hit


def _rows(t: Tensor, c: int) -> Tensor:
    """(N, K, W) coefficients -> (K, N*C) contiguous: row k holds segment k's per-(n, c) values."""
    n, k, w = t.shape
    t = t.transpose(0, 1)
    if w != c:
        t = t.expand(k, n, c)
    return t.reshape(k, n * c)


class Rows:
    """Per-(n, c) row constants of the batch-norm kernels, built once in forward, kept for backward."""

    __slots__ = ("A", "B", "zeros", "ones", "k", "da", "db")

    def __init__(self, a: Tensor, b: Optional[Tensor], c: int):
        n, self.k = a.shape[0], a.shape[1]
        self.zeros, self.ones = _consts(n * c, a.dtype)
        self.A = _rows(a, c)
        self.B = None if b is None else _rows(b, c)
        self.da = self.db = None
        if self.k == 2:
            self.da = self.A[1] - self.A[0]
            self.db = None if self.B is None else self.B[1] - self.B[0]

    def bias(self, k: int) -> Tensor:
        return self.zeros if self.B is None else self.B[k]


def _affine(x1: Tensor, w: Tensor, bias: Optional[Tensor], r: Rows) -> Tensor:
    """w * x + bias per row of x1 (1, R, L): inference-mode BN with mean 0, var 1, eps 0 (one pass)."""
    return torch.batch_norm(x1, w, r.zeros if bias is None else bias, r.zeros, r.ones, False, 0.0, 0.0, False)


def _row_sums(g1: Tensor, x1: Tensor, w: Tensor, r: Rows):
    """(sum_L(g * x), sum_L(g)) per row in one read-only pass (inference-mode BN backward)."""
    _, s_gx, s_g = torch.ops.aten.native_batch_norm_backward(
        g1, x1, w, r.zeros, r.ones, None, None, False, 0.0, [False, True, True]
    )
    return s_gx, s_g


def _col(v: Tensor) -> Tensor:
    return v.view(1, -1, 1)


def bn_forward(x3: Tensor, r: Rows, pi: Optional[Tensor]) -> Tensor:
    """max_k(a_k x + b_k) [* pi] as K affine passes and K-1 in-place maxima into the first.

    Each segment is rounded once, as in the reference, so special cases stay bit-exact (zero
    hyper function == ReLU / LeakyReLU). (max((a1 - a0) x + b1, b0) + a0 x saves an allocation
    but rounds twice and loses that.)
    """
    n, c, l = x3.shape
    x1 = x3.view(1, n * c, l)
    A = r.A
    y = _affine(x1, A[0], r.bias(0), r)
    for k in range(1, r.k):
        torch.maximum(y, _affine(x1, A[k], r.bias(k), r), out=y)
    y = y.view(n, c, l)
    if pi is not None:
        y.mul_(pi.to(y.dtype))
    return y


def bn_backward(g3: Tensor, x3: Tensor, r: Rows, pi: Optional[Tensor], need_pi: bool, cdt: torch.dtype):
    """grad_x (N, C, L), sum_gx and sum_g (N, K, C), grad_pi (N, 1, L) or None.

    Read-only BN-backward passes give the per-row sums; grad_x is built in place in the one
    buffer this function allocates (the segment mask's), never in the incoming gradient.
    """
    n, c, l = x3.shape
    rows = n * c
    x1 = x3.view(1, rows, l)
    A = r.A
    grad_pi = None
    owned = False
    if pi is not None:
        if need_pi:
            best = bn_forward(x3, r, None)
            grad_pi = best.mul_(g3).sum(1, keepdim=True, dtype=cdt)
            del best
        g3 = g3 * pi.to(g3.dtype)  # a buffer of our own
        owned = True
    g1 = g3.contiguous().view(1, rows, l)
    if r.k == 1:
        s_gx, s_g = _row_sums(g1, x1, A[0], r)
        gx = g1.mul_(_col(A[0])) if owned else torch.mul(g1, _col(A[0]))
        return gx.view(n, c, l), s_gx.view(n, 1, c), s_g.view(n, 1, c), grad_pi
    if r.k == 2:
        # segment 1 wins where (a1 - a0) x + (b1 - b0) > 0
        t = _affine(x1, r.da, r.db, r)
        gs = torch.ops.aten.threshold_backward.grad_input(g1, t, 0.0, grad_input=t)  # g on segment 1
        s_gx, s_g = _row_sums(g1, x1, A[0], r)
        s_sx, s_s = _row_sums(gs, x1, r.da, r)
        sum_gx = torch.stack([s_gx - s_sx, s_sx]).view(2, n, c).transpose(0, 1)
        sum_g = torch.stack([s_g - s_s, s_s]).view(2, n, c).transpose(0, 1)
        gx = gs.mul_(_col(r.da)).addcmul_(g1, _col(A[0]))  # g a0 + g [seg 1] (a1 - a0)
        return gx.view(n, c, l), sum_gx, sum_g, grad_pi
    # general K: running max with the winning segment's index, then per-segment sums
    best = _affine(x1, A[0], r.bias(0), r)
    idx = torch.zeros(best.shape, dtype=torch.uint8)
    for k in range(1, r.k):
        u = _affine(x1, A[k], r.bias(k), r)
        idx.masked_fill_(u > best, k)
        torch.maximum(best, u, out=best)
        del u
    gx = best.zero_()
    sums_gx, sums_g = [], []
    for k in range(r.k):
        gk = g1.masked_fill(idx != k, 0.0)
        s_gx, s_g = _row_sums(gk, x1, A[k], r)
        gx.addcmul_(gk, _col(A[k]))
        sums_gx.append(s_gx)
        sums_g.append(s_g)
    sum_gx = torch.stack(sums_gx).view(r.k, n, c).transpose(0, 1)
    sum_g = torch.stack(sums_g).view(r.k, n, c).transpose(0, 1)
    return gx.view(n, c, l), sum_gx, sum_g, grad_pi

"""The fused path as registered ``torch.library`` ops: a DY-ReLU site is a handful of them.

  dyrelu::coefs           x (or pooled (N, C)) -> a, b: pool, FC1, ReLU, FC2, 2 sigmoid - 1, Eq. 3
  dyrelu::bn_coefs        BN statistics -> A, B folded through the BN affine (see bn_act.py), s, t
  dyrelu::apply           max_k(a_k x + b_k) [* pi]
  dyrelu::moments         per-(n, c) means and the channel variance, one read of x
  dyrelu::spatial_logits  variant C's 1x1 conv with one output channel [on the BN output s x + t]
  dyrelu::pool            global average pool
  dyrelu::running_update  BatchNorm's running statistics, on the device (no host sync)

Each differentiable op has a ``*_backward`` op (one op per direction, hand-written math), a fake
(meta) implementation and an autograd registration; ``torch.library.opcheck`` tests them. Eager
mode, torch.compile, CUDA graphs and torch.export all call these same ops, and each op picks its
kernels at run time through ``backend.choose`` (Triton on CUDA, the C kernels or ATen's batch-norm
loops on the CPU, plain torch ops otherwise). Outputs always have the strides of the fake
implementation (``_match``): Inductor checks them.

Variant C's pi is an input of ``apply``: it is computed by ``DyReLU.spatial_pi`` from the logits
(the module owns that math), never inside a kernel.
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _hyper
from . import _native, _triton, _triton_bn, backend
from . import _torch_kernels as tk


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------
def _as3d(x: Tensor) -> Tensor:
    """(N, C, *spatial) -> (N, C, L) without a copy when the spatial dims collapse (NCHW, NHWC)."""
    n, c = x.shape[:2]
    try:
        return x.view(n, c, -1)
    except RuntimeError:
        return x.reshape(n, c, -1)


def _strides_like(like: Tensor) -> tuple:
    return torch.empty_like(like, device="meta").stride()


def _match(t: Tensor, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """``t`` (a fresh tensor) reshaped to ``like``'s shape with the strides ``empty_like(like)`` has.

    Never an autograd view of ``t`` where the strides already agree: autograd adds a second gradient
    into a first in place only when the first is not a view."""
    dtype = like.dtype if dtype is None else dtype
    t = t.to(dtype)
    want = _strides_like(like)
    if tuple(t.shape) != tuple(like.shape):
        try:
            t = torch.ops.aten._unsafe_view(t, like.shape)
        except RuntimeError:
            t = t.reshape(like.shape)
    if t.stride() == want or all(s == w for s, w, d in zip(t.stride(), want, t.shape) if d > 1):
        return t if t.stride() == want else t.as_strided(t.shape, want)
    out = torch.empty_like(like, dtype=dtype)
    out.copy_(t)
    return out


def _empty(ref: Tensor) -> Tensor:
    """The placeholder for an absent gradient (an op output cannot be None)."""
    return ref.new_empty(0)


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


_TRITON_BN_FAILED: list = []  # the first launch error of the BN statistics kernels, once one happened


def _triton_bn_or_none(launch, *args):
    """Runs a Triton BN-statistics launcher; a failure warns once and switches them to torch ops, so a
    compile or launch problem on some GPU cannot kill a training run (forced Triton raises)."""
    try:
        return launch(*args)
    except Exception as err:
        if backend.strict():
            raise
        _TRITON_BN_FAILED.append(repr(err))
        warnings.warn(f"dyrelu fused BN + DY-ReLU: Triton kernel {launch.__name__} failed ({err!r}); "
                      "using torch ops for its statistics from now on", RuntimeWarning, stacklevel=3)
        return None


def _use_triton_bn(x3: Tensor) -> bool:
    return not _TRITON_BN_FAILED and backend.choose(x3) == "triton" and _triton_bn.available(x3.device)


# ---------------------------------------------------------------------------------------
# dyrelu::apply
# ---------------------------------------------------------------------------------------
def _pi3(pi: Optional[Tensor], n: int) -> Optional[Tensor]:
    return None if pi is None else pi.reshape(n, 1, -1).contiguous()


@torch.library.custom_op("dyrelu::apply", mutates_args=())
def apply(x: Tensor, a: Tensor, b: Optional[Tensor], pi: Optional[Tensor]) -> Tensor:
    """y = max_k(a_k x + b_k) [* pi]; x (N, C, *spatial), a, b (N, K, C|1), pi (N, 1, *spatial)."""
    with _NoAutocast(x.device.type):
        n, c = x.shape[0], x.shape[1]
        x3 = _as3d(x)
        cdt = tk.compute_dtype(x.dtype)
        af = a.to(cdt)
        bf = None if b is None else b.to(cdt)
        pi3 = _pi3(pi, n)
        which = backend.choose(x)
        y3 = None
        if which == "triton":
            y3 = _triton.apply_forward(x3, af, bf, pi3)  # None: this configuration fell back
        elif which == "native" and x.dtype == cdt and _native.ok(x3, a.shape[1]):
            y3 = _native.forward(x3, af.contiguous(), None if bf is None else bf.contiguous(),
                                 None if pi3 is None else pi3.to(x.dtype))
        elif which in ("native", "bn") and tk.bn_ok(x3):
            y3 = tk.bn_forward(x3, tk.Rows(af, bf, c), pi3)
        if y3 is None:
            y3 = tk.torch_forward(x3, af, bf, pi3)
        return _match(y3, x)


@apply.register_fake
def _(x, a, b, pi):
    return torch.empty_like(x)


@torch.library.custom_op("dyrelu::apply_backward", mutates_args=())
def apply_backward(g: Tensor, x: Tensor, a: Tensor, b: Optional[Tensor], pi: Optional[Tensor],
                   need_pi: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_a, grad_b, grad_pi); grad_b / grad_pi are empty when b / pi (or need_pi) are absent.

    One pass over (g, x): the winning segment is recomputed, grad_x = g a_sel [* pi],
    grad_a_k = sum(g x [sel == k]), grad_b_k = sum(g [sel == k]), grad_pi = sum_c(g max_k(...))."""
    with _NoAutocast(x.device.type):
        n, c = x.shape[0], x.shape[1]
        k = a.shape[1]
        x3, g3 = _as3d(x), _as3d(g)
        cdt = tk.compute_dtype(x.dtype)
        af = a.to(cdt)
        bf = None if b is None else b.to(cdt)
        pi3 = _pi3(pi, n)
        need_pi = bool(need_pi and pi is not None)
        which = backend.choose(x)
        out = None
        if which == "triton":
            out = _triton.apply_backward(g3, x3, af, bf, pi3, need_pi)
        elif which == "native" and x.dtype == cdt and _native.ok(x3, k):
            out = _native.backward(g3.contiguous(), x3, af.contiguous(), None if bf is None else bf.contiguous(),
                                   None if pi3 is None else pi3.to(x.dtype), need_pi)
        elif which in ("native", "bn") and tk.bn_ok(x3):
            out = tk.bn_backward(g3, x3, tk.Rows(af, bf, c), pi3, need_pi, cdt)
        if out is None:
            out = tk.torch_backward(g3, x3, af, bf, pi3, need_pi)
        gx3, sum_gx, sum_g, gpi = out
        ga = sum_gx if a.shape[2] == sum_gx.shape[2] else sum_gx.sum(2, keepdim=True)
        grad_a = _match(ga, a)
        grad_b = _empty(a)
        if b is not None:
            grad_b = _match(sum_g if b.shape[2] == sum_g.shape[2] else sum_g.sum(2, keepdim=True), b)
        grad_pi = _match(gpi, pi) if need_pi else _empty(a)
        return _match(gx3, x), grad_a, grad_b, grad_pi


@apply_backward.register_fake
def _(g, x, a, b, pi, need_pi):
    return (torch.empty_like(x), torch.empty_like(a), _empty(a) if b is None else torch.empty_like(b),
            torch.empty_like(pi) if (need_pi and pi is not None) else _empty(a))


def _apply_setup(ctx, inputs, output):
    x, a, b, pi = inputs
    ctx.save_for_backward(x, a, b, pi)


def _apply_grad(ctx, gy):
    x, a, b, pi = ctx.saved_tensors
    need_pi = pi is not None and ctx.needs_input_grad[3]
    gx, ga, gb, gpi = torch.ops.dyrelu.apply_backward(gy, x, a, b, pi, need_pi)
    return gx, ga, (gb if b is not None else None), (gpi if need_pi else None)


apply.register_autograd(_apply_grad, setup_context=_apply_setup)


# ---------------------------------------------------------------------------------------
# dyrelu::pool
# ---------------------------------------------------------------------------------------
def _pool(x: Tensor) -> Tensor:
    """(N, C, *spatial) -> (N, C) mean in x's dtype (Triton kernel on the triton backend)."""
    x3 = _as3d(x)
    if backend.choose(x) == "triton":
        pooled = _triton.pool(x3)
        if pooled is not None:
            return pooled.to(x.dtype)
    return x3.mean(2)


def _pool_grad_like(gp: Tensor, shape) -> Tensor:
    """g / L broadcast to ``shape`` (an expand, never materialised: autograd adds it in place)."""
    return gp.expand(shape) if len(shape) > 2 else gp


@torch.library.custom_op("dyrelu::pool", mutates_args=())
def pool(x: Tensor) -> Tensor:
    """Mean over the spatial dims: (N, C, *spatial) -> (N, C)."""
    return _pool(x).contiguous()


@pool.register_fake
def _(x):
    return x.new_empty(x.shape[:2])


def _pool_setup(ctx, inputs, output):
    ctx.shape = inputs[0].shape


def _pool_grad(ctx, gp):
    shape = ctx.shape
    length = 1
    for d in shape[2:]:
        length *= d
    return (gp / length).reshape(tuple(shape[:2]) + (1,) * (len(shape) - 2)).expand(shape)


pool.register_autograd(_pool_grad, setup_context=_pool_setup)


# ---------------------------------------------------------------------------------------
# dyrelu::coefs: the whole hyper function, pooling included, one op per direction
# ---------------------------------------------------------------------------------------
def _coef_dtype(w2: Tensor) -> torch.dtype:
    return torch.float64 if w2.dtype == torch.float64 else torch.float32


@torch.library.custom_op("dyrelu::coefs", mutates_args=())
def coefs(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, init_a: Tensor, init_b: Tensor,
          lambda_a: Tensor, lambda_b: Tensor, segments: int, width: int,
          use_bias: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(a, b, pooled): a, b (N, K, width) in >= float32, pooled (N, C) the context (kept for backward).

    x is the activation's input (pooled here) or an (N, C) context already pooled."""
    pooled = _pool(x) if x.dim() > 2 else x.clone()
    a, b = _hyper.hyper(pooled, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, segments, width, use_bias)
    b = b.contiguous() if use_bias else b.clone(memory_format=torch.contiguous_format)  # never init_b itself
    return a.contiguous(), b, pooled.contiguous()


@coefs.register_fake
def _(x, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, segments, width, use_bias):
    n, k, dt = x.shape[0], init_a.shape[0], _coef_dtype(w2)
    return x.new_empty((n, k, width), dtype=dt), x.new_empty((n, k, width), dtype=dt), x.new_empty(x.shape[:2])


@torch.library.custom_op("dyrelu::coefs_backward", mutates_args=())
def coefs_backward(ga: Tensor, gb: Optional[Tensor], pooled: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                   b2: Tensor, lambda_a: Tensor, lambda_b: Tensor, segments: int, width: int, use_bias: bool,
                   x_dim: int, length: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad of the input as (N, C, 1, ..., 1) already divided by the pooled length, grad w1, b1, w2, b2)."""
    gp, gw1, gb1, gw2, gb2 = _hyper.hyper_backward(ga, gb, pooled, w1, b1, w2, b2, lambda_a, lambda_b,
                                                    segments, width, use_bias)
    if x_dim > 2:
        gp = (gp / length).reshape(tuple(gp.shape) + (1,) * (x_dim - 2))
    return gp.contiguous(), gw1.contiguous(), gb1.contiguous(), gw2.contiguous(), gb2.contiguous()


@coefs_backward.register_fake
def _(ga, gb, pooled, w1, b1, w2, b2, lambda_a, lambda_b, segments, width, use_bias, x_dim, length):
    gp = pooled.new_empty(tuple(pooled.shape) + (1,) * max(0, x_dim - 2))
    return gp, torch.empty_like(w1), torch.empty_like(b1), torch.empty_like(w2), torch.empty_like(b2)


def _coefs_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, segments, width, use_bias = inputs
    ctx.save_for_backward(output[2], w1, b1, w2, b2, lambda_a, lambda_b)
    ctx.mark_non_differentiable(output[2])
    length = 1
    for d in x.shape[2:]:
        length *= d
    ctx.meta = (segments, width, use_bias, x.dim(), length, x.shape)


def _coefs_grad(ctx, ga, gb, _gpooled):
    pooled, w1, b1, w2, b2, lambda_a, lambda_b = ctx.saved_tensors
    segments, width, use_bias, x_dim, length, shape = ctx.meta
    gx, gw1, gb1, gw2, gb2 = torch.ops.dyrelu.coefs_backward(
        ga, gb, pooled, w1, b1, w2, b2, lambda_a, lambda_b, segments, width, use_bias, x_dim, length)
    if x_dim > 2:
        gx = gx.expand(shape)
    return gx, gw1, gb1, gw2, gb2, None, None, None, None, None, None, None


coefs.register_autograd(_coefs_grad, setup_context=_coefs_setup)


# ---------------------------------------------------------------------------------------
# dyrelu::bn_coefs: BN statistics -> the hyper function on the BN output's pooled context ->
# coefficients folded through the BN affine (bn_act.py derives it)
# ---------------------------------------------------------------------------------------
def _bn_fold(m, mu, var, weight, bias, eps):
    cdt = tk.compute_dtype(m.dtype)
    m = m.to(cdt)
    mu = m.mean(0) if mu is None else mu.to(cdt)
    r = torch.rsqrt(var.to(cdt) + eps)
    s = r if weight is None else r * weight.to(cdt)
    t = -mu * s if bias is None else torch.addcmul(bias.to(cdt), mu, s, value=-1.0)
    pooled = torch.addcmul(t, m, s)  # DY-ReLU's context: the spatial mean of the BN output
    return mu, r, s, t, pooled


def _hyper_input(pooled: Tensor, w1: Tensor) -> Tensor:
    return pooled if torch.is_autocast_enabled(pooled.device.type) else pooled.to(w1.dtype)


@torch.library.custom_op("dyrelu::bn_coefs", mutates_args=())
def bn_coefs(m: Tensor, mu: Optional[Tensor], var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             eps: float, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, init_a: Tensor, init_b: Tensor,
             lambda_a: Tensor, lambda_b: Tensor, segments: int, width: int,
             use_bias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(A, B (N, K, C), s, t (C,)) in float32 (float64 for float64 m): A_k = a_k s, B_k = a_k t + b_k, z = s x + t the BN output.

    m: per-(n, c) spatial means of x; mu: the channel mean (None: the batch's, m.mean(0)); var: the
    channel variance used to normalise."""
    _, _, s, t, pooled = _bn_fold(m, mu, var, weight, bias, eps)
    a, b = _hyper.hyper(_hyper_input(pooled, w1), w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b,
                        segments, width, use_bias)
    a, b = a.to(s.dtype), b.to(s.dtype)
    big_a = (a * s).contiguous()
    big_b = torch.addcmul(b, a, t).contiguous()  # t != 0 in general: an intercept even without DY-ReLU's own
    return big_a, big_b, s.contiguous(), t.contiguous()


@bn_coefs.register_fake
def _(m, mu, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, segments, width, use_bias):
    n, c, k, cdt = m.shape[0], m.shape[1], init_a.shape[0], tk.compute_dtype(m.dtype)
    return (m.new_empty((n, k, c), dtype=cdt), m.new_empty((n, k, c), dtype=cdt), m.new_empty((c,), dtype=cdt),
            m.new_empty((c,), dtype=cdt))


@torch.library.custom_op("dyrelu::bn_coefs_backward", mutates_args=())
def bn_coefs_backward(g_big_a: Tensor, g_big_b: Tensor, g_s: Optional[Tensor], g_t: Optional[Tensor], m: Tensor,
                      mu: Optional[Tensor], var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                      eps: float, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, init_a: Tensor, init_b: Tensor,
                      lambda_a: Tensor, lambda_b: Tensor, segments: int, width: int,
                      use_bias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad m, grad var, grad weight, grad bias, grad w1, b1, w2, b2); weight / bias grads empty when absent."""
    cdt = tk.compute_dtype(m.dtype)
    n = m.shape[0]
    mu_v, r, s, t, pooled = _bn_fold(m, mu, var, weight, bias, eps)
    mc = m.to(cdt)
    ph = _hyper_input(pooled, w1)
    a, _ = _hyper.hyper(ph, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, segments, width, use_bias)
    a = a.to(cdt)
    g_big_a, g_big_b = g_big_a.to(cdt), g_big_b.to(cdt)
    # A = a s, B = b + a t  (a broadcast over C for variant A)
    ga = g_big_a * s + g_big_b * t
    gb = g_big_b
    if a.shape[2] != ga.shape[2]:
        ga, gb = ga.sum(2, keepdim=True), gb.sum(2, keepdim=True)
    gs = (g_big_a * a).sum((0, 1))
    gt = (g_big_b * a).sum((0, 1))
    if g_s is not None:
        gs = gs + g_s.to(cdt)
    if g_t is not None:
        gt = gt + g_t.to(cdt)
    gp, gw1, gb1, gw2, gb2 = _hyper.hyper_backward(ga, gb, ph, w1, b1, w2, b2, lambda_a, lambda_b,
                                                    segments, width, use_bias)
    gp = gp.to(cdt)
    # pooled = m s + t
    gm = gp * s
    gs = gs + (gp * mc).sum(0)
    gt = gt + gp.sum(0)
    # t = bias - mu s
    gs = gs - gt * mu_v
    if mu is None:  # mu = mean over n of m
        gm = gm - (gt * s) / n
    # s = r weight, r = (var + eps)^-1/2
    gr = gs if weight is None else gs * weight.to(cdt)
    gvar = gr * (-0.5) * r * r * r
    g_weight = _empty(m) if weight is None else (gs * r).to(weight.dtype)
    g_bias = _empty(m) if bias is None else gt.to(bias.dtype)
    return (gm.to(m.dtype).contiguous(), gvar.to(var.dtype).contiguous(), g_weight, g_bias,
            gw1.contiguous(), gb1.contiguous(), gw2.contiguous(), gb2.contiguous())


@bn_coefs_backward.register_fake
def _(g_big_a, g_big_b, g_s, g_t, m, mu, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a,
      lambda_b, segments, width, use_bias):
    return (torch.empty_like(m), torch.empty_like(var), _empty(m) if weight is None else torch.empty_like(weight),
            _empty(m) if bias is None else torch.empty_like(bias), torch.empty_like(w1), torch.empty_like(b1),
            torch.empty_like(w2), torch.empty_like(b2))


def _bn_coefs_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:5], *inputs[6:14])  # every tensor (or None) input, eps left out
    ctx.meta = tuple(inputs[i] for i in (5, 14, 15, 16))  # eps, segments, width, use_bias


def _bn_coefs_grad(ctx, g_big_a, g_big_b, g_s, g_t):
    m, mu, var, weight, bias, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b = ctx.saved_tensors
    eps, segments, width, use_bias = ctx.meta
    if g_big_a is None:
        g_big_a = torch.zeros_like(g_big_b)
    if g_big_b is None:
        g_big_b = torch.zeros_like(g_big_a)
    gm, gvar, gw, gbias, gw1, gb1, gw2, gb2 = torch.ops.dyrelu.bn_coefs_backward(
        g_big_a, g_big_b, g_s, g_t, m, mu, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b,
        lambda_a, lambda_b, segments, width, use_bias)
    return (gm, None, gvar, gw if weight is not None else None, gbias if bias is not None else None, None,
            gw1, gb1, gw2, gb2, None, None, None, None, None, None, None)


bn_coefs.register_autograd(_bn_coefs_grad, setup_context=_bn_coefs_setup)


# ---------------------------------------------------------------------------------------
# dyrelu::moments
# ---------------------------------------------------------------------------------------
def _row_moments(x3: Tensor, cdt: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(per-(n, c) mean, per-(n, c) biased variance) over L, both (N, C) in ``cdt``.

    CPU: two passes over the (1, N*C, L) row view that ATen runs vectorised and in parallel: the
    row means, then the inference-mode BN backward (sums only) with g = x and mean = the row mean,
    which gives sum (x - m) x and sum x per row in one read; sum (x - m)^2 follows exactly in math.
    (``torch.var_mean`` and the training-mode BN statistics take 5 to 20 times longer here.) In
    float32 the variance keeps a relative error of about 2e-8 * (mean / std)^2 of a row.
    """
    n, c, l = x3.shape
    if _use_triton_bn(x3):
        got = _triton_bn_or_none(_triton_bn.row_moments, x3)
        if got is not None:
            return got
    if x3.dtype == cdt and backend.native(x3):
        return _native.row_moments(x3)
    if x3.device.type == "cpu" and tk.bn_ok(x3):
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


@torch.library.custom_op("dyrelu::moments", mutates_args=())
def moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """(m (N, C) mean over the spatial dims, var (C,) biased variance over batch and space), in
    float32 (float64 for float64 x). One read of x."""
    cdt = tk.compute_dtype(x.dtype)
    m, v = _row_moments(_as3d(x), cdt)
    mu = m.mean(0)
    # law of total variance: within-row variance plus the variance of the row means (exact)
    var = v.mean(0) + (m - mu).square_().mean(0)
    return m.contiguous(), var


@moments.register_fake
def _(x):
    cdt = tk.compute_dtype(x.dtype)
    return x.new_empty(x.shape[:2], dtype=cdt), x.new_empty((x.shape[1],), dtype=cdt)


def _affine_rows(x3: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """alpha_c x + beta_nc on (N, C, L), output like x (a fresh tensor, one pass)."""
    n, c, l = x3.shape
    if _use_triton_bn(x3):
        got = _triton_bn_or_none(_triton_bn.affine_rows, x3, alpha.contiguous(), beta.contiguous())
        if got is not None:
            return got
    if x3.device.type == "cpu" and tk.bn_ok(x3):
        rows = n * c
        zeros, ones = tk._consts(rows, alpha.dtype)
        w = alpha.expand(n, c).reshape(rows)
        out = torch.batch_norm(x3.view(1, rows, l), w, beta.reshape(rows), zeros, ones, False, 0.0, 0.0, False)
        return out.view(n, c, l)
    return (x3 * alpha[None, :, None] + beta[:, :, None]).to(x3.dtype)


@torch.library.custom_op("dyrelu::moments_backward", mutates_args=())
def moments_backward(x: Tensor, m: Tensor, g_m: Optional[Tensor], g_var: Optional[Tensor]) -> Tensor:
    """grad_x = g_m / L + g_var 2 (x - mu) / M, one affine pass over x (alpha_c x + beta_nc)."""
    n, c = x.shape[0], x.shape[1]
    x3 = _as3d(x)
    length = x3.shape[2]
    cdt = m.dtype
    mu = m.mean(0)
    # d m_nc / dx = 1 / L;  d var / dx = 2 (x - mu) / M  (the mean's own term cancels)
    alpha = torch.zeros(c, dtype=cdt, device=x.device) if g_var is None else g_var.to(cdt) * (2.0 / (n * length))
    beta = -(alpha * mu)
    beta = beta.expand(n, c) if g_m is None else g_m.to(cdt) / length + beta
    return _match(_affine_rows(x3, alpha, beta), x)


@moments_backward.register_fake
def _(x, m, g_m, g_var):
    return torch.empty_like(x)


def _moments_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])


def _moments_grad(ctx, g_m, g_var):
    x, m = ctx.saved_tensors
    return torch.ops.dyrelu.moments_backward(x, m, g_m, g_var)


moments.register_autograd(_moments_grad, setup_context=_moments_setup)


# ---------------------------------------------------------------------------------------
# dyrelu::spatial_logits: z = sum_c w_c (s_c x + t_c), one output channel
# ---------------------------------------------------------------------------------------
def _folded_weight(w: Tensor, s: Optional[Tensor], t: Optional[Tensor], cdt: torch.dtype):
    wv = w.reshape(-1).to(cdt)
    ws = wv if s is None else wv * s.to(cdt)
    bias = None if t is None else (wv * t.to(cdt)).sum().reshape(1)
    return wv, ws, bias


@torch.library.custom_op("dyrelu::spatial_logits", mutates_args=())
def spatial_logits(x: Tensor, w: Tensor, s: Optional[Tensor], t: Optional[Tensor]) -> Tensor:
    """Variant C's logits z (N, 1, *spatial) in x's dtype: the 1x1 conv with weights w (C elements),
    on the BN output s x + t when s, t are given. The C kernels read x once (ATen's convolution
    backward for this shape took 10x longer on the benchmark network)."""
    n = x.shape[0]
    x3 = _as3d(x)
    cdt = tk.compute_dtype(x.dtype)
    _, ws, bias = _folded_weight(w, s, t, cdt)
    if x.dtype == cdt and backend.native(x3):
        b = torch.zeros(1, dtype=cdt) if bias is None else bias
        z = _native.spatial_forward(x3, ws.contiguous(), b.contiguous())
    else:
        z = torch.matmul(ws, x3.to(cdt))
        if bias is not None:
            z = z + bias
    return z.to(x.dtype).reshape((n, 1) + tuple(x.shape[2:])).contiguous()


@spatial_logits.register_fake
def _(x, w, s, t):
    return x.new_empty((x.shape[0], 1) + tuple(x.shape[2:]))


@torch.library.custom_op("dyrelu::spatial_logits_backward", mutates_args=())
def spatial_logits_backward(gz: Tensor, x: Tensor, w: Tensor, s: Optional[Tensor],
                            t: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_w, grad_s, grad_t); grad_s / grad_t empty when s / t are absent."""
    n, c = x.shape[0], x.shape[1]
    x3 = _as3d(x)
    cdt = tk.compute_dtype(x.dtype)
    wv, ws, _ = _folded_weight(w, s, t, cdt)
    gz2 = gz.reshape(n, -1)
    if x.dtype == cdt and backend.native(x3):
        gx, g_ws = _native.spatial_backward(x3, ws.contiguous(), gz2.to(cdt).contiguous())
    else:
        gzc = gz2.to(cdt)
        gx = (ws[None, :, None] * gzc[:, None, :]).to(x.dtype)
        g_ws = torch.einsum("ncl,nl->c", x3.to(cdt), gzc)
    g_bias = gz2.sum(dtype=cdt)
    gw = g_ws if s is None else g_ws * s.to(cdt)
    if t is not None:
        gw = gw + g_bias * t.to(cdt)
    g_s = _empty(w) if s is None else (g_ws * wv).to(s.dtype)
    g_t = _empty(w) if t is None else (g_bias * wv).to(t.dtype)
    return _match(gx, x), gw.to(w.dtype).reshape(w.shape).contiguous(), g_s, g_t


@spatial_logits_backward.register_fake
def _(gz, x, w, s, t):
    return (torch.empty_like(x), torch.empty_like(w), _empty(w) if s is None else torch.empty_like(s),
            _empty(w) if t is None else torch.empty_like(t))


def _spatial_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _spatial_grad(ctx, gz):
    x, w, s, t = ctx.saved_tensors
    gx, gw, gs, gt = torch.ops.dyrelu.spatial_logits_backward(gz, x, w, s, t)
    return gx, gw, (gs if s is not None else None), (gt if t is not None else None)


spatial_logits.register_autograd(_spatial_grad, setup_context=_spatial_setup)


# ---------------------------------------------------------------------------------------
# dyrelu::running_update
# ---------------------------------------------------------------------------------------
@torch.library.custom_op("dyrelu::running_update",
                         mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def running_update(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Optional[Tensor],
                   m: Tensor, var: Tensor, momentum: float, cumulative: bool, count: int) -> None:
    """BatchNorm2d's running-stat update from the batch's per-(n, c) means m and biased variance var:
    momentum (or, cumulative, 1 / num_batches_tracked computed on the device: no host sync), the
    unbiased variance, num_batches_tracked + 1."""
    factor: object = 0.0 if cumulative else momentum
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if cumulative:
            factor = num_batches_tracked.to(running_mean.dtype).reciprocal()
    mu = m.mean(0)
    unbiased = var * (count / (count - 1))
    running_mean.lerp_(mu.to(running_mean.dtype), factor)
    running_var.lerp_(unbiased.to(running_var.dtype), factor)


@running_update.register_fake
def _(running_mean, running_var, num_batches_tracked, m, var, momentum, cumulative, count):
    return None

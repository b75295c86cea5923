"""The fused path as registered ``torch.library`` ops: a DY-ReLU site is a handful of them.

  dyrelu::coefs           x (or pooled (N, C)) -> a, b: pool, FC1, ReLU, FC2, 2 sigmoid - 1, Eq. 3,
                          and variant C's spatial logits z (the 1x1 conv with one output channel)
  dyrelu::bn_coefs        a BN + DY-ReLU site's input x -> the BN statistics, A, B folded through the
                          BN affine (see bn_act.py), and C's logits on the BN output s x + t
  dyrelu::bn_act          a whole BN + DY-ReLU-A / B site: bn_coefs, then apply
  dyrelu::apply           max_k(a_k x + b_k) [* pi]
  dyrelu::moments         per-(n, c) means and the channel variance, one read of x
  dyrelu::pool            global average pool
  dyrelu::running_update  BatchNorm's running statistics, on the device (no host sync)
  dyrelu::spatial_pi      variant C's Eq. 4, pi = min(gamma softmax(z / tau), 1)

Each differentiable op has a ``*_backward`` op (one op per direction, hand-written math), a fake
(meta) implementation and an autograd kernel; ``torch.library.opcheck`` tests them. They are defined
with torch.library's low-level API (``_op``, ``_fake``, ``_autograd`` below), which is cheaper per call
than ``torch.library.custom_op``. Eager
mode, torch.compile, CUDA graphs and torch.export all call these same ops, and each op runs its
kernels at run time through the kernel table, ``backend.run`` (Triton on CUDA, the C kernels or ATen's
batch-norm loops on the CPU, plain torch ops otherwise; ``backends/``); where no backend takes an input
the op composes the result (a BN site's (N, C) math is ``site_math.py``). On the Triton backend, functionalization (compile,
AOTInductor) traces an op's body into the graph, its launches through ``wrap_triton``
(``_traced_body``). Outputs always have the strides of the fake
implementation (``_match``): Inductor checks them.

Variant C's pi is an input of ``apply``: ``dyrelu::spatial_pi`` (Eq. 4) computes it from the logits,
or, with a logit normalisation, ``DyReLU.spatial_pi`` (the module owns that math).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch._subclasses.functional_tensor import FunctionalTensorMode

from .. import _hyper
from . import _triton, _triton_site, backend
from ._tensors import acc_dtype
from .site_math import coefs_math as _bn_coefs_math
from .site_math import coefs_math_backward as _bn_coefs_backward, folded_weight as _folded_weight
from .site_math import scale as _scale
from ._tensors import NoAutocast as _NoAutocast, Nothing as _Nothing, as3d as _as3d, empty as _empty, match as _match


# ---------------------------------------------------------------------------------------
# registration: torch.library's low-level API, with each differentiable op's Autograd kernel a
# plain autograd.Function. ``torch.library.custom_op`` + ``register_autograd`` do the same through a
# generic wrapper that cost about 50 us more per call (docs/performance.md), which at the three
# differentiable ops a site had then was a large share of a site's fixed cost on the CPU.
# ---------------------------------------------------------------------------------------
_LIB = torch.library.Library("dyrelu", "DEF")
IMPLS: dict = {}  # name -> the op's Python implementation (a dispatch mode can run it under itself)


def _op(name: str, mutates_args=()):
    """Defines ``dyrelu::<name>`` with the schema of the function's annotations and the function as
    its implementation on every device (it picks its kernels itself); returns the op."""
    def define(fn):
        _LIB.define(name + torch.library.infer_schema(fn, mutates_args=mutates_args))
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        IMPLS[name] = fn
        op = getattr(torch.ops.dyrelu, name).default
        torch.library.register_torch_dispatch(op, FunctionalTensorMode, _traced_body(fn), lib=_LIB)
        return op
    return define


def _traced_body(fn):
    """On the Triton backend, functionalization (torch.compile's AOTAutograd, export's
    ``run_decompositions``, AOTInductor) traces the op's body instead of keeping one opaque node:
    its Triton launches become ``wrap_triton`` nodes and its small torch ops join the graph, so
    Inductor calls our kernels from the compiled code and AOTInductor packs them. This is what
    ``torch.library.triton_op`` does (a fake kernel plus this FunctionalTensorMode rule); our ops
    are not triton_ops because the same op runs C++ on the CPU, where it stays one node. Like
    triton_op, it stays one node while ``torch.export`` traces (AOTInductor decomposes it later).
    With symbolic shapes (``dynamic=True``, or a recompile for a new batch size) it stays one node
    too: the kernels' launch plans are chosen from the concrete shape."""
    def rule(mode, op, types, args, kwargs):
        from torch.export._trace import custom_triton_ops_decomposition_disabled

        tensors = [a for a in args if isinstance(a, Tensor)]
        if (not tensors or custom_triton_ops_decomposition_disabled() or _triton.interpreting()
                or backend.choose(tensors[0]) != "triton"
                or any(not isinstance(d, int) for t in tensors for d in t.shape)):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        with mode, _triton.traced():
            return fn(*args, **kwargs)
    return rule


def _fake(op):
    def register(fn):
        torch.library.register_fake(op, fn, lib=_LIB)
        return fn
    return register


def _autograd(op, setup, grad) -> None:
    """setup(ctx, inputs, output) and grad(ctx, *grads) as in ``torch.library.register_autograd``."""
    def forward(ctx, *args):
        with torch._C._AutoDispatchBelowAutograd():
            out = op(*args)
        setup(ctx, args, out)
        # which arguments have an edge in the graph (a tool that walks it without autograd's engine,
        # scripts/count_ops.backward, maps the backward's per-argument gradients onto them)
        ctx.tensor_args = tuple(isinstance(a, Tensor) for a in args)
        return out

    fn = type(f"{op._opname}_autograd", (torch.autograd.Function,),
              {"forward": staticmethod(forward), "backward": staticmethod(grad)})

    def kernel(*args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return fn.apply(*args)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    _LIB.impl(op._opname, kernel, "Autograd")


# ---------------------------------------------------------------------------------------
# dyrelu::apply
# ---------------------------------------------------------------------------------------
def _pi3(pi: Optional[Tensor], n: int) -> Optional[Tensor]:
    return None if pi is None else pi.reshape(n, 1, -1).contiguous()


@_op("apply")
def apply(x: Tensor, a: Tensor, b: Optional[Tensor], pi: Optional[Tensor]) -> Tensor:
    """y = max_k(a_k x + b_k) [* pi]; x (N, C, *spatial), a, b (N, K, C|1), pi (N, 1, *spatial)."""
    with _NoAutocast(x.device.type):
        cdt = acc_dtype(x.dtype)
        bf = None if b is None else b.to(cdt)
        return _match(backend.run("apply", x, _as3d(x), a.to(cdt), bf, _pi3(pi, x.shape[0])), x)


@_fake(apply)
def _(x, a, b, pi):
    return torch.empty_like(x)


@_op("apply_backward")
def apply_backward(g: Tensor, x: Tensor, a: Tensor, b: Optional[Tensor], pi: Optional[Tensor],
                   need_pi: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_a, grad_b, grad_pi); grad_b / grad_pi are empty when b / pi (or need_pi) are absent.

    One pass over (g, x): the winning segment is recomputed, grad_x = g a_sel [* pi],
    grad_a_k = sum(g x [sel == k]), grad_b_k = sum(g [sel == k]), grad_pi = sum_c(g max_k(...))."""
    with _NoAutocast(x.device.type):
        cdt = acc_dtype(x.dtype)
        bf = None if b is None else b.to(cdt)
        need_pi = bool(need_pi and pi is not None)
        gx3, sum_gx, sum_g, gpi = backend.run("apply_backward", x, _as3d(g), _as3d(x), a.to(cdt), bf,
                                              _pi3(pi, x.shape[0]), need_pi)
        ga = sum_gx if a.shape[2] == sum_gx.shape[2] else sum_gx.sum(2, keepdim=True)
        grad_a = _match(ga, a)
        grad_b = _empty(a)
        if b is not None:
            grad_b = _match(sum_g if b.shape[2] == sum_g.shape[2] else sum_g.sum(2, keepdim=True), b)
        grad_pi = _match(gpi, pi) if need_pi else _empty(a)
        return _match(gx3, x), grad_a, grad_b, grad_pi


@_fake(apply_backward)
def _(g, x, a, b, pi, need_pi):
    return (torch.empty_like(x), torch.empty_like(a), _empty(a) if b is None else torch.empty_like(b),
            torch.empty_like(pi) if (need_pi and pi is not None) else _empty(a))


def _apply_setup(ctx, inputs, output):
    x, a, b, pi = inputs
    ctx.save_for_backward(x, a, b, pi)
    ctx.set_materialize_grads(False)


def _apply_grad(ctx, gy):
    if gy is None:
        return None, None, None, None
    x, a, b, pi = ctx.saved_tensors
    need_pi = pi is not None and ctx.needs_input_grad[3]
    gx, ga, gb, gpi = torch.ops.dyrelu.apply_backward(gy, x, a, b, pi, need_pi)
    return gx, ga, (gb if b is not None else None), (gpi if need_pi else None)


_autograd(apply, _apply_setup, _apply_grad)


# ---------------------------------------------------------------------------------------
# dyrelu::spatial_pi: variant C's Eq. 4, pi = min(gamma softmax(z / tau), 1), as one op, so that on
# CUDA it is one launch per direction instead of about sixteen small ones. The fused path calls it
# where pi is Eq. 4 itself (DyReLU.spatial_pi without a logit normalisation); elsewhere the module's
# own ops run. The torch kernels (backends/torch_ops.py) are the reference's forward and, backward,
# the ATen ops autograd runs for it, in its order: the same bits on the CPU.
# ---------------------------------------------------------------------------------------
@_op("spatial_pi")
def spatial_pi(z: Tensor, tau: Tensor) -> Tensor:
    """pi (z's shape and dtype) from logits z (N, 1, *spatial): the softmax runs over all positions."""
    with _NoAutocast(z.device.type):
        return backend.run("spatial_pi", z, z, tau)


@_fake(spatial_pi)
def _(z, tau):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


@_op("spatial_pi_backward")
def spatial_pi_backward(g: Tensor, z: Tensor, tau: Tensor) -> Tensor:
    """grad z of ``spatial_pi`` given grad pi ``g``."""
    with _NoAutocast(z.device.type):
        return backend.run("spatial_pi_backward", z, g, z, tau)


@_fake(spatial_pi_backward)
def _(g, z, tau):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _spatial_pi_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)
    ctx.set_materialize_grads(False)


def _spatial_pi_grad(ctx, g):
    if g is None:
        return None, None
    z, tau = ctx.saved_tensors
    return torch.ops.dyrelu.spatial_pi_backward(g, z, tau), None


_autograd(spatial_pi, _spatial_pi_setup, _spatial_pi_grad)


# ---------------------------------------------------------------------------------------
# dyrelu::pool
# ---------------------------------------------------------------------------------------
def _pool(x: Tensor) -> Tensor:
    """(N, C, *spatial) -> (N, C) mean in x's dtype."""
    return backend.run("pool", x, _as3d(x))


def _pool_grad_of(gp: Tensor, shape) -> Tensor:
    """The gradient the pool (N, C, *spatial) -> (N, C) passes back: gp / L at every position (an expand,
    never materialised: autograd adds it in place)."""
    length = 1
    for d in shape[2:]:
        length *= d
    return (gp / length).reshape(tuple(shape[:2]) + (1,) * (len(shape) - 2)).expand(shape)


def _pool_acc(x: Tensor) -> Tensor:
    """(N, C) mean over the spatial dims in the accumulation dtype (float32, float64 for float64)."""
    return backend.run("pool_acc", x, _as3d(x))


@_op("pool")
def pool(x: Tensor) -> Tensor:
    """Mean over the spatial dims: (N, C, *spatial) -> (N, C)."""
    return _pool(x).contiguous()


@_fake(pool)
def _(x):
    return x.new_empty(x.shape[:2])


def _pool_setup(ctx, inputs, output):
    ctx.shape = inputs[0].shape


def _pool_grad(ctx, gp):
    return _pool_grad_of(gp, ctx.shape)


_autograd(pool, _pool_setup, _pool_grad)


# ---------------------------------------------------------------------------------------
# variant C's logits z = sum_c w_c (s_c x + t_c): the 1x1 conv with one output channel [on the BN
# output]. Computed inside the coefficient ops (no op of its own); the C kernels read x once
# (ATen's convolution backward for this shape took 10x longer on the benchmark network).
# ---------------------------------------------------------------------------------------
def _spatial_z(x: Tensor, ws: Tensor, bias: Optional[Tensor]) -> Tensor:
    """z (N, 1, *spatial) in x's dtype from the folded weights ws (C,) and bias (1,) in the compute dtype."""
    n = x.shape[0]
    z = backend.run("spatial_z", x, _as3d(x), ws, bias)
    return z.to(x.dtype).reshape((n, 1) + tuple(x.shape[2:])).contiguous()


def _spatial_z_backward(gz: Tensor, x: Tensor, ws: Tensor, extra: Optional[Tensor] = None):
    """(grad_x = ws_c gz [+ extra_nc], grad ws (C,), grad bias) for ``_spatial_z``; extra (N, C) in the
    compute dtype is added per row (the pooled context's gradient / L) in the same buffer."""
    gz2 = gz.reshape(x.shape[0], -1).to(ws.dtype)
    gx, g_ws = backend.run("spatial_z_backward", x, _as3d(x), ws, gz2)
    if extra is not None:  # in place into the kernel's fresh buffer
        gx = gx.add_(extra[:, :, None]) if gx.dtype == x.dtype else gx + extra[:, :, None]
    return _match(gx.to(x.dtype), x), g_ws, gz2.sum()


def _no_z(ref: Tensor) -> Tensor:
    return ref.new_empty(0)


# ---------------------------------------------------------------------------------------
# dyrelu::coefs: the whole hyper function, pooling (and C's logits) included, one op per direction
# ---------------------------------------------------------------------------------------
@_op("coefs")
def coefs(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, init_a: Tensor, init_b: Tensor,
          lambda_a: Tensor, lambda_b: Tensor, spatial_w: Optional[Tensor], segments: int, width: int,
          use_bias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(a, b, pooled, z): a, b (N, K, width) in >= float32; pooled (N, C) the context (kept for
    backward, not differentiable); z (N, 1, *spatial) variant C's logits when ``spatial_w`` (the 1x1
    conv's weight) is given, else empty.

    x is the activation's input (pooled here) or an (N, C) context already pooled."""
    pooled = _pool(x) if x.dim() > 2 else x.clone()
    a, b = _hyper.hyper(pooled, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, segments, width, use_bias)
    b = b.contiguous() if use_bias else b.clone(memory_format=torch.contiguous_format)  # never init_b itself
    z = _no_z(x)
    if spatial_w is not None:
        z = _spatial_z(x, spatial_w.reshape(-1).to(acc_dtype(x.dtype)), None)
    return a.contiguous(), b, pooled.contiguous(), z


@_fake(coefs)
def _(x, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, spatial_w, segments, width, use_bias):
    n, k, dt = x.shape[0], init_a.shape[0], acc_dtype(w2.dtype)
    z = _no_z(x) if spatial_w is None else x.new_empty((n, 1) + tuple(x.shape[2:]))
    return (x.new_empty((n, k, width), dtype=dt), x.new_empty((n, k, width), dtype=dt), x.new_empty(x.shape[:2]), z)


@_op("coefs_backward")
def coefs_backward(ga: Optional[Tensor], gb: Optional[Tensor], gz: Optional[Tensor], x: Tensor, pooled: Tensor,
                   w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, lambda_a: Tensor, lambda_b: Tensor,
                   spatial_w: Optional[Tensor], segments: int, width: int,
                   use_bias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad x, grad w1, b1, w2, b2, grad spatial_w (empty without it)).

    grad x is (N, C, 1, ..., 1) (the pooled context's gradient / L, for the caller to expand) unless
    z's gradient is given, then a full (N, C, *spatial) tensor."""
    n, c = x.shape[0], x.shape[1]
    gp, gw1, gb1, gw2, gb2 = _hyper.hyper_backward(ga, gb, pooled, w1, b1, w2, b2, lambda_a, lambda_b,
                                                    segments, width, use_bias)
    length = 1
    for d in x.shape[2:]:
        length *= d
    g_sw = _no_z(x) if spatial_w is None else torch.zeros_like(spatial_w)
    if x.dim() > 2:
        gp = gp / length
    if gz is not None and spatial_w is not None:
        cdt = acc_dtype(x.dtype)
        gx, g_ws, _ = _spatial_z_backward(gz, x, spatial_w.reshape(-1).to(cdt), gp.to(cdt))
        g_sw = g_ws.to(spatial_w.dtype).reshape(spatial_w.shape)
    else:
        gx = gp.reshape((n, c) + (1,) * (x.dim() - 2)).to(x.dtype)
    return gx.contiguous(), gw1.contiguous(), gb1.contiguous(), gw2.contiguous(), gb2.contiguous(), g_sw


@_fake(coefs_backward)
def _(ga, gb, gz, x, pooled, w1, b1, w2, b2, lambda_a, lambda_b, spatial_w, segments, width, use_bias):
    if gz is not None and spatial_w is not None:
        gx = torch.empty_like(x)
    else:
        gx = x.new_empty(tuple(x.shape[:2]) + (1,) * (x.dim() - 2))
    return (gx, torch.empty_like(w1), torch.empty_like(b1), torch.empty_like(w2), torch.empty_like(b2),
            _no_z(x) if spatial_w is None else torch.empty_like(spatial_w))


def _coefs_setup(ctx, inputs, output):
    x, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, spatial_w, segments, width, use_bias = inputs
    ctx.save_for_backward(x, w1, b1, w2, b2, lambda_a, lambda_b, spatial_w)
    ctx.mark_non_differentiable(output[2])
    # pooled is an output without a grad_fn: held here it costs no copy and makes no reference cycle
    # (saving an output with save_for_backward adds two detach ops per call)
    ctx.pooled = output[2]
    ctx.set_materialize_grads(False)
    ctx.meta = (segments, width, use_bias)


def _coefs_grad(ctx, ga, gb, _gpooled, gz):
    x, w1, b1, w2, b2, lambda_a, lambda_b, spatial_w = ctx.saved_tensors
    segments, width, use_bias = ctx.meta
    if ga is None and gb is None and gz is None:
        return (None,) * 13
    gx, gw1, gb1, gw2, gb2, g_sw = torch.ops.dyrelu.coefs_backward(
        ga, gb, gz, x, ctx.pooled, w1, b1, w2, b2, lambda_a, lambda_b, spatial_w, segments, width, use_bias)
    if gx.shape != x.shape:
        gx = gx.expand(x.shape)
    return (gx, gw1, gb1, gw2, gb2, None, None, None, None, g_sw if spatial_w is not None else None,
            None, None, None)


_autograd(coefs, _coefs_setup, _coefs_grad)


# ---------------------------------------------------------------------------------------
# dyrelu::bn_coefs: BN statistics -> the hyper function on the BN output's pooled context ->
# coefficients folded through the BN affine (bn_act.py derives it) [and C's logits on s x + t]
# ---------------------------------------------------------------------------------------
def _coefs_and_state(*args):
    """(A, B, state) from the arguments of ``_bn_coefs_math``: in C++ where the CPU path applies."""
    got = backend.run("bn_coefs_math", args[0], *args)
    return _bn_coefs_math(*args) if got is None else got


def _site_stats(x: Tensor, mean: Optional[Tensor], var: Optional[Tensor]):
    """(m, the variance to normalise with, batch mu, batch var): the batch's statistics when mean and
    var are None (``moments``), else the pool of x and the given ones (batch mu and var then empty)."""
    if mean is None:
        m, var_b, mu_b = IMPLS["moments"](x)
        return m, var_b, mu_b, var_b
    if x.device.type == "cpu":  # (today's bits on the CPU: the mean in x's dtype)
        return IMPLS["pool"](x), var, _no_z(x), _no_z(x)
    # elsewhere the context comes from the fp32 mean, as in training (moments): not a bf16-rounded one
    return _pool_acc(x), var, _no_z(x), _no_z(x)


@_op("bn_coefs")
def bn_coefs(x: Tensor, mean: Optional[Tensor], var: Optional[Tensor], weight: Optional[Tensor],
             bias: Optional[Tensor], eps: float, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, init_a: Tensor,
             init_b: Tensor, lambda_a: Tensor, lambda_b: Tensor, spatial_w: Optional[Tensor], segments: int,
             width: int, use_bias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, List[Tensor]]:
    """(A, B, z, m, batch mu, batch var, state) of a BN + DY-ReLU site on the BN's input x.

    A, B (N, K, C) in float32 (float64 for float64 x): A_k = a_k s, B_k = a_k t + b_k with z = s x + t
    the BN output, s = weight / sqrt(var + eps), t = bias - mu s, normalised with ``mean`` and ``var``
    (running statistics) or, both None, with the batch's. z (N, 1, *spatial): variant C's logits on
    the BN output when ``spatial_w`` is given, else empty. m (the per-(n, c) means of x) and the
    coefficient math's intermediates (``_bn_state``) are kept for backward; the batch's mean and biased
    variance (C,) are for the running update (empty when mean and var are given)."""
    got = backend.run("bn_coefs", x, x, mean, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a,
                      lambda_b, spatial_w, segments, width, use_bias)
    if got is not None:
        return got
    return _bn_coefs_composed(x, mean, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b,
                              spatial_w, segments, width, use_bias)


def _site_z(x: Tensor, spatial_w: Optional[Tensor], state, weight: Optional[Tensor]) -> Tensor:
    """Variant C's logits on the BN output s x + t (empty without spatial_w)."""
    if spatial_w is None:
        return _no_z(x)
    _, ws, zb = _folded_weight(spatial_w, _scale(state, weight), state[1], acc_dtype(x.dtype))
    return _spatial_z(x, ws, zb)


def _bn_coefs_composed(x, mean, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, spatial_w,
                       segments, width, use_bias):
    """``bn_coefs`` as a composition of torch ops (and the C++ coefficient math where it applies)."""
    m, var_used, mu_b, var_b = _site_stats(x, mean, var)
    big_a, big_b, state = _coefs_and_state(m, mean, var_used, weight, bias, eps, w1, b1, w2, b2, init_a, init_b,
                                           lambda_a, lambda_b, segments, width, use_bias)
    return big_a, big_b, _site_z(x, spatial_w, state, weight), m, mu_b, var_b, state


@_fake(bn_coefs)
def _bn_coefs_fake(x, mean, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, spatial_w,
                   segments, width, use_bias):
    n, c, cdt = x.shape[0], x.shape[1], acc_dtype(x.dtype)
    if mean is None:
        m, var_used, mu_b, var_b = (x.new_empty((n, c), dtype=cdt), x.new_empty(c, dtype=cdt),
                                    x.new_empty(c, dtype=cdt), x.new_empty(c, dtype=cdt))
    else:
        mdt = x.dtype if x.device.type == "cpu" else cdt  # as _site_stats
        m, var_used, mu_b, var_b = x.new_empty((n, c), dtype=mdt), var, _no_z(x), _no_z(x)
    # the coefficient math itself on fake tensors: its intermediates' shapes and dtypes (autocast included)
    with _NoAutocast(x.device.type) if _triton_site_ok(x, w1, init_a.shape[0]) else _Nothing():
        big_a, big_b, state = _bn_coefs_math(m, mean, var_used, weight, bias, eps, w1, b1, w2, b2, init_a, init_b,
                                             lambda_a, lambda_b, segments, width, use_bias)
    z = _no_z(x) if spatial_w is None else x.new_empty((n, 1) + tuple(x.shape[2:]))
    return big_a, big_b, z, m, mu_b, var_b, state


@_op("bn_coefs_backward")
def bn_coefs_backward(g_big_a: Optional[Tensor], g_big_b: Optional[Tensor], gz: Optional[Tensor], x: Tensor,
                      m: Tensor, mu: Tensor, var: Tensor, batch: bool, weight: Optional[Tensor],
                      bias: Optional[Tensor], w1: Tensor, w2: Tensor, lambda_a: Tensor, lambda_b: Tensor,
                      spatial_w: Optional[Tensor], state: List[Tensor], segments: int, width: int,
                      use_bias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad x, grad weight, grad bias, grad w1, b1, w2, b2, grad spatial_w); the grads of absent inputs
    are empty. mu, var: the statistics ``bn_coefs`` normalised with; ``batch``: they were the batch's (mu
    then is differentiated through m, and var's gradient reaches x), else the running ones (constants).
    grad x holds the statistics' gradient and, given z's, the spatial conv's, in one buffer."""
    got = backend.run("bn_coefs_backward", x, g_big_a, g_big_b, gz, x, m, mu, var, batch, weight, bias, w1, w2,
                      lambda_a, lambda_b, spatial_w, state, segments, width, use_bias)
    if got is not None:
        return got
    return _site_backward(None, g_big_a, g_big_b, gz, x, m, mu, var, batch, weight, bias, w1, w2, lambda_a, lambda_b,
                          spatial_w, state, segments, width, use_bias)


def _site_backward(gx, g_big_a, g_big_b, gz, x, m, mu, var, batch, weight, bias, w1, w2, lambda_a, lambda_b,
                   spatial_w, state, segments, width, use_bias):
    """``bn_coefs_backward`` with its grad x added into ``gx`` (a fresh tensor shaped like x) in place."""
    g_sw = gs_z = gt_z = None
    if gz is not None and spatial_w is not None:
        # z = sum_c ws_c x_c + sum_c w_c t_c, ws = w s
        s, t = _scale(state, weight), state[1]
        wv, ws, _ = _folded_weight(spatial_w, s, t, s.dtype)
        gx_z, g_ws, g_zb = _spatial_z_backward(gz, x, ws)
        gx = gx_z if gx is None else _add_into(gx, gx_z)
        gs_z, gt_z = g_ws * wv, g_zb * wv
        g_sw = (g_ws * s + g_zb * t).to(spatial_w.dtype).reshape(spatial_w.shape)
    coef_args = (state, g_big_a, g_big_b, m, None if batch else mu, var, weight, bias, w1, w2, lambda_a, lambda_b,
                 gs_z, gt_z, segments, width, use_bias)
    got = backend.run("bn_coefs_math_backward", m, *coef_args)
    gm, gvar, *grads = _bn_coefs_backward(*coef_args) if got is None else got
    gx = _add_stats_grad(gx, x, mu, gm, gvar, batch)
    return (gx, *grads, _no_z(x) if g_sw is None else g_sw)


def _add_into(gx: Tensor, t: Tensor) -> Tensor:
    """gx + t: in place in eager mode (gx is fresh), out of place while the body is traced, where gx may
    be an ``as_strided`` view from ``_match`` (size-1 dims, e.g. channels_last 1x1 maps), on which
    functionalization cannot replay an in-place op (and Inductor reuses the buffer anyway)."""
    return gx + t if _triton.tracing() else gx.add_(t)


def _add_stats_grad(gx: Optional[Tensor], x: Tensor, mu: Tensor, gm: Tensor, gvar: Tensor, batch: bool) -> Tensor:
    """gx (a fresh tensor, or None for zeros) plus the gradient that m (and with batch statistics var)
    pass back to x: the moments' backward (one affine pass, in place where the C kernels run) or the
    pool's (gm / L everywhere)."""
    if not batch:
        stats = _pool_grad_of(gm, x.shape)
        return _match(stats, x) if gx is None else _add_into(gx, stats)
    if gx is not None and backend.run("moments_backward_", x, _as3d(gx), _as3d(x), mu, gm, gvar):
        return gx  # added in place (the C kernel)
    stats = IMPLS["moments_backward"](x, mu, gm, gvar)
    return stats if gx is None else _add_into(gx, stats)


@_fake(bn_coefs_backward)
def _bn_coefs_backward_fake(g_big_a, g_big_b, gz, x, m, mu, var, batch, weight, bias, w1, w2, lambda_a, lambda_b,
                            spatial_w, state, segments, width, use_bias):
    with_z = gz is not None and spatial_w is not None
    return (torch.empty_like(x), _empty(m) if weight is None else torch.empty_like(weight),
            _empty(m) if bias is None else torch.empty_like(bias), torch.empty_like(w1), w1.new_empty(w1.shape[0]),
            torch.empty_like(w2), w2.new_empty(w2.shape[0]), torch.empty_like(spatial_w) if with_z else _no_z(x))


def _normalised_with(mean: Optional[Tensor], var: Tensor, mu_b: Tensor, var_b: Tensor):
    """(mu, var, batch) for a site's backward: the batch's statistics when the forward got no running
    ones (mean None), else the running ones."""
    return (mu_b, var_b, True) if mean is None else (mean, var, False)


def _bn_coefs_setup(ctx, inputs, output):
    x, mean, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, spatial_w = inputs[:15]
    _, _, _, m, mu_b, var_b, state = output
    ctx.mark_non_differentiable(m, mu_b, var_b)
    ctx.save_for_backward(x, mean, var, weight, bias, w1, w2, lambda_a, lambda_b, spatial_w)
    ctx.kept = (m, mu_b, var_b, state)  # outputs without a grad_fn: no reference cycle, no detach ops
    ctx.meta = inputs[15:]  # segments, width, use_bias
    ctx.set_materialize_grads(False)


def _bn_coefs_grad(ctx, g_big_a, g_big_b, gz, *_unused):
    if g_big_a is None and g_big_b is None and gz is None:
        return (None,) * 18
    x, mean, var, weight, bias, w1, w2, lambda_a, lambda_b, spatial_w = ctx.saved_tensors
    m, mu_b, var_b, state = ctx.kept
    gx, g_weight, g_bias, gw1, gb1, gw2, gb2, g_sw = torch.ops.dyrelu.bn_coefs_backward(
        g_big_a, g_big_b, gz, x, m, *_normalised_with(mean, var, mu_b, var_b), weight, bias, w1, w2, lambda_a,
        lambda_b, spatial_w, state, *ctx.meta)
    with_z = gz is not None and spatial_w is not None
    return (gx, None, None, g_weight if weight is not None else None, g_bias if bias is not None else None, None,
            gw1, gb1, gw2, gb2, None, None, None, None, g_sw if with_z else None, None, None, None)


_autograd(bn_coefs, _bn_coefs_setup, _bn_coefs_grad)


# ---------------------------------------------------------------------------------------
# dyrelu::moments
# ---------------------------------------------------------------------------------------
def _row_moments(x3: Tensor, cdt: torch.dtype) -> Tuple[Tensor, Tensor]:
    """(per-(n, c) mean, per-(n, c) biased variance) over L, both (N, C) in ``cdt``."""
    return backend.run("row_moments", x3, x3, cdt)


@_op("moments")
def moments(x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """(m (N, C) mean over the spatial dims, var (C,) biased variance over batch and space, mu (C,)
    the mean, not differentiable: use m.mean(0) to differentiate it), in float32 (float64 for
    float64 x). One read of x."""
    cdt = acc_dtype(x.dtype)
    x3 = _as3d(x)
    got = backend.run("moments", x, x3)  # the same in C++ (_cpu_ops.cpp)
    if got is not None:
        return got
    m, v = _row_moments(x3, cdt)
    mu = m.mean(0)
    # law of total variance: within-row variance plus the variance of the row means (exact)
    var = v.mean(0) + (m - mu).square().mean(0)
    return m.contiguous(), var, mu


@_fake(moments)
def _(x):
    cdt = acc_dtype(x.dtype)
    return x.new_empty(x.shape[:2], dtype=cdt), x.new_empty((x.shape[1],), dtype=cdt), x.new_empty((x.shape[1],), dtype=cdt)


def _affine_rows(x3: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    """alpha_c x + beta_nc on (N, C, L), output like x (a fresh tensor, one pass)."""
    return backend.run("affine_rows", x3, x3, alpha, beta)


@_op("moments_backward")
def moments_backward(x: Tensor, mu: Tensor, g_m: Optional[Tensor], g_var: Optional[Tensor]) -> Tensor:
    """grad_x = g_m / L + g_var 2 (x - mu) / M, one affine pass over x (alpha_c x + beta_nc)."""
    n, c = x.shape[0], x.shape[1]
    x3 = _as3d(x)
    length = x3.shape[2]
    cdt = mu.dtype
    got = backend.run("moments_backward", x, x3, mu, g_m, g_var)  # the same in C++ (_cpu_ops.cpp)
    if got is not None:
        return _match(got, x)
    # d m_nc / dx = 1 / L;  d var / dx = 2 (x - mu) / M  (the mean's own term cancels)
    alpha = torch.zeros(c, dtype=cdt, device=x.device) if g_var is None else g_var.to(cdt) * (2.0 / (n * length))
    beta = -(alpha * mu)
    beta = beta.expand(n, c) if g_m is None else g_m.to(cdt) / length + beta
    return _match(_affine_rows(x3, alpha, beta), x)


@_fake(moments_backward)
def _(x, mu, g_m, g_var):
    return torch.empty_like(x)


def _moments_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])
    ctx.mark_non_differentiable(output[2])
    ctx.mu = output[2]  # no grad_fn: no reference cycle, and no detach ops as save_for_backward(output) has
    ctx.set_materialize_grads(False)


def _moments_grad(ctx, g_m, g_var, _g_mu):
    (x,) = ctx.saved_tensors
    if g_m is None and g_var is None:
        return None
    return torch.ops.dyrelu.moments_backward(x, ctx.mu, g_m, g_var)


_autograd(moments, _moments_setup, _moments_grad)


# ---------------------------------------------------------------------------------------
# dyrelu::running_update
# ---------------------------------------------------------------------------------------
@_op("running_update", mutates_args=("running_mean", "running_var", "num_batches_tracked"))
def running_update(running_mean: Tensor, running_var: Tensor, num_batches_tracked: Optional[Tensor],
                   mu: Tensor, var: Tensor, momentum: float, cumulative: bool, count: int) -> None:
    """BatchNorm2d's running-stat update from the batch's mean mu and biased variance var:
    momentum (or, cumulative, 1 / num_batches_tracked computed on the device: no host sync), the
    unbiased variance, num_batches_tracked + 1."""
    backend.run("running_update", running_mean, running_mean, running_var, num_batches_tracked, mu, var, momentum,
                cumulative, count)


@_fake(running_update)
def _(running_mean, running_var, num_batches_tracked, mu, var, momentum, cumulative, count):
    return None


# ---------------------------------------------------------------------------------------
# dyrelu::bn_act: a whole BN + DY-ReLU site without spatial attention (variants A and B) as one op
# per direction and one autograd node: bn_coefs then apply forward; backward the apply's, then
# bn_coefs_backward's with the statistics' gradient added into the apply's grad_x in place. On the
# CPU each direction is one C++ call (dyrelu_cpu::bn_act), the same ops in the same order as the
# composition below, so the same bits. (Variant C's pi is computed by the module between bn_coefs
# and apply, so a C site calls those two.)
# ---------------------------------------------------------------------------------------
@_op("bn_act")
def bn_act(x: Tensor, mean: Optional[Tensor], var: Optional[Tensor], weight: Optional[Tensor],
           bias: Optional[Tensor], eps: float, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, init_a: Tensor,
           init_b: Tensor, lambda_a: Tensor, lambda_b: Tensor, segments: int, width: int,
           use_bias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, List[Tensor]]:
    """(y, A, B, m, batch mu, batch var, state): y = DY-ReLU(BN(x)) for variants A and B, the rest as
    ``bn_coefs`` returns it (normalised with ``mean`` and ``var``, or both None, the batch's)."""
    got = backend.run("bn_act", x, x, mean, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a,
                      lambda_b, segments, width, use_bias)
    if got is not None:
        return got
    big_a, big_b, _, *rest = IMPLS["bn_coefs"](x, mean, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b,
                                               lambda_a, lambda_b, None, segments, width, use_bias)
    return (IMPLS["apply"](x, big_a, big_b, None), big_a, big_b, *rest)


def _triton_site_ok(x: Tensor, w1: Tensor, k: int) -> bool:
    """The site's (N, C)-sized math runs in _triton_site's kernels (fp32, autocast off)."""
    return backend.choose(x) == "triton" and _triton_site.ok(x, w1, k)


@_fake(bn_act)
def _(x, mean, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, segments, width,
      use_bias):
    big_a, big_b, _, *rest = _bn_coefs_fake(x, mean, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b,
                                            lambda_a, lambda_b, None, segments, width, use_bias)
    return (torch.empty_like(x), big_a, big_b, *rest)


@_op("bn_act_backward")
def bn_act_backward(g: Tensor, x: Tensor, big_a: Tensor, big_b: Tensor, m: Tensor, mu: Tensor, var: Tensor,
                    batch: bool, weight: Optional[Tensor], bias: Optional[Tensor], w1: Tensor, w2: Tensor,
                    lambda_a: Tensor, lambda_b: Tensor, state: List[Tensor], segments: int, width: int,
                    use_bias: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad x, grad weight, grad bias (empty where absent), grad w1, b1, w2, b2); the arguments as
    ``bn_coefs_backward`` takes them. The statistics' gradient is added into the apply's grad x in place."""
    got = backend.run("bn_act_backward", x, g, x, big_a, big_b, m, mu, var, batch, weight, bias, w1, w2, lambda_a,
                      lambda_b, state, segments, width, use_bias)
    if got is not None:
        return got
    gx, ga, gb, _ = IMPLS["apply_backward"](g, x, big_a, big_b, None, False)
    return _site_backward(gx, ga, gb, None, x, m, mu, var, batch, weight, bias, w1, w2, lambda_a, lambda_b, None,
                          state, segments, width, use_bias)[:7]


@_fake(bn_act_backward)
def _(g, x, big_a, big_b, m, mu, var, batch, weight, bias, w1, w2, lambda_a, lambda_b, state, segments, width,
      use_bias):
    return _bn_coefs_backward_fake(None, None, None, x, m, mu, var, batch, weight, bias, w1, w2, lambda_a, lambda_b,
                                   None, state, segments, width, use_bias)[:7]


def _bn_act_setup(ctx, inputs, output):
    x, mean, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b = inputs[:14]
    _, big_a, big_b, m, mu_b, var_b, state = output
    ctx.mark_non_differentiable(big_a, big_b, m, mu_b, var_b)
    ctx.save_for_backward(x, mean, var, weight, bias, w1, w2, lambda_a, lambda_b)
    ctx.kept = (big_a, big_b, m, mu_b, var_b, state)  # outputs without a grad_fn: no reference cycle
    ctx.meta = inputs[14:]  # segments, width, use_bias
    ctx.set_materialize_grads(False)


def _bn_act_grad(ctx, gy, *_unused):
    if gy is None:
        return (None,) * 17
    x, mean, var, weight, bias, w1, w2, lambda_a, lambda_b = ctx.saved_tensors
    big_a, big_b, m, mu_b, var_b, state = ctx.kept
    gx, g_weight, g_bias, gw1, gb1, gw2, gb2 = torch.ops.dyrelu.bn_act_backward(
        gy, x, big_a, big_b, m, *_normalised_with(mean, var, mu_b, var_b), weight, bias, w1, w2, lambda_a,
        lambda_b, state, *ctx.meta)
    return (gx, None, None, g_weight if weight is not None else None, g_bias if bias is not None else None, None,
            gw1, gb1, gw2, gb2, None, None, None, None, None, None, None)


_autograd(bn_act, _bn_act_setup, _bn_act_grad)

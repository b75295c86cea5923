"""The native backend: the one-pass C kernels and the site's C++ operators (``dyrelu_cpu::``, built
once by _native.py), for CPU float32 / float64 inputs that are NC-contiguous with K <= 3."""
from __future__ import annotations

import torch

from .. import _native
from .._tensors import as3d, match

Tensor = torch.Tensor


def _site_ok(x3, w1, k) -> bool:
    return _native.ok(x3, k) and _native.coefs_ok(x3, w1)


def apply(x3, a, b, pi3):
    if x3.dtype != a.dtype or not _native.ok(x3, a.shape[1]):
        return None
    return _native.forward(x3, a.contiguous(), None if b is None else b.contiguous(),
                           None if pi3 is None else pi3.to(x3.dtype))


def apply_backward(g3, x3, a, b, pi3, need_pi):
    if x3.dtype != a.dtype or not _native.ok(x3, a.shape[1]):
        return None
    return _native.backward(g3.contiguous(), x3, a.contiguous(), None if b is None else b.contiguous(),
                            None if pi3 is None else pi3.to(x3.dtype), need_pi)


def moments(x3):
    return _native.moments(x3) if _native.ok(x3, 1) else None


def moments_backward(x3, mu, g_m, g_var):
    return _native.moments_backward(x3, mu, g_m, g_var) if x3.dtype == mu.dtype and _native.ok(x3, 1) else None


def moments_backward_(gx3, x3, mu, g_m, g_var):
    """The same added into gx3 in place; True, or None where the C kernel does not take it."""
    if x3.dtype != mu.dtype or not gx3.is_contiguous() or not _native.ok(x3, 1):
        return None
    _native.moments_backward_(gx3, x3, mu, g_m, g_var)
    return True


def spatial_z(x3, ws, bias):
    if x3.dtype != ws.dtype or not _native.ok(x3, 1):
        return None
    b = torch.zeros(1, dtype=ws.dtype) if bias is None else bias
    return _native.spatial_forward(x3, ws.contiguous(), b.contiguous())


def spatial_z_backward(x3, ws, gz2):
    if x3.dtype != ws.dtype or not _native.ok(x3, 1):
        return None
    return _native.spatial_backward(x3, ws.contiguous(), gz2.contiguous())


def bn_coefs_math(m, *args):
    return _native.bn_coefs(m, *args) if _native.coefs_ok(m, args[5]) else None


def bn_coefs_math_backward(state, g_big_a, g_big_b, m, *args):
    return _native.bn_coefs_backward(state, g_big_a, g_big_b, m, *args) if _native.coefs_ok(m, args[4]) else None


def bn_coefs(x, mean, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, spatial_w,
             segments, width, use_bias):
    x3 = as3d(x)
    if not _site_ok(x3, w1, init_a.shape[0]):
        return None
    big_a, big_b, z, *rest = _native.site_coefs(x3, mean, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b,
                                                lambda_a, lambda_b, spatial_w, segments, width, use_bias)
    if spatial_w is not None:
        z = z.reshape((x.shape[0], 1) + tuple(x.shape[2:]))
    return (big_a, big_b, z, *rest)


def bn_coefs_backward(g_big_a, g_big_b, gz, x, m, mu, var, batch, weight, bias, w1, w2, lambda_a, lambda_b,
                      spatial_w, state, segments, width, use_bias):
    x3 = as3d(x)
    if not _site_ok(x3, w1, state[-1].shape[1]):
        return None
    gx3, *grads = _native.site_coefs_backward(g_big_a, g_big_b, gz, x3, m, mu, var, batch, weight, bias, w1, w2,
                                              lambda_a, lambda_b, spatial_w, state, segments, width, use_bias)
    return (match(gx3, x), *grads)


def bn_act(x, mean, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, segments, width,
           use_bias):
    x3 = as3d(x)
    if not _site_ok(x3, w1, init_a.shape[0]):
        return None
    y3, *rest = _native.bn_act(x3, mean, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a,
                               lambda_b, segments, width, use_bias)
    return (match(y3, x), *rest)


def bn_act_backward(g, x, big_a, big_b, m, mu, var, batch, weight, bias, w1, w2, lambda_a, lambda_b, state,
                    segments, width, use_bias):
    x3 = as3d(x)
    if not _site_ok(x3, w1, big_a.shape[1]):
        return None
    gx3, *grads = _native.bn_act_backward(as3d(g).contiguous(), x3, big_a, big_b, m, mu, var, batch, weight, bias,
                                          w1, w2, lambda_a, lambda_b, state, segments, width, use_bias)
    return (match(gx3, x), *grads)


def inference_apply(x3, a, b, inplace):
    """A prepared network's apply, a and b (N, K, W) in x's dtype; ``inplace`` writes y over x3."""
    if x3.dtype != a.dtype or not _native.ok(x3, a.shape[1]):
        return None
    return _native.forward(x3, a.contiguous(), None if b is None else b.contiguous(), None, inplace)


def inference_site(x3, w1, b1, w2, b2, offset, scale, k, width, inplace):
    """A prepared A/B site (intercepts, every segment dynamic) in one call; tensors in x's dtype."""
    if x3.dtype != w1.dtype or not _native.ok(x3, k):
        return None
    return _native.site(x3, w1, b1, w2, b2, offset, scale, k, width, inplace=inplace)

"""The triton backend: the Triton kernels of _triton.py (apply, pool), _triton_bn.py (BN statistics) and
_triton_site.py (a BN site's (N, C)-sized math, variant C's logits and Eq. 4), on CUDA (on the CPU in
Triton's interpreter for the tests). Every launch goes through ``_triton._launch``: the guarded first
launch and the one failure latch (``_latch``); a kernel whose launch failed returns None."""
from __future__ import annotations

import torch

from .. import _triton, _triton_bn, _triton_site
from .._tensors import NoAutocast, as3d, empty, match

Tensor = torch.Tensor


def apply(x3, a, b, pi3):
    return _triton.apply_forward(x3, a, b, pi3)


def apply_backward(g3, x3, a, b, pi3, need_pi):
    return _triton.apply_backward(g3, x3, a, b, pi3, need_pi)


def pool(x3):
    pooled = _triton.pool(x3)
    return None if pooled is None else pooled.to(x3.dtype)


def pool_acc(x3):
    pooled = _triton.pool(x3)
    return None if pooled is None else pooled.contiguous()


def row_moments(x3, cdt):
    return _triton_bn.row_moments(x3) if _triton_bn.available(x3.device) else None


def affine_rows(x3, alpha, beta):
    if not _triton_bn.available(x3.device):
        return None
    return _triton_bn.affine_rows(x3, alpha.contiguous(), beta.contiguous())


def spatial_pi(z, tau):
    return _triton_site.spatial_pi(z, tau)


def spatial_pi_backward(g, z, tau):
    return _triton_site.spatial_pi_backward(g, z, tau)


def running_update(running_mean, running_var, num_batches_tracked, mu, var, momentum, cumulative, count):
    # one launch instead of five
    return _triton_site.running_update(running_mean, running_var, num_batches_tracked, mu, var, momentum,
                                       cumulative, count) or None


def bn_coefs(x, mean, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, spatial_w,
             segments, width, use_bias):
    """Statistics, _fwd1, _fwd2 [and C's logits]: three or four launches."""
    if not _triton_site.ok(x, w1, init_a.shape[0]):
        return None
    x3 = as3d(x)
    with NoAutocast(x.device.type):  # the fake's dtypes: fp32 state, as the kernels write it
        got = _triton_site.coefs(x3, mean, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a,
                                 lambda_b, segments, width, use_bias)
    if got is None:
        return None
    big_a, big_b, m, mu_b, var_b, state = got
    z = empty(x)
    if spatial_w is not None:
        z = _triton_site.spatial_z(_triton._prepare(x3)[0], spatial_w, state[0], state[1], weight)
        if z is None:
            return None
        z = z.reshape((x.shape[0], 1) + tuple(x.shape[2:]))
    return big_a, big_b, z, m, mu_b, var_b, state


def bn_coefs_backward(g_big_a, g_big_b, gz, x, m, mu, var, batch, weight, bias, w1, w2, lambda_a, lambda_b,
                      spatial_w, state, segments, width, use_bias):
    """[The logits' sums], _bwd1, _bwd2, grad x: three or four launches."""
    k = state[-1].shape[1]
    if not _triton_site.ok(x, w1, k) or state[0].dtype != torch.float32:
        return None
    x3 = _triton._prepare(as3d(x))[0]
    n, c, l = x3.shape
    zeros = None
    if g_big_a is None or g_big_b is None:
        zeros = torch.zeros((n, k, c), dtype=torch.float32, device=x.device)
    ga = (zeros if g_big_a is None else g_big_a.to(torch.float32).contiguous())[None]
    gb = (zeros if g_big_b is None else g_big_b.to(torch.float32).contiguous())[None]
    with_z = gz is not None and spatial_w is not None
    gz2 = gz.reshape(n, l).contiguous() if with_z else None
    zsums = _triton_site.z_sums(x3, gz2) if with_z else None
    if with_z and zsums is None:
        return None
    back = _triton_site.coefs_backward(ga, gb, 1, m, mu, batch, l, weight, w1, w2, lambda_a, lambda_b, state,
                                       segments, width, use_bias, zsums, spatial_w if with_z else None)
    if back is None:
        return None
    gp, alpha, coefp, v, g_weight, g_bias, _gvar, gw1, gb1, gw2, gb2, g_sw, wsz = back
    gx3 = torch.empty_strided(x3.shape, x3.stride(), dtype=x.dtype, device=x.device)
    if not _triton_site.add_stats_grad(gx3, x3, alpha, coefp, v, gp, accum=False, wsz=wsz if with_z else None,
                                       gz2=gz2):
        return None
    return (match(gx3, x), *_param_grads(m, g_weight, g_bias, weight, bias, gw1, gb1, gw2, gb2, w1, w2),
            g_sw.to(spatial_w.dtype).reshape(spatial_w.shape) if with_z else empty(x))


def bn_act_backward(g, x, big_a, big_b, m, mu, var, batch, weight, bias, w1, w2, lambda_a, lambda_b, state,
                    segments, width, use_bias):
    """The apply's backward (its partial sums left unsummed), the coefficient backward's two kernels, the
    statistics' gradient added into grad x in place: four launches."""
    if not _triton_site.ok(x, w1, big_a.shape[1]) or state[0].dtype != torch.float32:
        return None
    x3 = as3d(x)
    got = _triton.apply_backward(as3d(g), x3, big_a, big_b, None, False, raw=True)
    if got is None:
        return None
    gx3, psx, ps, _ = got
    back = _triton_site.coefs_backward(psx, ps, psx.shape[0], m, mu, batch, x3.shape[2], weight, w1, w2, lambda_a,
                                       lambda_b, state, segments, width, use_bias)
    if back is None:
        return None
    gp, alpha, coefp, v, g_weight, g_bias, _gvar, gw1, gb1, gw2, gb2, _, _ = back
    if not _triton_site.add_stats_grad(gx3, _triton._prepare(x3)[0], alpha, coefp, v, gp):
        return None
    return (match(gx3, x), *_param_grads(m, g_weight, g_bias, weight, bias, gw1, gb1, gw2, gb2, w1, w2))


def _param_grads(m, g_weight, g_bias, weight, bias, gw1, gb1, gw2, gb2, w1, w2):
    """The fp32 parameter gradients in the parameters' dtypes (empty where a parameter is absent)."""
    return (empty(m) if weight is None else g_weight.to(weight.dtype),
            empty(m) if bias is None else g_bias.to(bias.dtype), gw1.to(w1.dtype), gb1.to(w1.dtype),
            gw2.to(w2.dtype), gb2.to(w2.dtype))

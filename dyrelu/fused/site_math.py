"""The (N, C)-sized math of a BN + DY-ReLU site, as torch ops: the BN fold, the hyper function on the
BN output's pooled context, the folding into the apply's coefficients (bn_act.py derives it), and its
hand-written backward. The registered ops (ops.py) compose it where no backend kernel takes the input;
``dyrelu_cpu::bn_coefs`` / ``bn_coefs_backward`` (_cpu_ops.cpp) run the same ops in the same order on
the CPU, and _triton_site.py's kernels the same math on CUDA."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _hyper
from ._tensors import acc_dtype, empty

Tensor = torch.Tensor


def folded_weight(w: Tensor, s: Optional[Tensor], t: Optional[Tensor], cdt: torch.dtype):
    wv = w.reshape(-1).to(cdt)
    ws = wv if s is None else wv * s.to(cdt)
    bias = None if t is None else (wv * t.to(cdt)).sum().reshape(1)
    return wv, ws, bias


def bn_fold(m, mu, var, weight, bias, eps):
    cdt = acc_dtype(m.dtype)
    m = m.to(cdt)
    mu = m.mean(0) if mu is None else mu.to(cdt)
    r = torch.rsqrt(var.to(cdt) + eps)
    s = r if weight is None else r * weight.to(cdt)
    t = -mu * s if bias is None else torch.addcmul(bias.to(cdt), mu, s, value=-1.0)
    pooled = torch.addcmul(t, m, s)  # DY-ReLU's context: the spatial mean of the BN output
    return mu, r, s, t, pooled


def hyper_input(pooled: Tensor, w1: Tensor) -> Tensor:
    return pooled if torch.is_autocast_enabled(pooled.device.type) else pooled.to(w1.dtype)


def bn_state(m, mu, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, segments, width,
              use_bias):
    """([r, t, ph, h_pre, h, sig, a], b): the coefficient math's intermediates that its backward reuses
    (ph the context in the hyper function's dtype; a, b in the compute dtype), none of them an input (an
    op's outputs may not alias its inputs: mu and s are recomputed); the same ops as ``bn_state`` in
    _cpu_ops.cpp, which the CPU runs."""
    _, r, s, t, pooled = bn_fold(m, mu, var, weight, bias, eps)
    ph = hyper_input(pooled, w1)
    h_pre, h, sig, a, b = _hyper.hyper_state(ph, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, segments,
                                             width, use_bias)
    return [r, t, ph, h_pre, h, sig, a.to(s.dtype)], b.to(s.dtype)


def scale(state, weight: Optional[Tensor]) -> Tensor:
    """s = r weight (the BN's per-channel scale) from the state, as ``bn_fold`` computes it."""
    r = state[0]
    return r if weight is None else r * weight.to(r.dtype)


def coefs_math(m, mu, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, segments,
                   width, use_bias):
    """(A, B, state); the same ops as ``dyrelu_cpu::bn_coefs`` (_cpu_ops.cpp), which the CPU runs."""
    state, b = bn_state(m, mu, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b,
                         segments, width, use_bias)
    t, a = state[1], state[6]
    s = scale(state, weight)
    big_a = (a * s).contiguous()
    big_b = torch.addcmul(b, a, t).contiguous()  # t != 0 in general: an intercept even without DY-ReLU's own
    return big_a, big_b, state


def coefs_math_backward(state, g_big_a, g_big_b, m, mu, var, weight, bias, w1, w2, lambda_a, lambda_b, gs_z, gt_z,
                       segments, width, use_bias):
    """(grad m, var, weight, bias, w1, b1, w2, b2): the backward of ``coefs_math`` given its state and
    variant C's terms of grad s and grad t (or None); mu: the mean it normalised with, if given (else the
    batch's, m.mean(0)). The same ops as ``dyrelu_cpu::bn_coefs_backward`` (_cpu_ops.cpp), which the CPU runs."""
    r, t, ph, h_pre, h, sig, a = state
    ph, h = ph.to(w1.dtype), h.to(w2.dtype)  # no-ops but where autocast ran the forward's FCs
    cdt = r.dtype
    n, c = m.shape[0], m.shape[1]
    mc = m.to(cdt)
    mu_v = mc.mean(0) if mu is None else mu.to(cdt)  # as bn_fold computes them
    s = scale(state, weight)
    k = a.shape[1]
    g_big_a = torch.zeros((n, k, c), dtype=cdt, device=m.device) if g_big_a is None else g_big_a.to(cdt)
    g_big_b = torch.zeros((n, k, c), dtype=cdt, device=m.device) if g_big_b is None else g_big_b.to(cdt)
    # A = a s, B = b + a t  (a broadcast over C for variant A)
    ga = g_big_a * s + g_big_b * t
    gb = g_big_b
    if a.shape[2] != ga.shape[2]:
        ga, gb = ga.sum(2, keepdim=True), gb.sum(2, keepdim=True)
    gs = (g_big_a * a).sum((0, 1))
    gt = (g_big_b * a).sum((0, 1))
    if gs_z is not None:
        gs = gs + gs_z
    if gt_z is not None:
        gt = gt + gt_z
    gp, gw1, gb1, gw2, gb2 = _hyper.hyper_backward_from(ga, gb, ph, h_pre, h, sig, w1, w2, lambda_a, lambda_b,
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
    g_weight = empty(m) if weight is None else (gs * r).to(weight.dtype)
    g_bias = empty(m) if bias is None else gt.to(bias.dtype)
    return (gm.to(m.dtype).contiguous(), gvar.to(var.dtype).contiguous(), g_weight, g_bias,
            gw1.contiguous(), gb1.contiguous(), gw2.contiguous(), gb2.contiguous())

"""BatchNorm2d followed by DY-ReLU, fused: ``bn_dyrelu(x, bn, act)`` == ``act(bn(x))``.

The BN output is affine in its input per channel, z = s x + t with s = gamma / sqrt(var + eps) and
t = beta - mu s, and every DY-ReLU segment is affine in z, so

    y = max_k(a_k z + b_k) = max_k(A_k x + B_k),   A_k = a_k s,  B_k = a_k t + b_k     (per (n, c))

is the existing fused apply (``piecewise_apply``) run on the *conv output* x with folded
coefficients: z is never written, and only x is kept for backward (the unfused pair keeps x for BN
and z for DY-ReLU). The statistics come from one read of x (``moments``, the implementation of
``dyrelu::moments``): the per-(n, c) means and variances; the channel mean and variance follow from
them (law of total variance), and
the pooled context the hyper function needs is m_nc s + t, so DY-ReLU's pooling pass is gone too.
Variant C's spatial conv on z is a conv on x with weights w s and bias sum(w t).

A site is one registered op per direction plus ``dyrelu::running_update`` in training (on the
device, no host sync). For A and B, ``dyrelu::bn_act`` / ``bn_act_backward`` (one autograd node; on the
CPU one C++ call each): the statistics (``moments``, or the pool with running statistics), the
coefficients (s, t, the pooled context, the hyper function, the folding above), the apply. For C,
``dyrelu::bn_coefs`` / ``bn_coefs_backward`` compute the statistics, the coefficients and C's spatial
logits on s x + t, and ``dyrelu::apply`` follows, because C's pi comes from the module's own ops
(``DyReLU.spatial_pi``) in between.

Backward: the apply's per-(n, c, k) sums of g x and g (already computed for grad a, b) give
grad A, B; the coefficient backward turns them into grad gamma, beta, m and var by hand on
(N, C)-sized tensors, from the intermediates the forward kept (the FC chain is not run again). The
statistics' gradient is one per-(n, c) affine pass over x, grad_x += alpha_c x + beta_nc, added in
place into the apply's grad_x (A, B) or the spatial conv's (C). So the BN's own backward reductions
ride on the apply's.

Where the fusion does not apply (see ``supports_bn_act``: a BN subclass such as ``SyncBatchNorm``
or the engine's global batch norm, whose statistics need collectives; a non-DyReLU activation;
``impl="reference"``; tracing / export; unsupported inputs) ``bn_dyrelu`` returns ``act(bn(x))``.
Training-mode statistics and running-stat updates follow ``torch.nn.BatchNorm2d`` exactly
(momentum or cumulative average, unbiased running variance, num_batches_tracked).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .._hyper import in_export_context
from . import pi_from_logits, supports

__all__ = ["bn_dyrelu", "supports_bn_act", "BNDyReLU", "moments"]

Tensor = torch.Tensor


def moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Differentiable (per-(n, c) spatial mean (N, C), channel biased variance (C,))."""
    m, var, _ = torch.ops.dyrelu.moments(x)
    return m, var


def supports_bn_act(bn: nn.Module, act: nn.Module, x: Tensor) -> bool:
    """True where ``bn_dyrelu`` runs the fused path (otherwise it computes ``act(bn(x))``)."""
    # exactly BatchNorm2d: SyncBatchNorm and the engine's global BN compute their statistics with
    # collectives across ranks, which the fused statistics pass does not do
    if type(bn) is not nn.BatchNorm2d or not getattr(act, "fusable_dyrelu", False) or act.impl == "reference":
        return False
    if x.dim() != 4 or x.shape[1] != bn.num_features or in_export_context():
        return False
    return supports(act, x)


def bn_dyrelu(x: Tensor, bn: nn.Module, act: nn.Module) -> Tensor:
    """``act(bn(x))``, fused where ``supports_bn_act(bn, act, x)``; same values and gradients."""
    if not supports_bn_act(bn, act, x):
        return act(bn(x))
    act._check(x)
    batch = bn.training or bn.running_mean is None  # normalise with the batch's statistics
    count = x.numel() // x.shape[1]
    if batch and count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    mean, var = (None, None) if batch else (bn.running_mean, bn.running_var)
    affine = (bn.weight, bn.bias) if bn.affine else (None, None)
    hyper = (act.fc1.weight, act.fc1.bias, act.fc2.weight, act.fc2.bias, act.init_a, act.init_b, act.lambda_a,
             act.lambda_b)
    shape = (act.dynamic_segments, act.coef_width, act.use_bias)
    if act.spatial is None:  # A, B: the whole site is one op per direction
        y, _, _, _, batch_mu, batch_var, _ = torch.ops.dyrelu.bn_act(x, mean, var, *affine, float(bn.eps), *hyper,
                                                                     *shape)
    else:  # C: pi comes from the module's own ops between the coefficients and the apply
        big_a, big_b, z, _, batch_mu, batch_var, _ = torch.ops.dyrelu.bn_coefs(
            x, mean, var, *affine, float(bn.eps), *hyper, act.spatial.weight, *shape)
        y = torch.ops.dyrelu.apply(x, big_a, big_b, pi_from_logits(act, x, z))
    if batch and bn.training and bn.track_running_stats and bn.running_mean is not None:
        with torch.no_grad():
            torch.ops.dyrelu.running_update(bn.running_mean, bn.running_var, bn.num_batches_tracked, batch_mu,
                                            batch_var, 0.0 if bn.momentum is None else float(bn.momentum),
                                            bn.momentum is None, count)
    return y


class BNDyReLU(nn.Module):
    """``bn`` then ``act`` (a DyReLU) as one module, fused by ``bn_dyrelu``; state_dict keys
    ``bn.*`` and ``act.*`` are those of ``nn.Sequential(bn, act)`` named ``bn`` / ``act``."""

    def __init__(self, bn: nn.BatchNorm2d, act: nn.Module):
        super().__init__()
        self.bn = bn
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return bn_dyrelu(x, self.bn, self.act)

"""Precise BatchNorm statistics (trainer.precise_bn_batches): before an evaluation, replace the
running means and variances, an exponential average over weights that kept changing, by the
population statistics of the current weights over a number of training batches. fvcore's
``update_bn_stats`` does the work (the technique of Wu & Johnson, "Rethinking Batch in
BatchNorm", Sec. 3); this module feeds it, keeps buffers in place and agrees across ranks.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from dyrelu.flops import _import_fvcore_nn

_import_fvcore_nn()  # fvcore.nn's import warns about torch.jit.script (fvcore's doing): silenced there
from fvcore.nn.precise_bn import get_bn_modules, update_bn_stats  # noqa: E402

from . import checkpoint as ckpt_io
from .distributed import all_reduce_sum

log = logging.getLogger(__name__)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, inputs: Iterable[torch.Tensor], num_batches: int, world_size: int = 1) -> int:
    """Recompute every BatchNorm's running statistics of ``model`` on ``num_batches`` inputs.

    The model runs in train mode for this (and goes back to its mode after). Returns the number
    of BN layers updated. Without SyncBatchNorm, ranks saw different batches: their statistics
    are averaged (with SyncBatchNorm they are already equal, and averaging changes nothing).
    The RNG state is restored afterwards, so the training's random stream does not depend on
    whether precise BN ran.
    """
    was_training = model.training
    model.train()
    bns = get_bn_modules(model)
    if not bns:
        model.train(was_training)
        return 0
    # fvcore assigns new tensors to running_mean / running_var; copy the values back into the
    # original buffers so DDP, torch.compile and the EMA keep holding the live tensors.
    buffers = [(bn.running_mean, bn.running_var) for bn in bns]
    # fvcore counts a BN layer's batch with a forward pre-hook on it and skips layers whose
    # forward did not run; fused BN + DY-ReLU sites (models' fuse_bn_act) never call the BN's
    # forward, so their statistics came out as zeros (a zero variance: inf in evaluation). The
    # plain sequence computes the same statistics.
    fused = [m for m in model.modules() if getattr(m, "fuse_bn_act", False)]
    for m in fused:
        m.fuse_bn_act = False
    rng = ckpt_io.rng_state()
    try:
        update_bn_stats(model, inputs, num_iters=num_batches)
    finally:
        ckpt_io.set_rng_state(rng)
        model.train(was_training)
        for m in fused:
            m.fuse_bn_act = True
    for bn, (mean, var) in zip(bns, buffers):
        mean.copy_(bn.running_mean)
        var.copy_(bn.running_var)
        bn.running_mean, bn.running_var = mean, var
    if world_size > 1:
        flat = torch.cat([t.reshape(-1).double() for pair in buffers for t in pair])
        flat = all_reduce_sum(flat) / world_size
        offset = 0
        for pair in buffers:
            for t in pair:
                t.copy_(flat[offset: offset + t.numel()].view_as(t))
                offset += t.numel()
    return len(bns)

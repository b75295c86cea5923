"""Batch norm with statistics over the global batch on any backend (gloo/CPU included).

torch.nn.SyncBatchNorm runs on GPUs only. Under DDP on CPUs each rank would normalise
with its own half of the batch, so a 2-process run would not match a 1-process run with
the same global batch. This module all-reduces the batch moments with the differentiable
collective, and autograd gives the matching backward.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce

# The replacement it names (_functional_collectives) has no autograd; this one does.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.nn\.functional\.all_reduce is deprecated.*")


_GROUP = None


def _stats_group():
    """A process group of its own: DDP's gradient all-reduces run on the default group from
    its own thread, and collectives interleaved on one gloo group can pair up wrongly."""
    global _GROUP
    if _GROUP is None:
        _GROUP = dist.new_group(backend=dist.get_backend())
    return _GROUP


class GlobalBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, 2, 3]
        # float64 on CPUs (where this runs: GPUs use SyncBatchNorm): autograd through the moments is
        # less accurate than the native fused backward, and float64 makes it the more accurate one.
        xf = x.double() if x.device.type == "cpu" else x.float()
        c = x.shape[1]
        # Two passes (mean, then centred squares) as the native kernel does, not E[x^2] - E[x]^2,
        # so the result matches one process on the whole batch to float rounding.
        n = float(x.numel() // c) * dist.get_world_size()
        group = _stats_group()
        mean = all_reduce(xf.sum(dims), group=group) / n
        centred = xf - mean.reshape(1, c, 1, 1)
        var = all_reduce((centred * centred).sum(dims), group=group) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_var.lerp_((var.detach() * n / max(n - 1.0, 1.0)).to(self.running_var.dtype), m)
        shape = (1, c, 1, 1)
        y = centred * torch.rsqrt(var.reshape(shape) + self.eps)
        if self.affine:
            y = y * self.weight.reshape(shape).to(y.dtype) + self.bias.reshape(shape).to(y.dtype)
        return y.to(x.dtype)


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d (not subclasses with their own forward) by GlobalBatchNorm2d, keeping state."""
    if type(module) is nn.BatchNorm2d:
        new = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        ref = module.running_mean if module.running_mean is not None else module.weight
        new.to(device=ref.device, dtype=ref.dtype).load_state_dict(module.state_dict())
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_global_batchnorm(child))
    return module

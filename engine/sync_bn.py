"""Batch norm with statistics over the global batch on any backend (gloo/CPU included).

torch.nn.SyncBatchNorm runs on GPUs only. Under DDP on CPUs each rank would normalise
with its own half of the batch, so a 2-process run would not match a 1-process run with
the same global batch. This module all-reduces the batch moments with the differentiable
collective, and autograd gives the matching backward.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.nn.functional import all_reduce


class GlobalBatchNorm2d(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0, 2, 3]
        xf = x.float()
        count = torch.tensor([float(x.numel() // x.shape[1])], device=x.device)
        moments = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        moments = all_reduce(moments)
        c = x.shape[1]
        n = moments[-1]
        mean = moments[:c] / n
        var = (moments[c : 2 * c] / n - mean * mean).clamp(min=0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_var.lerp_((var.detach() * n / (n - 1).clamp(min=1)).to(self.running_var.dtype), m)
        shape = (1, c, 1, 1)
        y = (xf - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + self.eps)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y.to(x.dtype)


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d (not subclasses with their own forward) by GlobalBatchNorm2d, keeping state."""
    if type(module) is nn.BatchNorm2d:
        new = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.to(next(iter(module.state_dict().values())).device)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_global_batchnorm(child))
    return module

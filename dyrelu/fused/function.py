"""The public functions of the fused apply, on top of the registered ops (ops.py).

``piecewise_apply(x, a, b, pi)`` computes ``max_k(a_k x + b_k)`` (times ``pi`` for variant C)
for x of shape (N, C, *spatial), a and b of shape (N, K, C|1), pi of shape (N, 1, *spatial).
Forward saves only x, a, b (and pi), no K-sized temporaries; backward recomputes the winning
segment and returns grad_x = g * a_sel [* pi], grad_a_k = sum_L(g x [sel == k]),
grad_b_k = sum_L(g [sel == k]) and, for C, grad_pi = sum_c(g * max_k(...)): one pass over
(g, x) in the Triton and C kernels; on the CPU without them a few in-place / read-only ATen
passes (see _torch_kernels.py). Ties pick the lowest k. Which kernels run is decided by
the kernel table (``backend.run``) inside the op, at run time, in every mode (eager, compiled, exported).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import backend, ops

BACKENDS = backend.BACKENDS
forced_backend = backend.forced
select_backend = backend.choose


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """(N, C, *spatial) -> (N, C) mean over the spatial dims; (N, C) is returned as is."""
    return x if x.dim() == 2 else torch.ops.dyrelu.pool(x)


def piecewise_apply(x: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor] = None,
                    pi: Optional[torch.Tensor] = None) -> torch.Tensor:
    """max_k(a_k x + b_k) [* pi] with the fused forward and one-pass backward."""
    if x.dim() < 2 or a.dim() != 3 or a.shape[0] != x.shape[0] or a.shape[2] not in (1, x.shape[1]):
        raise ValueError(f"piecewise_apply: x {tuple(x.shape)} needs a of shape (N, K, C|1), got {tuple(a.shape)}")
    if b is not None and b.shape != a.shape:
        raise ValueError(f"piecewise_apply: b {tuple(b.shape)} must match a {tuple(a.shape)}")
    return torch.ops.dyrelu.apply(x, a, b, pi)

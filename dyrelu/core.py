"""DY-ReLU, the paper's math (Chen et al., ECCV 2020, Eq. 1-4), as readable PyTorch.

y_c = max_k { a_c^k(x) x_c + b_c^k(x) }                                   (Eq. 1)
theta(x) = FC2(ReLU(FC1(GAP(x)))), normalised by 2*sigmoid - 1             (Eq. 2)
a_c^k = alpha^k + lambda_a * da_c^k,  b_c^k = beta^k + lambda_b * db_c^k   (Eq. 3)
DY-ReLU-C: the coefficients are multiplied by pi_hw = min(gamma * softmax(z / tau)_hw, 1),
z = conv1x1(x) with one output channel, gamma = H*W/3                      (Eq. 4)

Because pi_hw >= 0, max_k(pi a_k x + pi b_k) = pi * max_k(a_k x + b_k): variant C is
variant B's output scaled per position. The fused paths rely on this identity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

VARIANTS = ("A", "B", "C")
IMPLS = ("auto", "reference", "fused")


@dataclass
class Coefficients:
    """What the hyper function produced for one input.

    a, b: (N, K, C) for B and C, (N, K, 1) for A (b is all zeros when use_bias=False).
    pi:   (N, 1, *spatial) spatial attention for C, None otherwise.
    """

    a: torch.Tensor
    b: torch.Tensor
    pi: Optional[torch.Tensor] = None


def _pair_tuple(name: str, value: Sequence[float], k: int) -> tuple:
    value = tuple(float(v) for v in value)
    if len(value) < k:
        raise ValueError(f"{name} has {len(value)} values but k={k}: give one per segment, e.g. {name}=(1.0, 0.0)")
    return value[:k]


def piecewise_max(x: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """max_k(a_k x + b_k) with a, b shaped (N, K, C|1); a running max keeps no K-sized temporary."""
    shape = (x.shape[0], a.shape[2]) + (1,) * (x.dim() - 2)
    y = None
    for k in range(a.shape[1]):
        seg = x * a[:, k].reshape(shape)
        if b is not None:
            seg = seg + b[:, k].reshape(shape)
        y = seg if y is None else torch.maximum(y, seg)
    return y


def spatial_attention(z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """pi = min(gamma * softmax(z / tau), 1) over all positions, gamma = positions / 3 (Eq. 4)."""
    n = z.shape[0]
    positions = z[0, 0].numel()
    attn = torch.softmax(z.reshape(n, -1).float() / tau, dim=1) * (positions / 3.0)
    return attn.clamp(max=1.0).reshape(z.shape).to(z.dtype)


class DyReLU(nn.Module):
    """Dynamic ReLU, variants A (shared), B (per channel) and C (per channel and position).

    Works on (N, C), (N, C, L) and (N, C, H, W) inputs. ``impl`` picks the reference
    path (this file) or the fused path (``dyrelu.fused``); both compute the same function.
    """

    def __init__(
        self,
        channels: int,
        variant: str = "B",
        k: int = 2,
        reduction: int = 8,
        lambda_a: float = 1.0,
        lambda_b: float = 0.5,
        init_a: Sequence[float] = (1.0, 0.0),
        init_b: Sequence[float] = (0.0, 0.0),
        use_bias: bool = True,
        dynamic_segments: Optional[int] = None,
        tau: float = 10.0,
        impl: str = "auto",
        hidden: Optional[int] = None,
    ):
        super().__init__()
        variant = str(variant).upper()
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is not one of {VARIANTS}")
        if impl not in IMPLS:
            raise ValueError(f"impl={impl!r} is not one of {IMPLS}")
        if k < 1:
            raise ValueError(f"k={k} must be >= 1")
        if channels < 1 or reduction < 1:
            raise ValueError(f"channels={channels} and reduction={reduction} must be >= 1")
        m = k if dynamic_segments is None else int(dynamic_segments)
        if not 1 <= m <= k:
            raise ValueError(f"dynamic_segments={dynamic_segments} must be between 1 and k={k}")
        self.channels, self.variant, self.k, self.reduction = channels, variant, k, reduction
        self.use_bias, self.dynamic_segments, self.impl = use_bias, m, impl
        self.hidden = int(hidden) if hidden is not None else max(1, channels // reduction)
        # Decided once here (not per call) so torch.compile sees no data-dependent branch.
        self.has_intercept = bool(use_bias or any(float(v) != 0.0 for v in _pair_tuple("init_b", init_b, k)))

        # Constants are buffers so .to(device) / .half() / state_dict carry them.
        self.register_buffer("init_a", torch.tensor(_pair_tuple("init_a", init_a, k)))
        self.register_buffer("init_b", torch.tensor(_pair_tuple("init_b", init_b, k)))
        self.register_buffer("lambda_a", torch.tensor(float(lambda_a)))
        self.register_buffer("lambda_b", torch.tensor(float(lambda_b)))
        self.register_buffer("tau", torch.tensor(float(tau)))

        width = 1 if variant == "A" else channels
        self.coef_width = width
        self.fc1 = nn.Linear(channels, self.hidden)
        self.fc2 = nn.Linear(self.hidden, (2 if use_bias else 1) * m * width)
        self.spatial = nn.Conv2d(channels, 1, kernel_size=1, bias=False) if variant == "C" else None

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, variant={self.variant}, k={self.k}, reduction={self.reduction}, "
            f"hidden={self.hidden}, use_bias={self.use_bias}, dynamic_segments={self.dynamic_segments}, impl={self.impl}"
        )

    def set_tau(self, tau: float) -> None:
        self.tau.fill_(float(tau))

    # ---- hyper function -------------------------------------------------------------
    def _check(self, x: torch.Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(f"DyReLU({self.channels}) expects (N, {self.channels}, ...) input, got {tuple(x.shape)}")

    def hyper(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C) pooled context -> a, b of shape (N, K, width). b is zeros without intercepts."""
        n, k, m, w = pooled.shape[0], self.k, self.dynamic_segments, self.coef_width
        theta = 2.0 * torch.sigmoid(self.fc2(F.relu(self.fc1(pooled)))) - 1.0
        theta = theta.reshape(n, 2 if self.use_bias else 1, m, w)
        init_a = self.init_a.to(theta.dtype).reshape(1, k, 1)
        init_b = self.init_b.to(theta.dtype).reshape(1, k, 1)
        da, db = theta[:, 0], (theta[:, 1] if self.use_bias else None)
        if m < k:  # the last k-m segments stay at their init values (Table 6)
            pad = theta.new_zeros(n, k - m, w)
            da = torch.cat([da, pad], 1)
            db = torch.cat([db, pad], 1) if db is not None else None
        a = init_a + self.lambda_a.to(theta.dtype) * da
        b = init_b + self.lambda_b.to(theta.dtype) * db if db is not None else init_b.expand(n, k, w)
        return a, b

    def attention(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        if self.spatial is None:
            return None
        xs = x.reshape(x.shape[0], x.shape[1], -1, 1) if x.dim() != 4 else x
        z = self.spatial(xs)  # (N, 1, *, *)
        return spatial_attention(z, self.tau).reshape((x.shape[0], 1) + tuple(x.shape[2:]))

    @torch.no_grad()
    def coefficients(self, x: torch.Tensor) -> Coefficients:
        """a, b (and pi for C) that this module would use on ``x``, for analysis tools."""
        self._check(x)
        pooled = x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x
        a, b = self.hyper(pooled)
        return Coefficients(a=a, b=b, pi=self.attention(x))

    # ---- forward ----------------------------------------------------------------------
    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        pooled = x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x
        a, b = self.hyper(pooled)
        a, b = a.to(x.dtype), b.to(x.dtype)
        y = piecewise_max(x, a, b if self.has_intercept else None)
        pi = self.attention(x)
        return y if pi is None else y * pi

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl != "reference":
            from . import fused

            if fused.supports(self, x):
                return fused.forward(self, x)
            if self.impl == "fused":
                raise ValueError(f"impl='fused' does not support input {tuple(x.shape)} {x.dtype} on {x.device}")
        return self.forward_reference(x)


def set_tau(model: nn.Module, tau: float) -> int:
    """Set the softmax temperature of every DY-ReLU-C in ``model``; returns how many were set."""
    count = 0
    for mod in model.modules():
        if isinstance(mod, DyReLU) and mod.variant == "C":
            mod.set_tau(tau)
            count += 1
    return count

"""DY-ReLU's static twin: Eq. 3's coefficients with the hyper function's output replaced by constants.

The paper asks whether DY-ReLU's gain comes from the input dependence ("dynamic vs its static
counterpart"). ``StaticDyReLU`` answers it with the function family held fixed: the same K
segments, lambda_a, lambda_b, alpha, beta and 2*sigmoid - 1 normalisation as ``DyReLU``,

    a^k = alpha^k + lambda_a * (2 sigmoid(t_a^k) - 1),  b^k = beta^k + lambda_b * (2 sigmoid(t_b^k) - 1)

where the learned per-channel constants t (one per entry of FC2's output: (2|1) * m * width) take
the place of FC2(ReLU(FC1(GAP(x)))). They live in ``fc2.bias``: a DyReLU whose FC2 weight is zero
and frozen outputs exactly its FC2 bias, so the twin *is* that DyReLU, and every path that reads
``fc1`` / ``fc2`` (the fused ops, the fused BN site, ``prepare_for_inference``) computes it unchanged.
FC1 and FC2's weight are zero buffers (not parameters, not in the state_dict: nothing learns them);
FC1 is one unit wide, the narrowest the fused ops take.

Variant C's twin keeps its spatial attention branch whole: the 1x1 conv (a parameter), the logit
normalisation (``spatial_norm``), tau and Eq. 4's cutoff. So pi still depends on the input at each
position; only the per-channel piecewise function max_k(a^k x + b^k) is static. Its output is
pi(x)_hw * max_k(a_c^k x + b_c^k) with a, b the same for every image.

``hyper_init`` sets the constants' start: "zero" (and "small", whose zero FC2 bias is what it keeps
of the dynamic module's start) puts every channel at its initial function max_k(alpha^k x + beta^k);
"random" draws them as PyTorch draws FC2's bias, U(-1/sqrt(hidden), 1/sqrt(hidden)) with the dynamic
module's hidden width, so the twin starts at a random per-channel function of the same spread as the
dynamic module's bias term.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _hyper
from .core import DyReLU


class _FixedLinear(nn.Module):
    """A Linear layer whose weight is a zero buffer and whose bias is a buffer or a parameter."""

    def __init__(self, in_features: int, out_features: int, bias: nn.Parameter | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        # non-persistent: zero by construction, so checkpoints hold only what is learned
        self.register_buffer("weight", torch.zeros(out_features, in_features), persistent=False)
        if bias is None:
            self.register_buffer("bias", torch.zeros(out_features), persistent=False)
        else:
            self.bias = bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight=0 (fixed)"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class StaticDyReLU(DyReLU):
    """A ``DyReLU`` (same arguments, same coefficient math) whose coefficients do not depend on the input.

    Learned: ``fc2.bias`` (the constants, (2|1) * m * width of them) and, for variant C, the spatial
    branch. It is a DyReLU subclass, so ``set_tau``, ``convert``, the optimizer's hyper group (its
    constants are FC2's bias in the dynamic module and get the same lr and decay) and the analysis
    hooks treat it as one.
    """

    def __init__(self, channels: int, variant: str = "B", **kwargs):
        super().__init__(channels, variant=variant, **kwargs)
        out = self.fc2.out_features
        fan_in = self.fc1.out_features  # the dynamic module's hidden width
        logits = torch.zeros(out, dtype=self.fc2.bias.dtype)
        if self.hyper_init == "random":
            bound = 1.0 / math.sqrt(fan_in)
            logits.uniform_(-bound, bound)
        self.fc1 = _FixedLinear(self.channels, 1, None)
        self.fc2 = _FixedLinear(1, out, nn.Parameter(logits))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", static"

    def context_coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same a, b for every image of ``x`` (N, K, width): no pooling, no FCs."""
        logits = self.fc2.bias.unsqueeze(0).expand(x.shape[0], -1)
        _, a, b = _hyper.from_logits(logits, self.init_a, self.init_b, self.lambda_a, self.lambda_b,
                                     self.dynamic_segments, self.coef_width, self.use_bias, k=self.k)
        return a, b

    def hyper(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The constants' a, b for each of the N rows of ``pooled`` (its values are not used)."""
        return self.context_coefficients(pooled)

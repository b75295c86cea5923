"""DY-ReLU, the paper's math (Chen et al., ECCV 2020, Eq. 1-4), as readable PyTorch.

y_c = max_k { a_c^k(x) x_c + b_c^k(x) }                                   (Eq. 1)
theta(x) = FC2(ReLU(FC1(GAP(x)))), normalised by 2*sigmoid - 1             (Eq. 2)
a_c^k = alpha^k + lambda_a * da_c^k,  b_c^k = beta^k + lambda_b * db_c^k   (Eq. 3)
DY-ReLU-C: the coefficients are multiplied by pi_hw = min(gamma * softmax(z / tau)_hw, 1),
z = conv1x1(x) with one output channel, gamma = H*W/3                      (Eq. 4)

Because pi_hw >= 0, max_k(pi a_k x + pi b_k) = pi * max_k(a_k x + b_k): variant C is
variant B's output scaled per position. The fused paths rely on this identity.

Layout of FC2's output (Eq. 2): [da^1_1..da^1_W, ..., da^m_1..da^m_W, db^1_1.., ..., db^m_W] with
W = C (B, C) or 1 (A) and m = dynamic_segments (= K by default).

Robustness notes (REFERENCE.md section 2): every constant (alpha, beta, lambda_a, lambda_b, tau) is a
buffer, so it follows .to(device) / .half() and is saved in the state_dict; no tensor is created on a
fixed device; no reshape hard-codes the batch size (N = 1 and dynamic-batch ONNX work); the hyper
function's normalisation runs in at least float32 (bf16/fp16 autocast safe) and the output has the
input's dtype and memory format (channels_last in -> channels_last out).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from . import _hyper
from ._hyper import spatial_attention, standardise_logits  # noqa: F401 (Eq. 4 lives with the hyper function)
from . import fused
from .errors import BadValueError

VARIANTS = ("A", "B", "C")
IMPLS = ("auto", "reference", "fused")
HYPER_INITS = ("zero", "small", "random")
#: How variant C's spatial logits z are normalised before the softmax (see DyReLU.spatial_pi).
SPATIAL_NORMS = ("none", "bn", "std")


@dataclass
class Coefficients:
    """What the hyper function produced for one input.

    a, b: (N, K, C) for B and C, (N, K, 1) for A (b holds the static init_b when use_bias=False).
          dtype: float32 (float64 if the module is float64), whatever the input dtype.
    pi:   (N, 1, *spatial) spatial attention for C, None otherwise.
    Output of the module: y = max_k(a[:, k] * x + b[:, k]) (* pi for C), a and b broadcast over space.
    """

    a: torch.Tensor
    b: torch.Tensor
    pi: Optional[torch.Tensor] = None


def _pair_tuple(name: str, value: Union[float, Sequence[float]], k: int) -> tuple:
    if isinstance(value, (int, float)):
        value = (value,)
    value = tuple(float(v) for v in value)
    if not value:
        raise BadValueError(f"{name} is empty: give one value per segment, e.g. {name}=(1.0, 0.0)")
    # extra values are dropped (k=1 with the K=2 defaults), missing ones are 0 (the paper's
    # default: alpha^1 = 1, alpha^k = beta^k = 0 otherwise)
    return (value + (0.0,) * k)[:k]


#: True while tracing / scripting / exporting to ONNX (the reference path runs then); torch.export
#: and torch.compile capture the fused path's registered ops instead.
_in_export_context = _hyper.in_export_context


def _per_sample(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """(N, W) -> (N, W, 1, ..., 1) to broadcast against an ndim-dimensional (N, C, ...) input."""
    return t[(Ellipsis,) + (None,) * (ndim - 2)]


def piecewise_max(x: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor]) -> torch.Tensor:
    """max_k(a_k x + b_k) with a, b shaped (N, K, C|1); a running max keeps no K-sized temporary."""
    y = None
    for k in range(a.shape[1]):
        seg = x * _per_sample(a[:, k], x.dim())
        if b is not None:
            seg = seg + _per_sample(b[:, k], x.dim())
        y = seg if y is None else torch.maximum(y, seg)
    return y


class DyReLU(nn.Module):
    """Dynamic ReLU, variants A (shared), B (per channel) and C (per channel and position).

    Works on (N, C), (N, C, L), (N, C, H, W) (and (N, C, D, H, W)) inputs. ``impl`` picks the
    reference path (this file) or the fused path (``dyrelu.fused``); both compute the same function.
    ``impl="auto"`` uses the fused path where ``dyrelu.fused.supports`` says so (eager, torch.compile
    and torch.export, which all see its registered ops); while tracing, scripting or exporting to ONNX
    the reference path is always used, whatever ``impl``.
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
        hyper_init: str = "zero",
        spatial_norm: str = "none",
    ):
        super().__init__()
        variant = str(variant).upper()
        if variant not in VARIANTS:
            raise BadValueError(f"variant={variant!r} is not one of {VARIANTS}")
        if impl not in IMPLS:
            raise BadValueError(f"impl={impl!r} is not one of {IMPLS}")
        if hyper_init not in HYPER_INITS:
            raise BadValueError(f"hyper_init={hyper_init!r} is not one of {HYPER_INITS}")
        if spatial_norm not in SPATIAL_NORMS:
            raise BadValueError(f"spatial_norm={spatial_norm!r} is not one of {SPATIAL_NORMS}")
        k = int(k)
        if k < 1:
            raise BadValueError(f"k={k} must be >= 1")
        if channels < 1 or reduction < 1:
            raise BadValueError(f"channels={channels} and reduction={reduction} must be >= 1")
        if hidden is not None and int(hidden) < 1:
            raise BadValueError(f"hidden={hidden} must be >= 1")
        if float(tau) <= 0:
            raise BadValueError(f"tau={tau} must be > 0")
        m = k if dynamic_segments is None else int(dynamic_segments)
        if not 1 <= m <= k:
            raise BadValueError(f"dynamic_segments={dynamic_segments} must be between 1 and k={k}")
        self.channels, self.variant, self.k, self.reduction = int(channels), variant, k, int(reduction)
        self.use_bias, self.dynamic_segments, self.impl, self.hyper_init = bool(use_bias), m, impl, hyper_init
        self.hidden = int(hidden) if hidden is not None else max(1, self.channels // self.reduction)
        init_b = _pair_tuple("init_b", init_b, k)
        # Decided once here (not per call) so torch.compile sees no data-dependent branch;
        # refreshed after load_state_dict.
        self.has_intercept = bool(self.use_bias or any(v != 0.0 for v in init_b))

        # Constants are buffers so .to(device) / .half() / state_dict carry them.
        self.register_buffer("init_a", torch.tensor(_pair_tuple("init_a", init_a, k)))
        self.register_buffer("init_b", torch.tensor(init_b))
        self.register_buffer("lambda_a", torch.tensor(float(lambda_a)))
        self.register_buffer("lambda_b", torch.tensor(float(lambda_b)))
        self.register_buffer("tau", torch.tensor(float(tau)))

        width = 1 if variant == "A" else self.channels
        self.coef_width = width
        self.fc1 = nn.Linear(self.channels, self.hidden)
        self.fc2 = nn.Linear(self.hidden, (2 if self.use_bias else 1) * m * width)
        self.spatial = nn.Conv2d(self.channels, 1, kernel_size=1, bias=False) if variant == "C" else None
        self.spatial_norm = spatial_norm if variant == "C" else "none"
        # "bn": a BatchNorm over the one logit channel, as in the authors' later public code (DyHead's
        # DYReLU); it makes pi independent of the spatial conv's scale.
        self.spatial_bn = nn.BatchNorm2d(1) if self.spatial_norm == "bn" else None
        if hyper_init == "zero":
            # Ours, not the paper's: the paper names alpha^k, beta^k as the initial values of a^k, b^k
            # (Eq. 3) and says nothing of FC2's init; DyHead's public DYReLU and the unofficial
            # DynamicReLU (Islanna/DynamicReLU) build FC2 as a plain nn.Linear: PyTorch's default.
            # With FC2 = 0 the residuals are zero at step 0, so a fresh module is exactly
            # max_k(alpha^k x + beta^k) (times pi for C). PyTorch's default Linear init ("random")
            # starts every channel at a different random piecewise function, which on the demo left
            # DY-ReLU-B near chance with eval losses of 1e2-1e6 (docs/training-health.md).
            nn.init.zeros_(self.fc2.weight)
            nn.init.zeros_(self.fc2.bias)
        elif hyper_init == "small":
            # Between the two: the residuals start near zero (FC2 at a tenth of PyTorch's default
            # weights, zero bias), but FC1 gets a gradient from the first step (with FC2 = 0 it gets none
            # until FC2 has moved), so the hyper function can become input-dependent sooner.
            with torch.no_grad():
                self.fc2.weight.mul_(0.1)
            nn.init.zeros_(self.fc2.bias)
        self.register_load_state_dict_post_hook(DyReLU._after_load)

    @staticmethod
    def _after_load(module: "DyReLU", incompatible_keys) -> None:
        if not module.use_bias and not module.init_b.is_meta:
            module.has_intercept = bool((module.init_b != 0).any())

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, variant={self.variant}, k={self.k}, reduction={self.reduction}, "
            f"hidden={self.hidden}, use_bias={self.use_bias}, dynamic_segments={self.dynamic_segments}, impl={self.impl}, "
            f"hyper_init={self.hyper_init}" + (f", spatial_norm={self.spatial_norm}" if self.spatial is not None else "")
        )

    @torch.no_grad()
    def set_tau(self, tau: float) -> None:
        if float(tau) <= 0:
            raise BadValueError(f"tau={tau} must be > 0")
        self.tau.fill_(float(tau))

    # ---- hyper function -------------------------------------------------------------
    def _check(self, x: torch.Tensor) -> None:
        if torch.jit.is_tracing():  # shapes are fixed by the trace; a check would only warn (TracerWarning)
            return
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(f"DyReLU({self.channels}) expects (N, {self.channels}, ...) input, got {tuple(x.shape)}")

    #: bn_act fuses a preceding BatchNorm2d into modules that say so (fused/ must not import core)
    fusable_dyrelu = True

    @staticmethod
    def pool(x: torch.Tensor) -> torch.Tensor:
        """Global average pool over every dim after the channel dim: (N, C, ...) -> (N, C)."""
        return _hyper.pool(x)

    def hyper(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, C) pooled context -> a, b of shape (N, K, width), in float32 (float64 for float64 modules).

        Without intercepts (use_bias=False) b is init_b broadcast to (N, K, width).
        """
        return _hyper.hyper(pooled, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias, self.init_a,
                            self.init_b, self.lambda_a, self.lambda_b, self.dynamic_segments, self.coef_width,
                            self.use_bias, k=self.k)

    def context_coefficients(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """a, b (N, K, width) for input ``x``: the hyper function on its pooled context.

        The reference path and ``coefficients`` go through here, so a subclass that computes its
        coefficients another way (the static twin, static.py) overrides this one method."""
        return self.hyper(self.pool(x))

    def spatial_pi(self, z: torch.Tensor) -> torch.Tensor:
        """pi from the spatial conv's logits z (N, 1, H, W): the normalisation, then Eq. 4.

        Every path (reference, fused, prepared) computes z its own way and then calls this, so the
        normalisation is defined once.
        """
        if self.spatial_bn is not None:
            z = self.spatial_bn(z)
        return spatial_attention(z, self.tau, standardise=self.spatial_norm == "std")

    def attention(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Spatial attention pi (N, 1, *spatial) of variant C (Eq. 4); None for A and B."""
        if self.spatial is None:
            return None
        xs = x if x.dim() == 4 else x.reshape(x.shape[0], x.shape[1], -1, 1)
        z = self.spatial(xs)  # (N, 1, *, *)
        pi = self.spatial_pi(z)
        return pi if x.dim() == 4 else pi.reshape((x.shape[0], 1) + tuple(x.shape[2:]))

    @torch.no_grad()
    def coefficients(self, x: torch.Tensor) -> Coefficients:
        """a, b (and pi for C) that this module would use on ``x``, for analysis tools."""
        self._check(x)
        a, b = self.context_coefficients(x)
        return Coefficients(a=a, b=b, pi=self.attention(x))

    # ---- forward ----------------------------------------------------------------------
    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        a, b = self.context_coefficients(x)
        a, b = a.to(x.dtype), b.to(x.dtype)
        y = piecewise_max(x, a, b if self.has_intercept else None)
        pi = self.attention(x)
        return y if pi is None else y * pi.to(y.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl != "reference" and not _in_export_context():
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

"""Deployment preparation: ``prepare_for_inference(model)``.

Two rewrites, both exact up to float rounding for an eval-mode model:

1. **BatchNorm folding.** Every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` is folded
   into the conv's weight and bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``) and replaced by
   ``nn.Identity``. "Directly follows" is read from the module structure: adjacent children of an
   ``nn.Sequential`` (conv, bn), and sibling pairs named ``conv<s>`` / ``bn<s>`` (``conv1``/``bn1``,
   ``conv``/``bn``: the torchvision / timm convention, and this project's model zoo). A BN whose
   channels do not match its conv is left alone.

2. **One precomputed path per DY-ReLU.** Each ``DyReLU`` is replaced by :class:`InferenceDyReLU`,
   which holds the hyper function with its constants folded in: the paper's normalisation
   ``a = alpha + lambda_a (2 sigmoid(l) - 1)`` (Eq. 2-3) becomes ``a = c0 + c1 * sigmoid(l)`` with
   ``c0, c1`` precomputed per output, so one ``addcmul`` replaces five ops; the piecewise max is
   ``addcmul`` per segment and an in-place ``maximum``. No autograd Function, no backend dispatch,
   no shape checks: about 8 ATen calls per activation (K=2) instead of about 40, which is what
   dominates at batch 1.

The prepared module has plain torch ops only, so it traces, scripts, exports to ONNX and compiles.
``mode`` adds a compiler on top: "eager" (the default: the fastest measured at batch 1 on the
2-core CPU, see docs/performance.md), "jit" (``torch.jit.trace`` + ``torch.jit.freeze``) or
"compile" (``torch.compile``; needs a C++ compiler on the CPU and compiles on the first call).
"""
from __future__ import annotations

import copy
import re
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .core import DyReLU, spatial_attention
from .fused import backend
from .fused._tensors import as3d
from .fused._torch_kernels import _consts

__all__ = ["prepare_for_inference", "fold_batchnorm", "InferenceDyReLU", "MODES"]

MODES = ("eager", "jit", "compile")


def _fast_ok(x: torch.Tensor) -> bool:
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.onnx.is_in_onnx_export():
        return False
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():  # Inductor fuses the broadcast ops itself
        return False
    if torch.is_grad_enabled() and x.requires_grad:
        return False
    return x.device.type == "cpu" and x.dim() >= 3 and x.is_contiguous() and x.numel() > 0


class InferenceDyReLU(nn.Module):
    """Eval-only DY-ReLU with the hyper function's constants folded (built from a ``DyReLU``).

    Computes what ``DyReLU.forward_reference`` computes in eval mode; holds no autograd state
    beyond its parameters (no gradients are needed: the weights are detached copies).
    """

    def __init__(self, m: DyReLU, inplace: bool = False):
        super().__init__()
        # write the output over the input (CPU eager fast path): only where nothing else reads the
        # input, which prepare_for_inference decides from the module structure
        self.inplace = bool(inplace)
        k, seg, w = m.k, m.dynamic_segments, m.coef_width
        self.k, self.width, self.channels, self.variant = k, w, m.channels, m.variant
        self.use_bias, self.dynamic_segments = m.use_bias, seg
        self.has_intercept = bool(m.has_intercept)
        self.groups = (2 if m.use_bias else 1) * seg  # coefficient vectors the hyper function emits
        dt = m.fc1.weight.dtype
        self.register_buffer("w1", m.fc1.weight.detach().clone())
        self.register_buffer("b1", m.fc1.bias.detach().clone())
        self.register_buffer("w2", m.fc2.weight.detach().clone())
        self.register_buffer("b2", m.fc2.bias.detach().clone())
        # theta = 2 sigmoid(l) - 1;  a = init_a + lambda_a theta = (init_a - lambda_a) + 2 lambda_a sigmoid(l)
        lam_a, lam_b = float(m.lambda_a), float(m.lambda_b)
        init_a = m.init_a.detach().to(dt)
        init_b = m.init_b.detach().to(dt)
        groups = 2 if m.use_bias else 1
        offset = torch.empty(groups, seg, w, dtype=dt)
        scale = torch.empty(groups, seg, w, dtype=dt)
        offset[0] = (init_a[:seg] - lam_a).reshape(seg, 1)
        scale[0] = 2.0 * lam_a
        if m.use_bias:
            offset[1] = (init_b[:seg] - lam_b).reshape(seg, 1)
            scale[1] = 2.0 * lam_b
        self.register_buffer("offset", offset.flatten())
        self.register_buffer("scale", scale.flatten())
        # segments past dynamic_segments keep their init values (a constant per segment)
        self.register_buffer("static_a", init_a.clone())
        self.register_buffer("static_b", init_b.clone())
        self.spatial = copy.deepcopy(m.spatial) if m.spatial is not None else None
        self.standardise = m.spatial_norm == "std"
        if m.spatial_bn is not None:
            # the logit BN in eval mode is z * s + t; the softmax ignores t, so s folds into the conv
            bn = m.spatial_bn
            s = torch.rsqrt(bn.running_var.detach() + bn.eps)
            if bn.affine:
                s = s * bn.weight.detach()
            with torch.no_grad():
                self.spatial.weight.mul_(s.to(self.spatial.weight.dtype).reshape(1, 1, 1, 1))
        self.register_buffer("tau", m.tau.detach().clone())
        self.requires_grad_(False)

    def extra_repr(self) -> str:
        return f"{self.channels}, variant={self.variant}, k={self.k}, use_bias={self.use_bias}, inplace={self.inplace}"

    def _apply_broadcast(self, x: torch.Tensor, coef: tuple, seg: int) -> torch.Tensor:
        """max_k(a_k x + b_k) with broadcast ops: what traces and exports (ONNX: Mul, Add, Max)."""
        y = None
        for k in range(self.k):
            dynamic = k < seg
            u = x * (coef[k] if dynamic else self.static_a[k].to(x.dtype))
            if dynamic and self.use_bias:
                u = u + coef[seg + k]
            elif self.has_intercept:
                u = u + self.static_b[k].to(x.dtype)
            y = u if y is None else torch.maximum(y, u)
        return y

    def _apply_rows(self, x: torch.Tensor, coef: torch.Tensor, seg: int) -> torch.Tensor:
        """The same on the CPU in eager mode: each segment is one per-(n, c) affine pass of ATen's
        inference batch norm on the (1, N*C, L) view (mean 0, var 1, eps 0: exactly a x + b), about
        4x faster here than a broadcast ``addcmul``; the max runs in place into the first segment."""
        n, c = x.shape[0], x.shape[1]
        rows = n * c
        x1 = x.view(1, rows, -1)
        zeros, ones = _consts(rows, x.dtype)
        y = None
        for k in range(self.k):
            dynamic = k < seg
            a = coef[:, k] if dynamic else self.static_a[k].to(x.dtype).expand(n, self.width)
            if dynamic and self.use_bias:
                b = coef[:, seg + k]
            elif self.has_intercept:
                b = self.static_b[k].to(x.dtype).expand(n, self.width)
            else:
                b = None
            a = a.expand(n, c).reshape(rows)
            b = zeros if b is None else b.expand(n, c).reshape(rows)
            u = torch.batch_norm(x1, a, b, zeros, ones, False, 0.0, 0.0, False)
            y = u if y is None else torch.maximum(y, u, out=y)
        return y.view(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        fast = _fast_ok(x)
        if fast and self.spatial is None and self.use_bias and self.dynamic_segments == self.k:
            # A and B with intercepts and every segment dynamic: one call where a backend has the kernel
            y = backend.run("inference_site", x, as3d(x), self.w1, self.b1, self.w2, self.b2, self.offset,
                            self.scale, self.k, self.width, self.inplace)
            if y is not None:
                return y.view(x.shape)
        pi = None
        if self.spatial is not None:  # from x, before an in-place apply overwrites it
            xs = x if x.dim() == 4 else x.reshape(n, x.shape[1], -1, 1)
            z = self.spatial(xs)
            pi = spatial_attention(z, self.tau, standardise=self.standardise)
        pooled = x.mean(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x
        h = F.relu(F.linear(pooled, self.w1, self.b1))
        coef = torch.addcmul(self.offset, self.scale, torch.sigmoid(F.linear(h, self.w2, self.b2))).to(x.dtype)
        groups = self.groups
        y = None
        if fast and self.dynamic_segments == self.k:
            # one read of x, one write of y where a backend has the kernel (the C kernels of dyrelu.fused)
            ab = coef.reshape(n, -1, self.k, self.width)  # (n, a|b, k, width)
            b = ab[:, 1] if self.use_bias else None
            if b is None and self.has_intercept:
                b = self.static_b.to(x.dtype).reshape(1, self.k, 1).expand(n, self.k, self.width)
            y = backend.run("inference_apply", x, as3d(x), ab[:, 0], b, self.inplace)
        if y is not None:
            y = y.view(x.shape)
        elif fast:
            y = self._apply_rows(x, coef.reshape(n, groups, self.width), self.dynamic_segments)
        else:
            # -1 for the batch: a constant target shape, no shape arithmetic in an exported graph
            coef = coef.reshape((-1, groups, self.width) + (1,) * (x.dim() - 2))
            y = self._apply_broadcast(x, coef.unbind(1), self.dynamic_segments)
        if pi is not None:
            y = y * (pi if x.dim() == 4 else pi.reshape((n, 1) + tuple(x.shape[2:])))
        return y


def _fold_pair(parent: nn.Module, conv_name: str, bn_name: str) -> bool:
    conv, bn = getattr(parent, conv_name), getattr(parent, bn_name)
    if type(conv) is not nn.Conv2d or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return False
    if bn.num_features != conv.out_channels or bn.running_mean is None or bn.running_var is None:
        return False
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv.eval(), bn.eval())
    setattr(parent, conv_name, fused)
    setattr(parent, bn_name, nn.Identity())
    return True


_CONV_NAME = re.compile(r"^conv(.*)$")


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode BN that directly follows a conv into it (in place); returns how many."""
    count = 0
    for parent in list(model.modules()):
        names = list(parent._modules.keys())
        if isinstance(parent, nn.Sequential):
            for first, second in zip(names, names[1:]):
                if parent._modules[first] is not None and parent._modules[second] is not None:
                    count += _fold_pair(parent, first, second)
        for name in names:
            match = _CONV_NAME.match(name)
            bn_name = f"bn{match.group(1)}" if match else None
            if bn_name in parent._modules and parent._modules[name] is not None:
                count += _fold_pair(parent, name, bn_name)
    return count


def _fresh_input(parent: nn.Module, name: str) -> bool:
    """The child ``name`` of an ``nn.Sequential`` reads the output of a conv or BN (possibly folded
    into an Identity) that nothing else reads: a chain passes each output only to the next child."""
    if not isinstance(parent, nn.Sequential):
        return False
    names = list(parent._modules.keys())
    i = names.index(name)
    while i > 0:
        prev = parent._modules[names[i - 1]]
        if isinstance(prev, (nn.Conv2d, nn.modules.batchnorm._BatchNorm)):
            return True
        if not isinstance(prev, nn.Identity):
            return False
        i -= 1
    return False


def _replace_dyrelu(module: nn.Module) -> int:
    count = 0
    for name, child in list(module.named_children()):
        if isinstance(child, DyReLU):
            setattr(module, name, InferenceDyReLU(child, inplace=_fresh_input(module, name)))
            count += 1
        else:
            count += _replace_dyrelu(child)
    return count


def prepare_for_inference(model: nn.Module, mode: str = "eager", example_input: Optional[torch.Tensor] = None,
                          inplace: bool = False) -> nn.Module:
    """An eval-mode copy of ``model`` with BNs folded and every DyReLU on one precomputed path.

    mode: "eager" (default), "jit" (trace + freeze; needs ``example_input``) or "compile"
    (``torch.compile``, compiled on the first call). ``inplace=True`` rewrites ``model`` itself.
    Outputs match ``model.eval()`` up to float rounding. The result is for inference only
    (parameters have ``requires_grad=False``).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {MODES}")
    if mode == "jit" and example_input is None:
        raise ValueError("mode='jit' needs example_input (a batch of the shape the model will see)")
    prepared = model if inplace else copy.deepcopy(model)
    prepared.eval()
    with torch.no_grad():
        fold_batchnorm(prepared)
        _replace_dyrelu(prepared)
    prepared.requires_grad_(False)
    if mode == "jit":
        with torch.no_grad():
            traced = torch.jit.trace(prepared, (example_input,), check_trace=False)
            return torch.jit.freeze(traced)
    if mode == "compile":
        return torch.compile(prepared)
    return prepared

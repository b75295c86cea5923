"""Triton kernels of the fused BatchNorm + DY-ReLU statistics (CUDA; CPU via TRITON_INTERPRET=1).

The apply itself is ``_triton.apply_forward`` / ``apply_backward`` run on the conv output with
folded coefficients (see bn_act.py); these two kernels add what BN needs:

* ``row_moments``: per-(n, c) mean and biased variance over L of an (N, C, L) strided view, one
  read of x. Sums are shifted by the row's first element, (x - x0) and (x - x0)^2, accumulated
  in fp32 (fp64 for fp64): stable for rows whose mean is large against their spread.
* ``affine_rows``: out = alpha_c x + beta_nc (the backward of the statistics), one read, one write,
  output with x's strides.

Both handle NCHW (L stride 1) and channels_last (C stride 1) without a copy. Grid: one axis (N and
the channel blocks folded into axis 0, the L blocks too for ``affine_rows``), so no grid dimension
limit binds for any batch size.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ._triton import HAS_TRITON, available, interpreting

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _row_moments_kernel(x_ptr, mean_ptr, var_ptr, C, L, sxn, sxc, sxl, inv_l, C_BLOCKS,
                            BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr):
        pid = tl.program_id(0)
        pid_n = pid // C_BLOCKS
        pid_c = pid % C_BLOCKS
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        base = x_ptr + pid_n.to(tl.int64) * sxn + offs_c.to(tl.int64) * sxc
        shift = tl.load(base, mask=mask_c, other=0.0).to(ACC)
        acc = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
        acc2 = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
        for l0 in range(0, L, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            m = mask_c[:, None] & (offs_l[None, :] < L)
            v = tl.load(base[:, None] + offs_l[None, :].to(tl.int64) * sxl, mask=m, other=0.0).to(ACC)
            d = tl.where(m, v - shift[:, None], 0.0)
            acc += d
            acc2 += d * d
        s1 = tl.sum(acc, axis=1) * inv_l
        s2 = tl.sum(acc2, axis=1) * inv_l
        var = tl.maximum(s2 - s1 * s1, 0.0)
        out = pid_n * C + offs_c
        tl.store(mean_ptr + out, s1 + shift, mask=mask_c)
        tl.store(var_ptr + out, var, mask=mask_c)

    @triton.jit
    def _affine_rows_kernel(x_ptr, out_ptr, alpha_ptr, beta_ptr, C, L, sxn, sxc, sxl, son, soc, sol,
                            C_BLOCKS, L_BLOCKS,
                            BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr):
        pid = tl.program_id(0)
        pid_l = pid % L_BLOCKS
        rest = pid // L_BLOCKS
        pid_c = rest % C_BLOCKS
        pid_n = rest // C_BLOCKS
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_c = offs_c < C
        m = mask_c[:, None] & (offs_l[None, :] < L)
        n64 = pid_n.to(tl.int64)
        x = tl.load(x_ptr + n64 * sxn + offs_c[:, None] * sxc + offs_l[None, :] * sxl, mask=m, other=0.0).to(ACC)
        al = tl.load(alpha_ptr + offs_c, mask=mask_c, other=0.0)
        be = tl.load(beta_ptr + pid_n * C + offs_c, mask=mask_c, other=0.0)
        y = x * al[:, None] + be[:, None]
        tl.store(out_ptr + n64 * son + offs_c[:, None] * soc + offs_l[None, :] * sol,
                 y.to(out_ptr.dtype.element_ty), mask=m)


def _acc_torch(x3: torch.Tensor) -> torch.dtype:
    return torch.float64 if x3.dtype == torch.float64 else torch.float32


def _acc(x3: torch.Tensor):
    return tl.float64 if x3.dtype == torch.float64 else tl.float32


def tiles(c: int, l: int, unit_l: bool) -> Tuple[int, int, int]:
    """(BLOCK_C, BLOCK_L, num_warps): long tiles along the unit-stride dimension."""
    if unit_l or c == 1:
        bl = min(256, triton.next_power_of_2(max(l, 1)))
        bc = max(1, min(triton.next_power_of_2(c), 2048 // bl))
    else:
        bc = min(64, triton.next_power_of_2(c))
        bl = max(1, min(triton.next_power_of_2(max(l, 1)), 2048 // bc))
    if interpreting():
        bc = min(triton.next_power_of_2(c), 64)
        bl = min(triton.next_power_of_2(max(l, 1)), 64)
    return bc, bl, 4


def row_moments(x3: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) over L of an (N, C, L) view, each (N, C) in fp32 (fp64 for fp64)."""
    n, c, l = x3.shape
    mean = torch.empty(n, c, device=x3.device, dtype=_acc_torch(x3))
    var = torch.empty_like(mean)
    bc, bl, warps = tiles(c, l, x3.stride(2) == 1)
    bl = min(bl, 128) if x3.stride(2) == 1 else bl
    c_blocks = triton.cdiv(c, bc)
    _row_moments_kernel[(n * c_blocks,)](x3, mean, var, c, l, *x3.stride(), 1.0 / l, c_blocks,
                                         BLOCK_C=bc, BLOCK_L=bl, ACC=_acc(x3), num_warps=warps)
    return mean, var


def affine_rows(x3: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """alpha (C,) * x + beta (N, C) per row of an (N, C, L) view; output with x's strides."""
    n, c, l = x3.shape
    out = torch.empty_strided(x3.shape, x3.stride(), dtype=x3.dtype, device=x3.device)
    bc, bl, warps = tiles(c, l, x3.stride(2) == 1)
    c_blocks, l_blocks = triton.cdiv(c, bc), triton.cdiv(l, bl)
    _affine_rows_kernel[(n * c_blocks * l_blocks,)](
        x3, out, alpha, beta, c, l, *x3.stride(), *out.stride(), c_blocks, l_blocks,
        BLOCK_C=bc, BLOCK_L=bl, ACC=_acc(x3), num_warps=warps)
    return out


__all__ = ["available", "row_moments", "affine_rows", "tiles", "HAS_TRITON"]

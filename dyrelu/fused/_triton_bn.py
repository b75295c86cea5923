"""Triton kernels of the fused BatchNorm + DY-ReLU statistics (CUDA; CPU via TRITON_INTERPRET=1).

The apply itself is ``_triton.apply_forward`` / ``apply_backward`` run on the conv output with
folded coefficients (see bn_act.py); these two kernels add what BN needs:

* ``row_moments``: per-(n, c) mean and biased variance over L of an (N, C, L) strided view, one
  read of x. Sums are shifted by the row's first element, (x - x0) and (x - x0)^2, accumulated
  in fp32 (fp64 for fp64): stable for rows whose mean is large against their spread. Long rows
  are split along L across programs (``moments_split``) that write partial sums, added with
  ``torch.sum`` (no atomics: deterministic), so a small batch of 112x112 maps still fills the GPU.
* ``affine_rows``: out = alpha_c x + beta_nc (the backward of the statistics), one read, one write,
  output with x's strides.

Launches go through ``_triton._launch``: the device guard, the guarded first launch and the one
failure latch of every Triton kernel here. Both handle NCHW (L stride 1) and channels_last (C stride 1) without a copy. Grid: one axis (N and
the channel blocks folded into axis 0, the L blocks too for ``affine_rows``), so no grid dimension
limit binds for any batch size.
"""
from __future__ import annotations

from typing import Tuple

import torch

from . import _triton
from ._triton import HAS_TRITON, Plan, available, interpreting
from ._tensors import acc_dtype

if HAS_TRITON:
    import triton
    import triton.language as tl

    # every integer argument unspecialised (no recompile per shape or stride, Triton's default
    # specialises on ==1 and %16): a configuration is the dtype and the constexprs only
    @triton.jit(do_not_specialize=["N", "C", "L", "sxn", "sxc", "sxl", "C_BLOCKS", "L_PER"])
    def _row_moments_kernel(x_ptr, s1_ptr, s2_ptr, N, C, L, sxn, sxc, sxl, C_BLOCKS, L_PER,
                            BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr):
        # program = (L split, sample, channel block); it writes the shifted sums of its L range,
        # sum (x - x0) and sum (x - x0)^2 with x0 the row's first element (the same for every split,
        # so the partial sums add exactly)
        pid = tl.program_id(0)
        pid_c = pid % C_BLOCKS
        rest = pid // C_BLOCKS
        pid_n = rest % N
        split = rest // N
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        base = x_ptr + pid_n.to(tl.int64) * sxn + offs_c.to(tl.int64) * sxc
        shift = tl.load(base, mask=mask_c, other=0.0).to(ACC)
        acc = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
        acc2 = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
        l_start = split * L_PER
        l_end = tl.minimum(l_start + L_PER, L)
        for l0 in range(l_start, l_end, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            m = mask_c[:, None] & (offs_l[None, :] < l_end)
            v = tl.load(base[:, None] + offs_l[None, :].to(tl.int64) * sxl, mask=m, other=0.0).to(ACC)
            d = tl.where(m, v - shift[:, None], 0.0)
            acc += d
            acc2 += d * d
        out = (split * N + pid_n).to(tl.int64) * C + offs_c
        tl.store(s1_ptr + out, tl.sum(acc, axis=1), mask=mask_c)
        tl.store(s2_ptr + out, tl.sum(acc2, axis=1), mask=mask_c)

    @triton.jit(do_not_specialize=["C", "L", "sxn", "sxc", "sxl", "son", "soc", "sol", "C_BLOCKS", "L_BLOCKS"])
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


    _triton.KERNELS.update(_row_moments_kernel=_row_moments_kernel, _affine_rows_kernel=_affine_rows_kernel)


def _acc(x3: torch.Tensor) -> str:
    return "float64" if x3.dtype == torch.float64 else "float32"


def tiles(c: int, l: int, unit_l: bool) -> Tuple[int, int, int]:
    """(BLOCK_C, BLOCK_L, num_warps): one tile class per layout, long along the unit-stride dimension.

    One class, not one per shape: each class is one compiled kernel (the integers are unspecialised),
    and a compiled MobileNetV2 step then builds one statistics kernel and one gradient pass per layout
    (scripts/count_ops.py counts them); masked lanes on small maps cost less than more compiles."""
    if interpreting():  # small tiles: the interpreter runs every lane in numpy
        return min(triton.next_power_of_2(c), 64), min(triton.next_power_of_2(max(l, 1)), 64), 4
    if unit_l or c == 1:
        return 16, 128, 4
    return 64, 32, 4


TARGET_PROGRAMS = 512  # enough programs to fill a GPU: rows are split along L until N x C-blocks reaches it


def moments_split(n: int, c_blocks: int, l: int, bl: int) -> Tuple[int, int]:
    """(split, L_PER): L ranges per row (multiples of BLOCK_L) so that few, long rows (the 112x112
    maps of a small batch) still give TARGET_PROGRAMS programs; depends on the shape only."""
    split = max(1, min(triton.cdiv(l, bl), triton.cdiv(TARGET_PROGRAMS, n * c_blocks)))
    l_per = triton.cdiv(triton.cdiv(l, split), bl) * bl
    return triton.cdiv(l, l_per), l_per


def row_partials(x3: torch.Tensor):
    """(s1, s2, split) of the statistics kernel, or None (this configuration failed: the caller
    falls back). s1, s2 (split, N, C): per L range, sum (x - x0) and sum (x - x0)^2 with x0 = x[:, :, 0]."""
    n, c, l = x3.shape
    acc = acc_dtype(x3.dtype)
    bc, bl, warps = tiles(c, l, x3.stride(2) == 1)
    c_blocks = triton.cdiv(c, bc)
    split, l_per = moments_split(n, c_blocks, l, bl)
    s1 = torch.empty(split, n, c, device=x3.device, dtype=acc)
    s2 = torch.empty_like(s1)
    sxn, sxc, sxl = x3.stride()
    plan = Plan("_row_moments_kernel", (split * n * c_blocks,),
                dict(N=n, C=c, L=l, sxn=sxn, sxc=sxc, sxl=sxl, C_BLOCKS=c_blocks, L_PER=l_per),
                dict(BLOCK_C=bc, BLOCK_L=bl, ACC=_acc(x3)), warps, split)
    if not _triton._launch(plan, x3.device, (x3, s1, s2)):
        return None
    return s1, s2, split


def row_moments(x3: torch.Tensor):
    """(mean, biased var) over L of an (N, C, L) view, each (N, C) in fp32 (fp64 for fp64), or None
    (the kernel failed on this configuration: one warning, the caller uses torch ops)."""
    got = row_partials(x3)
    if got is None:
        return None
    s1, s2, split = got
    l = x3.shape[2]
    acc = s1.dtype
    if split > 1:
        s1, s2 = s1.sum(0), s2.sum(0)
    else:
        s1, s2 = s1[0], s2[0]
    s1, s2 = s1 / l, s2 / l
    mean = s1 + x3[:, :, 0].to(acc)
    var = (s2 - s1 * s1).clamp_min_(0.0)
    return mean, var


def affine_rows(x3: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor):
    """alpha (C,) * x + beta (N, C) per row of an (N, C, L) view; output with x's strides; or None."""
    n, c, l = x3.shape
    out = torch.empty_strided(x3.shape, x3.stride(), dtype=x3.dtype, device=x3.device)
    bc, bl, warps = tiles(c, l, x3.stride(2) == 1)
    c_blocks, l_blocks = triton.cdiv(c, bc), triton.cdiv(l, bl)
    sxn, sxc, sxl = x3.stride()
    son, soc, sol = out.stride()
    plan = Plan("_affine_rows_kernel", (n * c_blocks * l_blocks,),
                dict(C=c, L=l, sxn=sxn, sxc=sxc, sxl=sxl, son=son, soc=soc, sol=sol, C_BLOCKS=c_blocks,
                     L_BLOCKS=l_blocks), dict(BLOCK_C=bc, BLOCK_L=bl, ACC=_acc(x3)), warps, 1)
    if not _triton._launch(plan, x3.device, (x3, out, alpha, beta)):
        return None
    return out


__all__ = ["available", "row_moments", "row_partials", "affine_rows", "tiles", "HAS_TRITON"]

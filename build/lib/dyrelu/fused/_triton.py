"""Triton kernels of the fused DY-ReLU (CUDA; on the CPU through TRITON_INTERPRET=1 for tests).

All kernels see the input as an (N, C, L) strided view: NCHW-contiguous (L stride 1) and
channels_last (C stride 1) are both handled without a copy, with tile shapes chosen per layout.

* ``pool``: per-(n, c) mean over L, fp32 accumulation (fp64 for fp64 inputs, as everywhere here).
* ``apply_forward``: y = max_k(a_k x + b_k) [* pi], one read of x, one write of y.
* ``apply_backward``: one read of (g, x) [and pi], one write of grad_x; recomputes the
  winning segment, and accumulates per-(n, c, k) sums of g*x and g (fp32; atomics across
  L-splits) and, for variant C, per-(n, l) sums over c of g * max_k(...) (grad of pi).

Coefficients a, b are (N, K, W) fp32 contiguous; W = C (per channel) or 1 (variant A,
channel stride 0). Ties pick the lowest k, like the torch kernels.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

try:  # triton is optional: without it the CUDA path uses the torch kernels
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``."""
    if not HAS_TRITON:
        return False
    if interpreting():
        return device.type == "cpu"
    return device.type == "cuda"


if HAS_TRITON:

    @triton.jit
    def _pool_kernel(x_ptr, out_ptr, C, L, sxn, sxc, sxl, inv_l,
                     BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr):
        pid_c = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        base = x_ptr + pid_n.to(tl.int64) * sxn + offs_c[:, None] * sxc
        acc = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
        for l0 in range(0, L, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            m = mask_c[:, None] & (offs_l[None, :] < L)
            v = tl.load(base + offs_l[None, :] * sxl, mask=m, other=0.0)
            acc += v.to(ACC)
        s = tl.sum(acc, axis=1) * inv_l
        tl.store(out_ptr + pid_n * C + offs_c, s, mask=mask_c)

    @triton.jit
    def _apply_fwd_kernel(x_ptr, y_ptr, a_ptr, b_ptr, pi_ptr, C, L,
                          sxn, sxc, sxl, syn, syc, syl, sak, sac,
                          K: tl.constexpr, HAS_B: tl.constexpr, HAS_PI: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr):
        pid_l = tl.program_id(0)
        pid_c = tl.program_id(1)
        pid_n = tl.program_id(2)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_c = offs_c < C
        mask_l = offs_l < L
        m = mask_c[:, None] & mask_l[None, :]
        n64 = pid_n.to(tl.int64)
        x = tl.load(x_ptr + n64 * sxn + offs_c[:, None] * sxc + offs_l[None, :] * sxl, mask=m, other=0.0)
        x = x.to(ACC)
        coef = pid_n * K * sak + offs_c * sac
        a0 = tl.load(a_ptr + coef, mask=mask_c, other=0.0)
        best = x * a0[:, None]
        if HAS_B:
            b0 = tl.load(b_ptr + coef, mask=mask_c, other=0.0)
            best = best + b0[:, None]
        for k in tl.static_range(1, K):
            ak = tl.load(a_ptr + coef + k * sak, mask=mask_c, other=0.0)
            u = x * ak[:, None]
            if HAS_B:
                bk = tl.load(b_ptr + coef + k * sak, mask=mask_c, other=0.0)
                u = u + bk[:, None]
            best = tl.maximum(best, u)
        if HAS_PI:
            p = tl.load(pi_ptr + pid_n * L + offs_l, mask=mask_l, other=0.0).to(ACC)
            best = best * p[None, :]
        tl.store(y_ptr + n64 * syn + offs_c[:, None] * syc + offs_l[None, :] * syl,
                 best.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _apply_bwd_kernel(g_ptr, x_ptr, gx_ptr, a_ptr, b_ptr, pi_ptr, sgx_ptr, sg_ptr, gpi_ptr,
                          C, L, L_PER_PROG,
                          sgn, sgc, sgl, sxn, sxc, sxl, son, soc, sol, sak, sac,
                          K: tl.constexpr, KP: tl.constexpr, HAS_B: tl.constexpr,
                          HAS_PI: tl.constexpr, NEED_PI: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr):
        pid_s = tl.program_id(0)
        pid_c = tl.program_id(1)
        pid_n = tl.program_id(2)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        n64 = pid_n.to(tl.int64)
        coef = pid_n * K * sak + offs_c * sac
        kidx = tl.arange(0, KP)
        acc_sx = tl.zeros([BLOCK_C, KP], dtype=ACC)
        acc_s = tl.zeros([BLOCK_C, KP], dtype=ACC)
        l_start = pid_s * L_PER_PROG
        l_end = tl.minimum(l_start + L_PER_PROG, L)
        for l0 in range(l_start, l_end, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            mask_l = offs_l < l_end
            m = mask_c[:, None] & mask_l[None, :]
            x = tl.load(x_ptr + n64 * sxn + offs_c[:, None] * sxc + offs_l[None, :] * sxl, mask=m, other=0.0)
            g = tl.load(g_ptr + n64 * sgn + offs_c[:, None] * sgc + offs_l[None, :] * sgl, mask=m, other=0.0)
            x = x.to(ACC)
            g = g.to(ACC)
            a0 = tl.load(a_ptr + coef, mask=mask_c, other=0.0)
            best = x * a0[:, None]
            if HAS_B:
                b0 = tl.load(b_ptr + coef, mask=mask_c, other=0.0)
                best = best + b0[:, None]
            a_sel = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC) + a0[:, None]
            sel = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.int32)
            for k in tl.static_range(1, K):
                ak = tl.load(a_ptr + coef + k * sak, mask=mask_c, other=0.0)
                u = x * ak[:, None]
                if HAS_B:
                    bk = tl.load(b_ptr + coef + k * sak, mask=mask_c, other=0.0)
                    u = u + bk[:, None]
                better = u > best
                best = tl.where(better, u, best)
                sel = tl.where(better, k, sel)
                a_sel = tl.where(better, ak[:, None], a_sel)
            if HAS_PI:
                p = tl.load(pi_ptr + pid_n * L + offs_l, mask=mask_l, other=0.0).to(ACC)
                if NEED_PI:
                    tl.atomic_add(gpi_ptr + pid_n * L + offs_l, tl.sum(g * best, axis=0), mask=mask_l)
                g = g * p[None, :]
            tl.store(gx_ptr + n64 * son + offs_c[:, None] * soc + offs_l[None, :] * sol,
                     (g * a_sel).to(gx_ptr.dtype.element_ty), mask=m)
            gxx = g * x
            for k in tl.static_range(K):
                is_k = sel == k
                part_sx = tl.sum(tl.where(is_k, gxx, 0.0), axis=1)
                part_s = tl.sum(tl.where(is_k, g, 0.0), axis=1)
                acc_sx += tl.where(kidx[None, :] == k, part_sx[:, None], 0.0)
                acc_s += tl.where(kidx[None, :] == k, part_s[:, None], 0.0)
        out = pid_n * K * C + kidx[None, :] * C + offs_c[:, None]
        mk = mask_c[:, None] & (kidx[None, :] < K)
        tl.atomic_add(sgx_ptr + out, acc_sx, mask=mk)
        tl.atomic_add(sg_ptr + out, acc_s, mask=mk)


def _tiles(x3: torch.Tensor):
    """(BLOCK_C, BLOCK_L, num_warps): long tiles along the unit-stride dimension."""
    c, l = x3.shape[1], x3.shape[2]
    if x3.stride(2) == 1 or c == 1:
        bl = min(256, triton.next_power_of_2(max(l, 1)))
        bc = max(1, min(triton.next_power_of_2(c), 2048 // bl))
    else:  # channels_last: C is the unit-stride dimension
        bc = min(64, triton.next_power_of_2(c))
        bl = max(1, min(triton.next_power_of_2(max(l, 1)), 2048 // bc))
    if interpreting():  # the interpreter runs one program at a time: fewer, bigger tiles
        bc = min(triton.next_power_of_2(c), 64)
        bl = min(triton.next_power_of_2(max(l, 1)), 64)
    return bc, bl, 4


def _acc_torch(x3: torch.Tensor) -> torch.dtype:
    return torch.float64 if x3.dtype == torch.float64 else torch.float32


def _acc(x3: torch.Tensor):
    return tl.float64 if x3.dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=None)
def _num_sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _num_sms_of(device.index if device.index is not None else torch.cuda.current_device())
    return 1


def pool(x3: torch.Tensor) -> torch.Tensor:
    """Mean over L of an (N, C, L) view, as fp32 (N, C)."""
    n, c, l = x3.shape
    out = torch.empty(n, c, device=x3.device, dtype=_acc_torch(x3))
    bc, bl, warps = _tiles(x3)
    bl = min(bl, 128) if x3.stride(2) == 1 else bl
    grid = (triton.cdiv(c, bc), n)
    _pool_kernel[grid](x3, out, c, l, *x3.stride(), 1.0 / l, BLOCK_C=bc, BLOCK_L=bl, ACC=_acc(x3), num_warps=warps)
    return out


def apply_forward(x3: torch.Tensor, a: torch.Tensor, b: Optional[torch.Tensor], pi: Optional[torch.Tensor]) -> torch.Tensor:
    n, c, l = x3.shape
    k = a.shape[1]
    y3 = torch.empty_strided(x3.shape, x3.stride(), dtype=x3.dtype, device=x3.device)
    bc, bl, warps = _tiles(x3)
    sak, sac = a.shape[2], (1 if a.shape[2] == c else 0)
    grid = (triton.cdiv(l, bl), triton.cdiv(c, bc), n)
    _apply_fwd_kernel[grid](
        x3, y3, a, a if b is None else b, x3 if pi is None else pi, c, l,
        *x3.stride(), *y3.stride(), sak, sac,
        K=k, HAS_B=b is not None, HAS_PI=pi is not None, BLOCK_C=bc, BLOCK_L=bl, ACC=_acc(x3), num_warps=warps,
    )
    return y3


def apply_backward(g3, x3, a, b, pi, need_pi: bool):
    """grad_x (like x3), sum_gx and sum_g (N, K, C) fp32, grad_pi (N, 1, L) fp32 or None."""
    n, c, l = x3.shape
    k = a.shape[1]
    gx3 = torch.empty_strided(x3.shape, x3.stride(), dtype=x3.dtype, device=x3.device)
    sum_gx = torch.zeros(n, k, c, device=x3.device, dtype=_acc_torch(x3))
    sum_g = torch.zeros(n, k, c, device=x3.device, dtype=_acc_torch(x3))
    gpi = torch.zeros(n, 1, l, device=x3.device, dtype=_acc_torch(x3)) if (pi is not None and need_pi) else None
    bc, bl, warps = _tiles(x3)
    c_blocks = triton.cdiv(c, bc)
    # enough programs to fill the GPU: split L when N * C-blocks is small
    want = 4 * _num_sms(x3.device)
    split = max(1, min(triton.cdiv(l, bl), triton.cdiv(want, n * c_blocks)))
    l_per = triton.cdiv(triton.cdiv(l, split), bl) * bl
    split = triton.cdiv(l, l_per)
    sak, sac = a.shape[2], (1 if a.shape[2] == c else 0)
    grid = (split, c_blocks, n)
    _apply_bwd_kernel[grid](
        g3, x3, gx3, a, a if b is None else b, x3 if pi is None else pi,
        sum_gx, sum_g, sum_gx if gpi is None else gpi,
        c, l, l_per, *g3.stride(), *x3.stride(), *gx3.stride(), sak, sac,
        K=k, KP=triton.next_power_of_2(k), HAS_B=b is not None, HAS_PI=pi is not None,
        NEED_PI=gpi is not None, BLOCK_C=bc, BLOCK_L=bl, ACC=_acc(x3), num_warps=warps,
    )
    return gx3, sum_gx, sum_g, gpi

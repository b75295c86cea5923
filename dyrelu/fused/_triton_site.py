"""A BN + DY-ReLU site's (N, C)-sized math on CUDA in four Triton kernels, two per direction.

On the GPU a site's cost is its number of launches, not its arithmetic: the composition of small
torch ops that ``ops._bn_coefs_math`` / ``_bn_coefs_backward`` write took about 95 launches per
site and step (forward + backward, bf16 autocast). Here the statistics' finish, the BN fold, the
hyper function (pool, FC1, ReLU, FC2, 2 sigmoid - 1, Eq. 3) and the folding into the apply's
coefficients are two kernels per direction, all in fp32 with autocast off (the reference path's
math, not its autocast dtypes):

  forward   ``_fwd1``: per block of rows n, the channel statistics from the statistics pass's partial
            sums (mean over the batch, law of total variance; every program recomputes them for all
            channels, so no launch is needed to finish them), r = 1 / sqrt(var + eps), s = r gamma,
            t = beta - mu s, the context m s + t and FC1 + ReLU (tl.dot, IEEE fp32);
            ``_fwd2``: per (rows, channel block), FC2, the sigmoid, Eq. 3 and A = a s, B = b + a t.
  backward  ``_bwd1``: per block of rows, the apply's per-split partial sums added as they are read,
            grad of a and b through the fold, of the logits, dh = dlogits W2 (masked by ReLU), and
            gp = dh W1, with the per-channel partial sums of grad s and grad t;
            ``_bwd2``: one launch of three tile sets: grad W2 / b2, grad W1 / b1 (sums over the batch)
            and the per-channel finish (grad gamma, beta, var and the statistics' gradient's
            coefficients); then ``_dx`` adds the statistics' gradient into the apply's grad x in place
            (the one pass after the coefficient backward).

So a training site is: statistics pass, _fwd1, _fwd2, apply, running update; apply backward,
_bwd1, _bwd2, _dx -- nine launches (scripts/count_ops.py counts them). The state kept for backward
has the reference's layout ([r, t, ph, h_pre, h, sig, a], ops._bn_state), in fp32.

Determinism: no atomics; every sum over the batch runs in one program in a fixed order.
Every integer argument is ``do_not_specialize``: a configuration is the constexprs and num_warps.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _triton, _triton_bn
from ._triton import HAS_TRITON, Plan, _cdiv

# tiles: rows of the batch, channels, hidden units (FC1's outputs), logits columns. tl.dot needs
# every side >= 16. Small enough to hold in registers at 4 warps (tests/test_triton_site_aot.py).
BLOCK_N, BLOCK_C, BLOCK_R, BLOCK_J = 16, 64, 32, 32
WARPS = 4
# the hyper-function kernels hold several (16, 64) fp32 tiles and a dot's operands at once: at 4 warps
# ptxas spilled _fwd2 (sm_80 and sm_90) and _bwd1 (sm_80); 8 warps halve each thread's share
WARPS_HYPER = 8

if HAS_TRITON:
    import triton
    import triton.language as tl

    _INTS1 = ["N", "C", "L", "R", "SPLIT", "sxn", "sxc"]

    @triton.jit(do_not_specialize=_INTS1)
    def _site_fwd1_kernel(x_ptr, s1_ptr, s2_ptr, mean_ptr, var_ptr, w_ptr, bias_ptr, w1_ptr, b1_ptr,
                          m_ptr, r_ptr, t_ptr, mub_ptr, varb_ptr, ph_ptr, hpre_ptr, h_ptr,
                          N, C, L, R, SPLIT, sxn, sxc, eps,
                          BATCH: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rows < N
        lf = L * 1.0
        # phase A, per channel block: the statistics, the fold, this program's context rows
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            if BATCH:
                # mean over the batch of the row means m_nc = x0 + S1 / L
                tot = tl.zeros([BLOCK_C], dtype=tl.float32)
                for n0 in range(0, N, BLOCK_N):
                    nn = n0 + tl.arange(0, BLOCK_N)
                    mk = (nn < N)[:, None] & mask_c[None, :]
                    a1 = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
                    for sp in range(0, SPLIT):
                        a1 += tl.load(s1_ptr + (sp * N + nn)[:, None] * C + offs_c[None, :], mask=mk, other=0.0)
                    x0 = tl.load(x_ptr + nn[:, None].to(tl.int64) * sxn + offs_c[None, :] * sxc, mask=mk,
                                 other=0.0).to(tl.float32)
                    tot += tl.sum(tl.where(mk, x0 + a1 / lf, 0.0), axis=0)
                mu = tot / N
                # law of total variance: mean within-row variance + variance of the row means
                tv = tl.zeros([BLOCK_C], dtype=tl.float32)
                for n0 in range(0, N, BLOCK_N):
                    nn = n0 + tl.arange(0, BLOCK_N)
                    mk = (nn < N)[:, None] & mask_c[None, :]
                    a1 = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
                    a2 = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
                    for sp in range(0, SPLIT):
                        off = (sp * N + nn)[:, None] * C + offs_c[None, :]
                        a1 += tl.load(s1_ptr + off, mask=mk, other=0.0)
                        a2 += tl.load(s2_ptr + off, mask=mk, other=0.0)
                    x0 = tl.load(x_ptr + nn[:, None].to(tl.int64) * sxn + offs_c[None, :] * sxc, mask=mk,
                                 other=0.0).to(tl.float32)
                    d1 = a1 / lf
                    v = tl.maximum(a2 / lf - d1 * d1, 0.0)
                    dm = x0 + d1 - mu[None, :]
                    tv += tl.sum(tl.where(mk, v + dm * dm, 0.0), axis=0)
                var = tv / N
            else:
                mu = tl.load(mean_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
                var = tl.load(var_ptr + offs_c, mask=mask_c, other=1.0).to(tl.float32)
            r = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
            s = r
            if HAS_W:
                s = r * tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            t = -mu * s
            if HAS_B:
                t += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            if pid == 0:
                tl.store(r_ptr + offs_c, r, mask=mask_c)
                tl.store(t_ptr + offs_c, t, mask=mask_c)
                if BATCH:
                    tl.store(mub_ptr + offs_c, mu, mask=mask_c)
                    tl.store(varb_ptr + offs_c, var, mask=mask_c)
            mk = mask_n[:, None] & mask_c[None, :]
            a1 = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
            for sp in range(0, SPLIT):
                a1 += tl.load(s1_ptr + (sp * N + rows)[:, None] * C + offs_c[None, :], mask=mk, other=0.0)
            x0 = tl.load(x_ptr + rows[:, None].to(tl.int64) * sxn + offs_c[None, :] * sxc, mask=mk,
                         other=0.0).to(tl.float32)
            m = x0 + a1 / lf
            tl.store(m_ptr + rows[:, None] * C + offs_c[None, :], m, mask=mk)
            tl.store(ph_ptr + rows[:, None] * C + offs_c[None, :], m * s[None, :] + t[None, :], mask=mk)
        # the context rows were written by this program's threads: make them visible to all of them
        tl.debug_barrier()
        # phase B: h_pre = ph W1^T + b1, h = ReLU(h_pre)
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            acc = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mask_c = offs_c < C
                p = tl.load(ph_ptr + rows[:, None] * C + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :],
                            other=0.0)
                wt = tl.load(w1_ptr + offs_r[None, :] * C + offs_c[:, None], mask=mask_r[None, :] & mask_c[:, None],
                             other=0.0).to(tl.float32)
                acc += tl.dot(p, wt, input_precision="ieee")
            acc += tl.load(b1_ptr + offs_r, mask=mask_r, other=0.0).to(tl.float32)[None, :]
            mk = mask_n[:, None] & mask_r[None, :]
            tl.store(hpre_ptr + rows[:, None] * R + offs_r[None, :], acc, mask=mk)
            tl.store(h_ptr + rows[:, None] * R + offs_r[None, :], tl.maximum(acc, 0.0), mask=mk)

    _INTS2 = ["N", "C", "R", "K", "M", "W", "C_BLOCKS"]

    @triton.jit(do_not_specialize=_INTS2)
    def _site_fwd2_kernel(h_ptr, w2_ptr, b2_ptr, r_ptr, t_ptr, w_ptr, inita_ptr, initb_ptr, la_ptr, lb_ptr,
                          bA_ptr, bB_ptr, sig_ptr, a_ptr,
                          N, C, R, K, M, W, C_BLOCKS,
                          HAS_W: tl.constexpr, USE_BIAS: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
        pid = tl.program_id(0)
        cb = pid % C_BLOCKS
        nb = pid // C_BLOCKS
        rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_n = rows < N
        mask_c = offs_c < C
        mk = mask_n[:, None] & mask_c[None, :]
        # the coefficient column of channel c: c itself (B, C: width C) or 0 (A: one shared column)
        wcol = tl.where(W == 1, 0, offs_c)
        # A's shared column is written once (by channel 0), B's per channel
        mk_w = mk & ((W > 1) | (offs_c == 0))[None, :]
        r = tl.load(r_ptr + offs_c, mask=mask_c, other=0.0)
        s = r
        if HAS_W:
            s = r * tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + offs_c, mask=mask_c, other=0.0)
        la = tl.load(la_ptr).to(tl.float32)
        lb = tl.load(lb_ptr).to(tl.float32)
        cols = M * W * (2 if USE_BIAS else 1)
        for k in tl.static_range(3):
            if k < K:
                av = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32) + tl.load(inita_ptr + k).to(tl.float32)
                bv = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32) + tl.load(initb_ptr + k).to(tl.float32)
                if k < M:  # segments beyond the dynamic ones stay at their init values (Table 6)
                    for half in tl.static_range(2 if USE_BIAS else 1):
                        col = (half * M + k) * W + wcol
                        acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
                        for r0 in range(0, R, BLOCK_R):
                            offs_r = r0 + tl.arange(0, BLOCK_R)
                            mask_r = offs_r < R
                            hh = tl.load(h_ptr + rows[:, None] * R + offs_r[None, :],
                                         mask=mask_n[:, None] & mask_r[None, :], other=0.0)
                            wt = tl.load(w2_ptr + col[None, :] * R + offs_r[:, None],
                                         mask=mask_r[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
                            acc += tl.dot(hh, wt, input_precision="ieee")
                        acc += tl.load(b2_ptr + col, mask=mask_c, other=0.0).to(tl.float32)[None, :]
                        sg = tl.sigmoid(acc)
                        tl.store(sig_ptr + rows[:, None] * cols + col[None, :], sg, mask=mk_w)
                        if half == 0:
                            av = av + la * (2.0 * sg - 1.0)
                        else:
                            bv = bv + lb * (2.0 * sg - 1.0)
                tl.store(a_ptr + (rows[:, None] * K + k) * W + wcol[None, :], av, mask=mk_w)
                out = (rows[:, None] * K + k) * C + offs_c[None, :]
                tl.store(bA_ptr + out, av * s[None, :], mask=mk)
                tl.store(bB_ptr + out, bv + av * t[None, :], mask=mk)

    _INTS3 = ["N", "C", "R", "K", "M", "W", "SPLIT"]

    @triton.jit(do_not_specialize=_INTS3)
    def _site_bwd1_kernel(psx_ptr, ps_ptr, sig_ptr, a_ptr, hpre_ptr, w1_ptr, w2_ptr, m_ptr, r_ptr, t_ptr, w_ptr,
                          la_ptr, lb_ptr, dlog_ptr, dh_ptr, gp_ptr, gsp_ptr, gtp_ptr,
                          N, C, R, K, M, W, SPLIT,
                          HAS_W: tl.constexpr, USE_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
        pid = tl.program_id(0)
        nblocks = tl.num_programs(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rows < N
        la = tl.load(la_ptr).to(tl.float32)
        lb = tl.load(lb_ptr).to(tl.float32)
        cols = M * W * (2 if USE_BIAS else 1)
        # variant A: the shared column's gradient sums over channels (per k, a and b halves)
        ra0 = tl.zeros([BLOCK_N], dtype=tl.float32)
        ra1 = tl.zeros([BLOCK_N], dtype=tl.float32)
        ra2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        rb0 = tl.zeros([BLOCK_N], dtype=tl.float32)
        rb1 = tl.zeros([BLOCK_N], dtype=tl.float32)
        rb2 = tl.zeros([BLOCK_N], dtype=tl.float32)
        # phase 1, per channel block: grad A, B -> grad a, b (and grad s, t), grad logits
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            mk = mask_n[:, None] & mask_c[None, :]
            wcol = tl.where(W == 1, 0, offs_c)
            r = tl.load(r_ptr + offs_c, mask=mask_c, other=0.0)
            s = r
            if HAS_W:
                s = r * tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            t = tl.load(t_ptr + offs_c, mask=mask_c, other=0.0)
            gs = tl.zeros([BLOCK_C], dtype=tl.float32)
            gt = tl.zeros([BLOCK_C], dtype=tl.float32)
            for k in tl.static_range(3):
                if k < K:
                    gA = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
                    gB = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
                    off = (rows[:, None] * K + k) * C + offs_c[None, :]
                    for sp in range(0, SPLIT):  # the apply backward's partial sums, added here
                        gA += tl.load(psx_ptr + sp * N * K * C + off, mask=mk, other=0.0)
                        gB += tl.load(ps_ptr + sp * N * K * C + off, mask=mk, other=0.0)
                    av = tl.load(a_ptr + (rows[:, None] * K + k) * W + wcol[None, :], mask=mk, other=0.0)
                    gs += tl.sum(gA * av, axis=0)  # A = a s, B = b + a t
                    gt += tl.sum(gB * av, axis=0)
                    ga = gA * s[None, :] + gB * t[None, :]
                    if k < M:
                        if W > 1:
                            col = k * W + offs_c
                            sg = tl.load(sig_ptr + rows[:, None] * cols + col[None, :], mask=mk, other=0.0)
                            tl.store(dlog_ptr + rows[:, None] * cols + col[None, :],
                                     ga * la * 2.0 * sg * (1.0 - sg), mask=mk)
                            if USE_BIAS:
                                col = (M + k) * W + offs_c
                                sg = tl.load(sig_ptr + rows[:, None] * cols + col[None, :], mask=mk, other=0.0)
                                tl.store(dlog_ptr + rows[:, None] * cols + col[None, :],
                                         gB * lb * 2.0 * sg * (1.0 - sg), mask=mk)
                        else:
                            ga_r = tl.sum(tl.where(mk, ga, 0.0), axis=1)
                            gb_r = tl.sum(tl.where(mk, gB, 0.0), axis=1)
                            if k == 0:
                                ra0 += ga_r
                                rb0 += gb_r
                            elif k == 1:
                                ra1 += ga_r
                                rb1 += gb_r
                            else:
                                ra2 += ga_r
                                rb2 += gb_r
            tl.store(gsp_ptr + pid * C + offs_c, gs, mask=mask_c)
            tl.store(gtp_ptr + pid * C + offs_c, gt, mask=mask_c)
        if W == 1:
            for k in tl.static_range(3):
                if k < M:
                    if k == 0:
                        ga_r = ra0
                        gb_r = rb0
                    elif k == 1:
                        ga_r = ra1
                        gb_r = rb1
                    else:
                        ga_r = ra2
                        gb_r = rb2
                    sg = tl.load(sig_ptr + rows * cols + k, mask=mask_n, other=0.0)
                    tl.store(dlog_ptr + rows * cols + k, ga_r * la * 2.0 * sg * (1.0 - sg), mask=mask_n)
                    if USE_BIAS:
                        sg = tl.load(sig_ptr + rows * cols + M + k, mask=mask_n, other=0.0)
                        tl.store(dlog_ptr + rows * cols + M + k, gb_r * lb * 2.0 * sg * (1.0 - sg), mask=mask_n)
        tl.debug_barrier()  # grad logits rows written by this program's threads, read across them below
        # phase 2: dh = (dlogits W2) masked by ReLU
        for r0 in range(0, R, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < R
            acc = tl.zeros([BLOCK_N, BLOCK_R], dtype=tl.float32)
            for j0 in range(0, cols, BLOCK_J):
                offs_j = j0 + tl.arange(0, BLOCK_J)
                mask_j = offs_j < cols
                dl = tl.load(dlog_ptr + rows[:, None] * cols + offs_j[None, :], mask=mask_n[:, None] & mask_j[None, :],
                             other=0.0)
                wt = tl.load(w2_ptr + offs_j[:, None] * R + offs_r[None, :], mask=mask_j[:, None] & mask_r[None, :],
                             other=0.0).to(tl.float32)
                acc += tl.dot(dl, wt, input_precision="ieee")
            mk = mask_n[:, None] & mask_r[None, :]
            hp = tl.load(hpre_ptr + rows[:, None] * R + offs_r[None, :], mask=mk, other=0.0)
            tl.store(dh_ptr + rows[:, None] * R + offs_r[None, :], tl.where(hp > 0.0, acc, 0.0), mask=mk)
        tl.debug_barrier()
        # phase 3: grad of the context gp = dh W1, and its part of grad s (sum gp m) and grad t (sum gp)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                offs_r = r0 + tl.arange(0, BLOCK_R)
                mask_r = offs_r < R
                d = tl.load(dh_ptr + rows[:, None] * R + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :],
                            other=0.0)
                wt = tl.load(w1_ptr + offs_r[:, None] * C + offs_c[None, :], mask=mask_r[:, None] & mask_c[None, :],
                             other=0.0).to(tl.float32)
                acc += tl.dot(d, wt, input_precision="ieee")
            mk = mask_n[:, None] & mask_c[None, :]
            tl.store(gp_ptr + rows[:, None] * C + offs_c[None, :], acc, mask=mk)
            mm = tl.load(m_ptr + rows[:, None] * C + offs_c[None, :], mask=mk, other=0.0)
            tl.store(gsp_ptr + (nblocks + pid) * C + offs_c, tl.sum(acc * mm, axis=0), mask=mask_c)
            tl.store(gtp_ptr + (nblocks + pid) * C + offs_c, tl.sum(acc, axis=0), mask=mask_c)

    _INTS4 = ["N", "C", "R", "COLS", "L", "PARTS", "T1", "T2", "J_TILES", "R_TILES"]

    @triton.jit(do_not_specialize=_INTS4)
    def _site_bwd2_kernel(dlog_ptr, h_ptr, dh_ptr, ph_ptr, gsp_ptr, gtp_ptr, zp_ptr, zq_ptr, sw_ptr, t_ptr, mu_ptr,
                          r_ptr, w_ptr, gw2_ptr, gb2_ptr, gw1_ptr, gb1_ptr, gw_ptr, gbias_ptr, gvar_ptr, alpha_ptr,
                          coefp_ptr, v_ptr, gsw_ptr, wsz_ptr,
                          N, C, R, COLS, L, PARTS, T1, T2, J_TILES, R_TILES,
                          BATCH: tl.constexpr, HAS_W: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_J: tl.constexpr):
        pid = tl.program_id(0)
        if pid < T1:  # grad W2 (COLS, R) = dlogits^T h, grad b2 = sum_n dlogits
            jt = pid // R_TILES
            rt = pid % R_TILES
            offs_j = jt * BLOCK_J + tl.arange(0, BLOCK_J)
            offs_r = rt * BLOCK_R + tl.arange(0, BLOCK_R)
            mask_j = offs_j < COLS
            mask_r = offs_r < R
            acc = tl.zeros([BLOCK_J, BLOCK_R], dtype=tl.float32)
            gb = tl.zeros([BLOCK_J], dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                nn = n0 + tl.arange(0, BLOCK_N)
                mask_n = nn < N
                dl = tl.load(dlog_ptr + nn[None, :] * COLS + offs_j[:, None], mask=mask_j[:, None] & mask_n[None, :],
                             other=0.0)
                hh = tl.load(h_ptr + nn[:, None] * R + offs_r[None, :], mask=mask_n[:, None] & mask_r[None, :],
                             other=0.0)
                acc += tl.dot(dl, hh, input_precision="ieee")
                gb += tl.sum(dl, axis=1)
            tl.store(gw2_ptr + offs_j[:, None] * R + offs_r[None, :], acc, mask=mask_j[:, None] & mask_r[None, :])
            if rt == 0:
                tl.store(gb2_ptr + offs_j, gb, mask=mask_j)
        elif pid < T1 + T2:  # grad W1 (R, C) = dh^T ph, grad b1 = sum_n dh
            q = pid - T1
            rt = q % R_TILES
            ct = q // R_TILES
            offs_r = rt * BLOCK_R + tl.arange(0, BLOCK_R)
            offs_c = ct * BLOCK_C + tl.arange(0, BLOCK_C)
            mask_r = offs_r < R
            mask_c = offs_c < C
            acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
            gb = tl.zeros([BLOCK_R], dtype=tl.float32)
            for n0 in range(0, N, BLOCK_N):
                nn = n0 + tl.arange(0, BLOCK_N)
                mask_n = nn < N
                d = tl.load(dh_ptr + nn[None, :] * R + offs_r[:, None], mask=mask_r[:, None] & mask_n[None, :],
                            other=0.0)
                p = tl.load(ph_ptr + nn[:, None] * C + offs_c[None, :], mask=mask_n[:, None] & mask_c[None, :],
                            other=0.0)
                acc += tl.dot(d, p, input_precision="ieee")
                gb += tl.sum(d, axis=1)
            tl.store(gw1_ptr + offs_r[:, None] * C + offs_c[None, :], acc, mask=mask_r[:, None] & mask_c[None, :])
            if ct == 0:
                tl.store(gb1_ptr + offs_r, gb, mask=mask_r)
        else:  # per channel: grad gamma, beta, var and the statistics' gradient's coefficients
            offs_c = (pid - T1 - T2) * BLOCK_C + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            gs = tl.zeros([BLOCK_C], dtype=tl.float32)
            gt = tl.zeros([BLOCK_C], dtype=tl.float32)
            for p in range(0, PARTS):
                gs += tl.load(gsp_ptr + p * C + offs_c, mask=mask_c, other=0.0)
                gt += tl.load(gtp_ptr + p * C + offs_c, mask=mask_c, other=0.0)
            mu = tl.load(mu_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            r = tl.load(r_ptr + offs_c, mask=mask_c, other=0.0)
            if HAS_Z:  # variant C's logits z = sum_c w_c (s_c x + t_c): their part of grad s, t and grad w
                g_ws = tl.zeros([BLOCK_C], dtype=tl.float32)
                g_zb = tl.zeros([BLOCK_C], dtype=tl.float32)
                for n0 in range(0, N, BLOCK_N):
                    nn = n0 + tl.arange(0, BLOCK_N)
                    mk = (nn < N)[:, None] & mask_c[None, :]
                    g_ws += tl.sum(tl.load(zp_ptr + nn[:, None] * C + offs_c[None, :], mask=mk, other=0.0), axis=0)
                    g_zb += tl.sum(tl.load(zq_ptr + nn, mask=nn < N, other=0.0), axis=0)
                swv = tl.load(sw_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
                sz = r
                if HAS_W:
                    sz = r * tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
                tz = tl.load(t_ptr + offs_c, mask=mask_c, other=0.0)
                gs += g_ws * swv
                gt += g_zb * swv
                tl.store(gsw_ptr + offs_c, g_ws * sz + g_zb * tz, mask=mask_c)
                tl.store(wsz_ptr + offs_c, swv * sz, mask=mask_c)
            gs = gs - gt * mu  # t = beta - mu s
            gr = gs
            s = r
            if HAS_W:
                wv = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
                gr = gs * wv
                s = r * wv
            gvar = gr * -0.5 * r * r * r
            tl.store(gw_ptr + offs_c, gs * r, mask=mask_c)
            tl.store(gbias_ptr + offs_c, gt, mask=mask_c)
            tl.store(gvar_ptr + offs_c, gvar, mask=mask_c)
            ml = N * 1.0 * L
            coefp = s / L
            if BATCH:  # d m_nc / dx = 1 / L, d var / dx = 2 (x - mu) / (N L), mu = mean of m over n
                alpha = gvar * 2.0 / ml
                v = -gt * s / ml - alpha * mu
            else:  # running statistics: the pool's gradient only
                alpha = tl.zeros([BLOCK_C], dtype=tl.float32)
                v = tl.zeros([BLOCK_C], dtype=tl.float32)
            tl.store(alpha_ptr + offs_c, alpha, mask=mask_c)
            tl.store(coefp_ptr + offs_c, coefp, mask=mask_c)
            tl.store(v_ptr + offs_c, v, mask=mask_c)

    _INTS5 = ["C", "L", "sxn", "sxc", "sxl", "sgn", "sgc", "sgl", "C_BLOCKS", "L_BLOCKS"]

    @triton.jit(do_not_specialize=_INTS5)
    def _site_dx_kernel(x_ptr, gx_ptr, alpha_ptr, coefp_ptr, v_ptr, gp_ptr, wsz_ptr, gz_ptr,
                        C, L, sxn, sxc, sxl, sgn, sgc, sgl, C_BLOCKS, L_BLOCKS,
                        ACCUM: tl.constexpr, HAS_Z: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
        # grad x (+)= alpha_c x + gp_nc s_c / L + v_c [+ ws_c gz_nl]: the statistics' gradient, in place
        # into the apply's grad x (ACCUM), and for variant C the logits' gradient
        pid = tl.program_id(0)
        lb = pid % L_BLOCKS
        rest = pid // L_BLOCKS
        cb = rest % C_BLOCKS
        n = rest // C_BLOCKS
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_l = lb * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_c = offs_c < C
        m = mask_c[:, None] & (offs_l[None, :] < L)
        n64 = n.to(tl.int64)
        x = tl.load(x_ptr + n64 * sxn + offs_c[:, None] * sxc + offs_l[None, :] * sxl, mask=m, other=0.0)
        gptr = gx_ptr + n64 * sgn + offs_c[:, None] * sgc + offs_l[None, :] * sgl
        if ACCUM:
            g = tl.load(gptr, mask=m, other=0.0).to(tl.float32)
        else:
            g = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
        if HAS_Z:
            gz = tl.load(gz_ptr + n64 * L + offs_l, mask=offs_l < L, other=0.0).to(tl.float32)
            g += tl.load(wsz_ptr + offs_c, mask=mask_c, other=0.0)[:, None] * gz[None, :]
        al = tl.load(alpha_ptr + offs_c, mask=mask_c, other=0.0)
        be = tl.load(gp_ptr + n * C + offs_c, mask=mask_c, other=0.0) * tl.load(coefp_ptr + offs_c, mask=mask_c,
                                                                                 other=0.0) \
            + tl.load(v_ptr + offs_c, mask=mask_c, other=0.0)
        g += x.to(tl.float32) * al[:, None] + be[:, None]
        tl.store(gptr, g.to(gx_ptr.dtype.element_ty), mask=m)

    _INTS7 = ["C", "L", "sxn", "sxc", "sxl", "L_BLOCKS"]

    @triton.jit(do_not_specialize=_INTS7)
    def _site_z_kernel(x_ptr, z_ptr, sw_ptr, r_ptr, t_ptr, w_ptr, C, L, sxn, sxc, sxl, L_BLOCKS,
                       HAS_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
        # variant C's logits on the BN output: z_nl = sum_c w_c (s_c x_ncl + t_c), one read of x
        pid = tl.program_id(0)
        lb = pid % L_BLOCKS
        n = pid // L_BLOCKS
        offs_l = lb * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_l = offs_l < L
        acc = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
        bias = tl.zeros([BLOCK_C], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            sw = tl.load(sw_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            s = tl.load(r_ptr + offs_c, mask=mask_c, other=0.0)
            if HAS_W:
                s = s * tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + n.to(tl.int64) * sxn + offs_c[:, None] * sxc + offs_l[None, :] * sxl,
                        mask=mask_c[:, None] & mask_l[None, :], other=0.0).to(tl.float32)
            acc += x * (sw * s)[:, None]
            bias += sw * tl.load(t_ptr + offs_c, mask=mask_c, other=0.0)
        z = tl.sum(acc, axis=0) + tl.sum(bias, axis=0)
        tl.store(z_ptr + n.to(tl.int64) * L + offs_l, z.to(z_ptr.dtype.element_ty), mask=mask_l)

    _INTS8 = ["N", "C", "L", "sxn", "sxc", "sxl", "C_BLOCKS"]

    @triton.jit(do_not_specialize=_INTS8)
    def _site_zgrad_kernel(x_ptr, gz_ptr, zp_ptr, zq_ptr, N, C, L, sxn, sxc, sxl, C_BLOCKS,
                           BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr):
        # per (n, c): sum_l gz_nl x_ncl (grad of the folded weights), per n: sum_l gz_nl (of the bias)
        pid = tl.program_id(0)
        cb = pid % C_BLOCKS
        n = pid // C_BLOCKS
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        acc = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.float32)
        accq = tl.zeros([BLOCK_L], dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            mask_l = offs_l < L
            gz = tl.load(gz_ptr + n.to(tl.int64) * L + offs_l, mask=mask_l, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + n.to(tl.int64) * sxn + offs_c[:, None] * sxc + offs_l[None, :] * sxl,
                        mask=mask_c[:, None] & mask_l[None, :], other=0.0).to(tl.float32)
            acc += x * gz[None, :]
            accq += gz
        tl.store(zp_ptr + n * C + offs_c, tl.sum(acc, axis=1), mask=mask_c)
        if cb == 0:
            tl.store(zq_ptr + n, tl.sum(accq, axis=0))

    _INTS9 = ["L"]

    @triton.jit
    def _pi_stats(z_ptr, L, inv_tau, BLOCK_L: tl.constexpr):
        # (max, sum of exp(u - max)) of u = z / tau over one sample's L positions (online softmax)
        # masked lanes hold a finite floor, not -inf: -inf - -inf would be nan in the rescale
        big = tl.full([BLOCK_L], -1e30, dtype=tl.float32)
        tot = tl.zeros([BLOCK_L], dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):
            offs = l0 + tl.arange(0, BLOCK_L)
            mk = offs < L
            u = tl.where(mk, tl.load(z_ptr + offs, mask=mk, other=0.0).to(tl.float32) * inv_tau, -1e30)
            new = tl.maximum(big, u)
            tot = tot * tl.exp(big - new) + tl.where(mk, tl.exp(u - new), 0.0)
            big = new
        mx = tl.max(big, axis=0)
        return mx, tl.sum(tot * tl.exp(big - mx), axis=0)

    @triton.jit
    def _pi_terms(z_ptr, g_ptr, offs, mk, inv_tau, mx, tot, gamma):
        # at positions offs of one sample: s = softmax(z / tau) and gamma gq, gq = g where gamma s <= 1
        s = tl.exp(tl.load(z_ptr + offs, mask=mk, other=0.0).to(tl.float32) * inv_tau - mx) / tot
        g = tl.load(g_ptr + offs, mask=mk, other=0.0).to(tl.float32)
        return s, tl.where(s * gamma > 1.0, 0.0, g) * gamma

    @triton.jit(do_not_specialize=_INTS9)
    def _pi_fwd_kernel(z_ptr, tau_ptr, pi_ptr, L, BLOCK_L: tl.constexpr):
        # Eq. 4 for one sample: pi = min(gamma softmax(z / tau), 1), gamma = L / 3, in fp32
        n = tl.program_id(0).to(tl.int64)
        inv_tau = 1.0 / tl.load(tau_ptr).to(tl.float32)
        mx, tot = _pi_stats(z_ptr + n * L, L, inv_tau, BLOCK_L)
        gamma = L / 3.0
        for l0 in range(0, L, BLOCK_L):
            offs = l0 + tl.arange(0, BLOCK_L)
            u = tl.load(z_ptr + n * L + offs, mask=offs < L, other=0.0).to(tl.float32) * inv_tau
            p = tl.minimum(tl.exp(u - mx) / tot * gamma, 1.0)
            tl.store(pi_ptr + n * L + offs, p.to(pi_ptr.dtype.element_ty), mask=offs < L)

    @triton.jit(do_not_specialize=_INTS9)
    def _pi_bwd_kernel(g_ptr, z_ptr, tau_ptr, gz_ptr, L, BLOCK_L: tl.constexpr):
        # grad z of Eq. 4: q = gamma s, gq = g where q <= 1, gu = s (gamma gq - sum(gamma gq s)), gz = gu / tau
        n = tl.program_id(0).to(tl.int64)
        inv_tau = 1.0 / tl.load(tau_ptr).to(tl.float32)
        mx, tot = _pi_stats(z_ptr + n * L, L, inv_tau, BLOCK_L)
        gamma = L / 3.0
        dot = tl.zeros([BLOCK_L], dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):
            offs = l0 + tl.arange(0, BLOCK_L)
            mk = offs < L
            s, gs = _pi_terms(z_ptr + n * L, g_ptr + n * L, offs, mk, inv_tau, mx, tot, gamma)
            dot += tl.where(mk, gs * s, 0.0)
        d = tl.sum(dot, axis=0)
        for l0 in range(0, L, BLOCK_L):  # the terms again (recomputed, not stored: one write of gz)
            offs = l0 + tl.arange(0, BLOCK_L)
            mk = offs < L
            s, gs = _pi_terms(z_ptr + n * L, g_ptr + n * L, offs, mk, inv_tau, mx, tot, gamma)
            tl.store(gz_ptr + n * L + offs, (s * (gs - d) * inv_tau).to(gz_ptr.dtype.element_ty), mask=mk)

    _INTS6 = ["C"]

    @triton.jit(do_not_specialize=_INTS6)
    def _running_kernel(rm_ptr, rv_ptr, nbt_ptr, mu_ptr, var_ptr, C, momentum, unbias,
                        HAS_NBT: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK_C: tl.constexpr):
        # BatchNorm's running update in one launch, on the device (no host sync)
        factor = momentum
        if HAS_NBT:
            nbt = tl.load(nbt_ptr) + 1
            if CUMULATIVE:
                factor = 1.0 / nbt.to(tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offs = c0 + tl.arange(0, BLOCK_C)
            mk = offs < C
            rm = tl.load(rm_ptr + offs, mask=mk, other=0.0)
            rv = tl.load(rv_ptr + offs, mask=mk, other=0.0)
            mu = tl.load(mu_ptr + offs, mask=mk, other=0.0).to(rm.dtype)
            vv = (tl.load(var_ptr + offs, mask=mk, other=0.0) * unbias).to(rv.dtype)
            tl.store(rm_ptr + offs, rm + factor * (mu - rm), mask=mk)
            tl.store(rv_ptr + offs, rv + factor * (vv - rv), mask=mk)
        if HAS_NBT:
            tl.debug_barrier()  # every thread read the count before it is written
            tl.store(nbt_ptr, nbt)

    _triton.KERNELS.update(_site_fwd1_kernel=_site_fwd1_kernel, _site_fwd2_kernel=_site_fwd2_kernel,
                           _site_bwd1_kernel=_site_bwd1_kernel, _site_bwd2_kernel=_site_bwd2_kernel,
                           _site_dx_kernel=_site_dx_kernel, _running_kernel=_running_kernel,
                           _site_z_kernel=_site_z_kernel, _site_zgrad_kernel=_site_zgrad_kernel,
                           _pi_fwd_kernel=_pi_fwd_kernel, _pi_bwd_kernel=_pi_bwd_kernel)


def ok(x: torch.Tensor, w1: torch.Tensor, k: int) -> bool:
    """The site kernels take this input: Triton's device, a 4-byte-or-smaller float x, fp32 hyper-function
    weights (AMP keeps parameters fp32) and K <= 3."""
    return (HAS_TRITON and _triton.available(x.device) and x.dim() >= 2
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and w1.dtype == torch.float32 and 1 <= k <= _triton.MAX_K)


def _f32(t: Optional[torch.Tensor], ref: torch.Tensor) -> torch.Tensor:
    """t (a parameter or buffer) as the kernels read it, or a placeholder where absent."""
    if t is None:
        return ref
    return t if t.is_contiguous() else t.contiguous()


def coefs(x3, mean, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, segments, width,
          use_bias):
    """(A, B, m, mu_b, var_b, state) as ``ops.bn_coefs`` returns them (z aside), or None (a launch
    failed: the caller runs the composition). Three launches: statistics, _fwd1, _fwd2."""
    n, c, l = x3.shape
    dev = x3.device
    batch = mean is None
    if batch:
        got = _triton_bn.row_partials(x3)
        if got is None:
            return None
        s1, s2, split = got
    else:  # running statistics: the pool only (its first sum), from the same kernel
        got = _triton_bn.row_partials(x3)
        if got is None:
            return None
        s1, s2, split = got
    f32 = torch.float32
    k = init_a.shape[0]
    rdim = w1.shape[0]
    cols = w2.shape[0]
    empty = torch.empty(0, device=dev, dtype=f32)
    m = torch.empty(n, c, device=dev, dtype=f32)
    r = torch.empty(c, device=dev, dtype=f32)
    t = torch.empty(c, device=dev, dtype=f32)
    mu_b = torch.empty(c, device=dev, dtype=f32) if batch else empty
    var_b = torch.empty(c, device=dev, dtype=f32) if batch else empty
    ph = torch.empty(n, c, device=dev, dtype=f32)
    h_pre = torch.empty(n, rdim, device=dev, dtype=f32)
    h = torch.empty(n, rdim, device=dev, dtype=f32)
    sig = torch.empty(n, cols, device=dev, dtype=f32)
    a = torch.empty(n, k, width, device=dev, dtype=f32)
    big_a = torch.empty(n, k, c, device=dev, dtype=f32)
    big_b = torch.empty(n, k, c, device=dev, dtype=f32)
    sxn, sxc, _ = x3.stride()
    nblocks = _cdiv(n, BLOCK_N)
    p1 = Plan("_site_fwd1_kernel", (nblocks,), dict(N=n, C=c, L=l, R=rdim, SPLIT=split, sxn=sxn, sxc=sxc),
              dict(BATCH=batch, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C,
                   BLOCK_R=BLOCK_R), WARPS, 1)
    if not _triton._launch(p1, dev, (x3, s1, s2, _f32(mean, empty), _f32(var, empty), _f32(weight, empty),
                                     _f32(bias, empty), _f32(w1, w1), _f32(b1, b1), m, r, t, mu_b, var_b, ph, h_pre,
                                     h), (float(eps),)):
        return None
    c_blocks = _cdiv(c, BLOCK_C)
    p2 = Plan("_site_fwd2_kernel", (nblocks * c_blocks,),
              dict(N=n, C=c, R=rdim, K=k, M=segments, W=width, C_BLOCKS=c_blocks),
              dict(HAS_W=weight is not None, USE_BIAS=bool(use_bias), BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C,
                   BLOCK_R=BLOCK_R), WARPS_HYPER, 1)
    if not _triton._launch(p2, dev, (h, _f32(w2, w2), _f32(b2, b2), r, t, _f32(weight, empty), _f32(init_a, init_a),
                                     _f32(init_b, init_b), _f32(lambda_a, lambda_a), _f32(lambda_b, lambda_b),
                                     big_a, big_b, sig, a)):
        return None
    return big_a, big_b, m, mu_b, var_b, [r, t, ph, h_pre, h, sig, a]


def coefs_backward(psx, ps, split, m, mu, batch, l, weight, w1, w2, lambda_a, lambda_b, state, segments, width,
                   use_bias, zsums=None, spatial_w=None):
    """The coefficient backward from the apply backward's partial sums: (gp, alpha, coefp, v, g_weight,
    g_bias, gvar, gw1, gb1, gw2, gb2, g_sw, wsz), or None. Two launches. zsums: variant C's (zp, zq) from
    ``z_sums`` (then g_sw is spatial_w's gradient (C,) and wsz the folded weights w s, else empty)."""
    r, t, ph, h_pre, h, sig, a = state
    n, c = m.shape
    k = a.shape[1]
    rdim, cols = w1.shape[0], w2.shape[0]
    dev = m.device
    f32 = torch.float32
    empty = torch.empty(0, device=dev, dtype=f32)
    nblocks = _cdiv(n, BLOCK_N)
    dlog = torch.empty(n, cols, device=dev, dtype=f32)
    dh = torch.empty(n, rdim, device=dev, dtype=f32)
    gp = torch.empty(n, c, device=dev, dtype=f32)
    gsp = torch.empty(2 * nblocks, c, device=dev, dtype=f32)
    gtp = torch.empty_like(gsp)
    p1 = Plan("_site_bwd1_kernel", (nblocks,), dict(N=n, C=c, R=rdim, K=k, M=segments, W=width, SPLIT=split),
              dict(HAS_W=weight is not None, USE_BIAS=bool(use_bias), BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C,
                   BLOCK_R=BLOCK_R, BLOCK_J=BLOCK_J), WARPS_HYPER, 1)
    if not _triton._launch(p1, dev, (psx, ps, sig, a, h_pre, _f32(w1, w1), _f32(w2, w2), m, r, t, _f32(weight, empty),
                                     _f32(lambda_a, lambda_a), _f32(lambda_b, lambda_b), dlog, dh, gp, gsp, gtp)):
        return None
    j_tiles, r_tiles, c_tiles = _cdiv(cols, BLOCK_J), _cdiv(rdim, BLOCK_R), _cdiv(c, BLOCK_C)
    t1, t2 = j_tiles * r_tiles, r_tiles * c_tiles
    gw2 = torch.empty(cols, rdim, device=dev, dtype=f32)
    gb2 = torch.empty(cols, device=dev, dtype=f32)
    gw1 = torch.empty(rdim, c, device=dev, dtype=f32)
    gb1 = torch.empty(rdim, device=dev, dtype=f32)
    g_weight, g_bias, gvar = (torch.empty(c, device=dev, dtype=f32) for _ in range(3))
    alpha, coefp, v = (torch.empty(c, device=dev, dtype=f32) for _ in range(3))
    has_z = zsums is not None
    zp, zq = zsums if has_z else (empty, empty)
    g_sw = torch.empty(c, device=dev, dtype=f32) if has_z else empty
    wsz = torch.empty(c, device=dev, dtype=f32) if has_z else empty
    p2 = Plan("_site_bwd2_kernel", (t1 + t2 + c_tiles,),
              dict(N=n, C=c, R=rdim, COLS=cols, L=l, PARTS=2 * nblocks, T1=t1, T2=t2, J_TILES=j_tiles,
                   R_TILES=r_tiles),
              dict(BATCH=bool(batch), HAS_W=weight is not None, HAS_Z=has_z, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C,
                   BLOCK_R=BLOCK_R, BLOCK_J=BLOCK_J), WARPS, 1)
    sw = _f32(spatial_w.reshape(-1), empty) if has_z else empty
    if not _triton._launch(p2, dev, (dlog, h, dh, ph, gsp, gtp, zp, zq, sw, t, mu, r, _f32(weight, empty), gw2, gb2,
                                     gw1, gb1, g_weight, g_bias, gvar, alpha, coefp, v, g_sw, wsz)):
        return None
    return gp, alpha, coefp, v, g_weight, g_bias, gvar, gw1, gb1, gw2, gb2, g_sw, wsz


def spatial_z(x3: torch.Tensor, spatial_w: torch.Tensor, r, t, weight) -> Optional[torch.Tensor]:
    """Variant C's logits (N, L) in x's dtype on the BN output s x + t; one launch (None: failed)."""
    n, c, l = x3.shape
    z = torch.empty(n, l, device=x3.device, dtype=x3.dtype)
    bl = 64
    l_blocks = _cdiv(l, bl)
    sxn, sxc, sxl = x3.stride()
    empty = r[:0]
    plan = Plan("_site_z_kernel", (n * l_blocks,), dict(C=c, L=l, sxn=sxn, sxc=sxc, sxl=sxl, L_BLOCKS=l_blocks),
                dict(HAS_W=weight is not None, BLOCK_C=32, BLOCK_L=bl), WARPS, 1)
    ok = _triton._launch(plan, x3.device, (x3, z, _f32(spatial_w.reshape(-1), empty), r, t, _f32(weight, empty)))
    return z if ok else None


def z_sums(x3: torch.Tensor, gz2: torch.Tensor):
    """(zp (N, C) = sum_l gz x, zq (N,) = sum_l gz) for the logits' backward; one launch (None: failed)."""
    n, c, l = x3.shape
    bc = 32
    c_blocks = _cdiv(c, bc)
    zp = torch.empty(n, c, device=x3.device, dtype=torch.float32)
    zq = torch.empty(n, device=x3.device, dtype=torch.float32)
    sxn, sxc, sxl = x3.stride()
    plan = Plan("_site_zgrad_kernel", (n * c_blocks,), dict(N=n, C=c, L=l, sxn=sxn, sxc=sxc, sxl=sxl,
                                                            C_BLOCKS=c_blocks), dict(BLOCK_C=bc, BLOCK_L=64), WARPS, 1)
    return (zp, zq) if _triton._launch(plan, x3.device, (x3, gz2, zp, zq)) else None


def add_stats_grad(gx3: torch.Tensor, x3: torch.Tensor, alpha, coefp, v, gp, accum: bool = True, wsz=None,
                   gz2=None) -> bool:
    """grad x += alpha_c x + gp_nc coefp_c + v_c in place on the (N, C, L) view gx3 (accum False: = instead
    of +=), plus wsz_c gz_nl given variant C's logits' gradient gz2 (N, L); one launch."""
    n, c, l = x3.shape
    bc, bl, warps = _triton_bn.tiles(c, l, x3.stride(2) == 1)
    c_blocks, l_blocks = _cdiv(c, bc), _cdiv(l, bl)
    sxn, sxc, sxl = x3.stride()
    sgn, sgc, sgl = gx3.stride()
    plan = Plan("_site_dx_kernel", (n * c_blocks * l_blocks,),
                dict(C=c, L=l, sxn=sxn, sxc=sxc, sxl=sxl, sgn=sgn, sgc=sgc, sgl=sgl, C_BLOCKS=c_blocks,
                     L_BLOCKS=l_blocks), dict(ACCUM=accum, HAS_Z=gz2 is not None, BLOCK_C=bc, BLOCK_L=bl), warps, 1)
    return _triton._launch(plan, x3.device, (x3, gx3, alpha, coefp, v, gp, alpha if wsz is None else wsz,
                                             alpha if gz2 is None else gz2))


def running_update(running_mean, running_var, num_batches_tracked, mu, var, momentum, cumulative, count) -> bool:
    """BatchNorm2d's running update in one launch (False: the caller runs the torch ops)."""
    if not (running_mean.is_contiguous() and running_var.is_contiguous()):
        return False
    has_nbt = num_batches_tracked is not None
    c = running_mean.shape[0]
    plan = Plan("_running_kernel", (1,), dict(C=c), dict(HAS_NBT=has_nbt, CUMULATIVE=bool(cumulative),
                                                          BLOCK_C=1024), WARPS, 1)
    nbt = num_batches_tracked if has_nbt else running_mean
    return _triton._launch(plan, running_mean.device, (running_mean, running_var, nbt, mu, var),
                           (0.0 if cumulative else float(momentum), float(count) / (count - 1)))


PI_BLOCK = 1024


def spatial_pi(z: torch.Tensor, tau: torch.Tensor) -> Optional[torch.Tensor]:
    """Eq. 4 on logits z (N, ...) (softmax over everything after N), in z's dtype; one launch (None: failed,
    or float64, which the torch kernels compute in float64)."""
    if z.dtype == torch.float64:
        return None
    z2 = z.reshape(z.shape[0], -1).contiguous()
    pi = torch.empty_like(z2)
    plan = Plan("_pi_fwd_kernel", (z2.shape[0],), dict(L=z2.shape[1]), dict(BLOCK_L=PI_BLOCK), WARPS, 1)
    return pi.reshape(z.shape) if _triton._launch(plan, z.device, (z2, tau, pi)) else None


def spatial_pi_backward(g: torch.Tensor, z: torch.Tensor, tau: torch.Tensor) -> Optional[torch.Tensor]:
    """grad z of ``spatial_pi`` given grad pi g, in z's dtype; one launch (None: failed, or float64)."""
    if z.dtype == torch.float64:
        return None
    z2 = z.reshape(z.shape[0], -1).contiguous()
    g2 = g.reshape(z2.shape).contiguous()
    gz = torch.empty_like(z2)
    plan = Plan("_pi_bwd_kernel", (z2.shape[0],), dict(L=z2.shape[1]), dict(BLOCK_L=PI_BLOCK), WARPS, 1)
    return gz.reshape(z.shape) if _triton._launch(plan, z.device, (g2, z2, tau, gz)) else None

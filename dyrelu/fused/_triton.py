"""Triton kernels of the fused DY-ReLU (CUDA; on the CPU through TRITON_INTERPRET=1 for tests).

Every kernel sees the input as an (N, C, L) view in one of two layouts, passed as a constexpr:
NCHW-contiguous (L has stride 1) or channels_last (C has stride 1; also (N, C) inputs). Other
strides are copied to NCHW first. All integer arguments are unspecialised (``do_not_specialize``),
so a kernel configuration is exactly: the tensors' dtypes, the constexprs below and num_warps.
That keeps the set of configurations small and enumerable: ``tests/test_triton_aot.py`` compiles
every one the planners (``plan_pool`` / ``plan_forward`` / ``plan_backward``) can return for the
shapes we ship, for sm_80 and sm_90, without a GPU.

* ``pool``: per-(n, c) mean over L; fp32 accumulation (fp64 for fp64 inputs), division by the
  integer L in the accumulation dtype.
* ``apply_forward``: y = max_k(a_k x + b_k) [* pi], one read of x, one write of y.
* ``apply_backward``: one read of (g, x) [and pi], one write of grad_x; recomputes the winning
  segment, and writes per-(split, n, k, c) partial sums of g*x and g and, for variant C,
  per-(c-block, n, l) partial sums over c of g * max_k(...) (grad of pi).

Determinism: no atomics anywhere. Partial sums go to buffers with one slot per program and are
added by ``torch.sum`` over the split axis, and the split depends on the shape only (never on the
SM count), so results are bitwise reproducible run to run and across GPUs with the same kernels.
Every grid is one-dimensional (N, C-blocks and L-splits folded into axis 0, which CUDA allows up
to 2^31 - 1; axes 1 and 2 stop at 65535). Launches run under ``torch.cuda.device(x.device)``.

Coefficients a, b are (N, K, C) contiguous in the accumulation dtype (variant A's (N, K, 1) is
expanded; a missing intercept is zeros). K is 1..MAX_K (larger K uses the torch kernels). Ties pick
the lowest k, like the torch kernels.
"""
from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import NamedTuple, Optional

import torch

from . import _latch
from ._tensors import acc_dtype

try:  # triton is optional: without it the CUDA path uses the torch kernels
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False

MAX_K = 3
# Elements per tile (BLOCK_C * BLOCK_L) for 2- and 4-byte dtypes (see ``tiles``).
TILE_ELEMS = 2048
# Programs the backward and pool aim for, split along L when N x C-blocks is fewer: ~4 waves on
# 132 SMs (H100 / H200), a little over on 108 (A100). A constant, so the split is fixed by shape.
TARGET_PROGRAMS = 512
_NCHW, _CL = 0, 1


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available(device: torch.device) -> bool:
    """Whether the Triton kernels can run on tensors of ``device``."""
    if not HAS_TRITON:
        return False
    if interpreting():
        return device.type == "cpu"
    return device.type == "cuda"


def strict() -> bool:
    """DYRELU_FUSED_BACKEND=triton: errors propagate (debugging); otherwise they fall back."""
    return os.environ.get("DYRELU_FUSED_BACKEND", "") == "triton"


if HAS_TRITON:
    _INTS_POOL = ["N", "C", "L", "L_PER", "C_BLOCKS"]

    @triton.jit(do_not_specialize=_INTS_POOL)
    def _pool_kernel(x_ptr, part_ptr, N, C, L, L_PER, C_BLOCKS,
                     CL: tl.constexpr, VEC: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr):
        pid = tl.program_id(0)
        # The unit-stride length is a multiple of VEC (the host checked). Saying so by arithmetic
        # (tl.multiple_of has no op to annotate on an unspecialised argument) keeps masks and
        # offsets constant / aligned over VEC elements, so the loads vectorise.
        if CL:
            C = (C // VEC) * VEC
        else:
            L = (L // VEC) * VEC
        cb = pid % C_BLOCKS
        rest = pid // C_BLOCKS
        n = rest % N
        s = rest // N
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        if CL:
            row = C
            base = x_ptr + n.to(tl.int64) * L * row + offs_c[:, None]
        else:
            row = L
            base = x_ptr + n.to(tl.int64) * C * row + offs_c[:, None] * row
        l_start = s * (L_PER // BLOCK_L) * BLOCK_L
        l_end = tl.minimum(l_start + (L_PER // BLOCK_L) * BLOCK_L, L)
        acc = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
        for l0 in range(l_start, l_end, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            m = mask_c[:, None] & (offs_l[None, :] < l_end)
            if CL:
                v = tl.load(base + offs_l[None, :] * row, mask=m, other=0.0)
            else:
                v = tl.load(base + offs_l[None, :], mask=m, other=0.0)
            acc += v.to(ACC)
        part = tl.sum(acc, axis=1) / L  # integer L promotes to ACC: exact divisor in fp64
        tl.store(part_ptr + (s * N + n).to(tl.int64) * C + offs_c, part, mask=mask_c)

    _INTS_FWD = ["N", "C", "L", "K", "C_BLOCKS", "L_BLOCKS"]

    @triton.jit(do_not_specialize=_INTS_FWD)
    def _apply_fwd_kernel(x_ptr, y_ptr, a_ptr, b_ptr, pi_ptr, N, C, L, K, C_BLOCKS, L_BLOCKS,
                          HAS_PI: tl.constexpr, CL: tl.constexpr, VEC: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr):
        pid = tl.program_id(0)
        # The unit-stride length is a multiple of VEC (the host checked). Saying so by arithmetic
        # (tl.multiple_of has no op to annotate on an unspecialised argument) keeps masks and
        # offsets constant / aligned over VEC elements, so the loads vectorise.
        if CL:
            C = (C // VEC) * VEC
        else:
            L = (L // VEC) * VEC
        if CL:  # neighbouring programs take neighbouring tiles in memory
            cb = pid % C_BLOCKS
            rest = pid // C_BLOCKS
            lb = rest % L_BLOCKS
            n = rest // L_BLOCKS
        else:
            lb = pid % L_BLOCKS
            rest = pid // L_BLOCKS
            cb = rest % C_BLOCKS
            n = rest // C_BLOCKS
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        offs_l = lb * BLOCK_L + tl.arange(0, BLOCK_L)
        mask_c = offs_c < C
        mask_l = offs_l < L
        m = mask_c[:, None] & mask_l[None, :]
        if CL:
            row = C
            offs = n.to(tl.int64) * L * row + offs_l[None, :] * row + offs_c[:, None]
        else:
            row = L
            offs = n.to(tl.int64) * C * row + offs_c[:, None] * row + offs_l[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC)
        coef = n * K * C + offs_c
        best = x * tl.load(a_ptr + coef, mask=mask_c, other=0.0)[:, None] \
            + tl.load(b_ptr + coef, mask=mask_c, other=0.0)[:, None]
        if K > 1:  # K is a runtime value (1..MAX_K): one compiled kernel serves every K
            a1 = tl.load(a_ptr + coef + C, mask=mask_c, other=0.0)
            b1 = tl.load(b_ptr + coef + C, mask=mask_c, other=0.0)
            best = tl.maximum(best, x * a1[:, None] + b1[:, None])
        if K > 2:
            a2 = tl.load(a_ptr + coef + 2 * C, mask=mask_c, other=0.0)
            b2 = tl.load(b_ptr + coef + 2 * C, mask=mask_c, other=0.0)
            best = tl.maximum(best, x * a2[:, None] + b2[:, None])
        if HAS_PI:
            p = tl.load(pi_ptr + n.to(tl.int64) * L + offs_l, mask=mask_l, other=0.0).to(ACC)
            best = best * p[None, :]
        tl.store(y_ptr + offs, best.to(y_ptr.dtype.element_ty), mask=m)

    _INTS_BWD = ["N", "C", "L", "K", "L_PER", "C_BLOCKS"]

    @triton.jit(do_not_specialize=_INTS_BWD)
    def _apply_bwd_kernel(g_ptr, x_ptr, gx_ptr, a_ptr, b_ptr, pi_ptr, psx_ptr, ps_ptr, ppi_ptr,
                          N, C, L, K, L_PER, C_BLOCKS,
                          HAS_PI: tl.constexpr, CL: tl.constexpr, VEC: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, ACC: tl.constexpr):
        pid = tl.program_id(0)
        # The unit-stride length is a multiple of VEC (the host checked). Saying so by arithmetic
        # (tl.multiple_of has no op to annotate on an unspecialised argument) keeps masks and
        # offsets constant / aligned over VEC elements, so the loads vectorise.
        if CL:
            C = (C // VEC) * VEC
        else:
            L = (L // VEC) * VEC
        cb = pid % C_BLOCKS
        rest = pid // C_BLOCKS
        n = rest % N
        s = rest // N
        offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        n64 = n.to(tl.int64)
        if CL:
            row = C
        else:
            row = L
        # the coefficients of this program's channels, loaded once (not per L step)
        coef = n * K * C + offs_c
        a0 = tl.load(a_ptr + coef, mask=mask_c, other=0.0)
        b0 = tl.load(b_ptr + coef, mask=mask_c, other=0.0)
        a1 = a0
        b1 = b0
        a2 = a0
        b2 = b0
        if K > 1:
            a1 = tl.load(a_ptr + coef + C, mask=mask_c, other=0.0)
            b1 = tl.load(b_ptr + coef + C, mask=mask_c, other=0.0)
        if K > 2:
            a2 = tl.load(a_ptr + coef + 2 * C, mask=mask_c, other=0.0)
            b2 = tl.load(b_ptr + coef + 2 * C, mask=mask_c, other=0.0)
        # per-lane running sums over this program's L range, reduced across lanes once after the
        # loop (a reduction per L step costs shuffles and a barrier every iteration).
        tx0 = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
        t0 = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
        tx1 = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
        t1 = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
        tx2 = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
        t2 = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC)
        l_start = s * (L_PER // BLOCK_L) * BLOCK_L
        l_end = tl.minimum(l_start + (L_PER // BLOCK_L) * BLOCK_L, L)
        for l0 in range(l_start, l_end, BLOCK_L):
            offs_l = l0 + tl.arange(0, BLOCK_L)
            mask_l = offs_l < l_end
            m = mask_c[:, None] & mask_l[None, :]
            if CL:
                offs = n64 * L * row + offs_l[None, :] * row + offs_c[:, None]
            else:
                offs = n64 * C * row + offs_c[:, None] * row + offs_l[None, :]
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(ACC)
            g = tl.load(g_ptr + offs, mask=m, other=0.0).to(ACC)
            best = x * a0[:, None] + b0[:, None]
            a_sel = tl.zeros([BLOCK_C, BLOCK_L], dtype=ACC) + a0[:, None]
            sel = tl.zeros([BLOCK_C, BLOCK_L], dtype=tl.int32)
            if K > 1:
                u = x * a1[:, None] + b1[:, None]
                better = u > best
                best = tl.where(better, u, best)
                a_sel = tl.where(better, a1[:, None], a_sel)
                sel = tl.where(better, 1, sel)
            if K > 2:
                u = x * a2[:, None] + b2[:, None]
                better = u > best
                best = tl.where(better, u, best)
                a_sel = tl.where(better, a2[:, None], a_sel)
                sel = tl.where(better, 2, sel)
            if HAS_PI:
                p = tl.load(pi_ptr + n64 * L + offs_l, mask=mask_l, other=0.0).to(ACC)
                gpi = tl.sum(g * best, axis=0)
                tl.store(ppi_ptr + (cb * N + n).to(tl.int64) * L + offs_l, gpi, mask=mask_l)
                g = g * p[None, :]
            tl.store(gx_ptr + offs, (g * a_sel).to(gx_ptr.dtype.element_ty), mask=m)
            gxx = g * x
            tx0 += tl.where(sel == 0, gxx, 0.0)
            t0 += tl.where(sel == 0, g, 0.0)
            if K > 1:
                tx1 += tl.where(sel == 1, gxx, 0.0)
                t1 += tl.where(sel == 1, g, 0.0)
            if K > 2:
                tx2 += tl.where(sel == 2, gxx, 0.0)
                t2 += tl.where(sel == 2, g, 0.0)
        sx1 = tl.sum(tx1, axis=1)
        s1 = tl.sum(t1, axis=1)
        sx2 = tl.sum(tx2, axis=1)
        s2 = tl.sum(t2, axis=1)
        sx0 = tl.sum(tx0, axis=1)
        s0 = tl.sum(t0, axis=1)
        out = (s * N + n).to(tl.int64) * K * C + offs_c
        tl.store(psx_ptr + out, sx0, mask=mask_c)
        tl.store(ps_ptr + out, s0, mask=mask_c)
        if K > 1:
            tl.store(psx_ptr + out + C, sx1, mask=mask_c)
            tl.store(ps_ptr + out + C, s1, mask=mask_c)
        if K > 2:
            tl.store(psx_ptr + out + 2 * C, sx2, mask=mask_c)
            tl.store(ps_ptr + out + 2 * C, s2, mask=mask_c)


# ---------------------------------------------------------------------------------------------
# planning: shapes -> (grid, constexprs, num_warps); no tensors touched, so tests can enumerate
# ---------------------------------------------------------------------------------------------
def _p2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def layout_of(shape, strides) -> Optional[int]:
    """_NCHW, _CL or None (needs a copy) for an (N, C, L) view."""
    n, c, l = shape
    s0, s1, s2 = strides
    rows_ok = n == 1 or s0 == c * l
    if l > 1 and s2 == 1 and (c == 1 or s1 == l) and rows_ok:
        return _NCHW
    if (c == 1 or s1 == 1) and (l == 1 or s2 == c) and rows_ok:
        return _CL
    return None


def _vec(row: int, itemsize: int) -> int:
    """The vector-width hint: 16 bytes of elements when the row length allows it, else 1.

    Only these two values, so each dtype and tile class has two configurations, not five.
    """
    v = max(1, 16 // itemsize)
    return v if row % v == 0 else 1


def tiles(c: int, l: int, layout: int, itemsize: int, warps: int = 8, backward: bool = False):
    """(BLOCK_C, BLOCK_L, num_warps): one of two tile classes per layout, long along unit stride.

    NCHW: 64 along L for L <= 64 (7x7, 8x6 maps: 49 and 48), else 256 (14x14 and up);
    channels_last and (N, C) inputs: 16 along C for C < 64 (the wide early maps of the thin
    MobileNets, C = 8..48), else 64 (C = 64..2048). The other side fills the tile to TILE_ELEMS
    (half for 8-byte dtypes). Tiles are not clipped to the tensor: masked lanes cost little next
    to one more compiled configuration (see tests/test_triton_aot.py).

    8 warps for the apply kernels. Forward: 8 elements per thread (one 16-byte load per tensor
    for bf16); with 16, ptxas on sm_90 capped some configurations at 64-72 registers and spilled.
    Backward: half the tile, 4 elements per thread. Its per-channel state (K coefficient pairs
    hoisted out of the L loop, 2K running sums) is held once per channel a thread covers, and a
    16-byte channels_last vector covers 8 channels: at 8 elements per thread it took 204-255
    registers (one block per SM), at 4 it takes <= 128 (tests/test_triton_aot.py prints them).
    The pool keeps one accumulator: 4 warps.
    """
    elems = TILE_ELEMS // (2 if itemsize > 4 else 1) // (2 if backward else 1)
    if layout == _NCHW:
        bl = 64 if l <= 64 else 256
        bc = max(1, elems // bl)
    else:
        bc = 16 if c < 64 else 64
        bl = max(1, elems // bc)
    return bc, bl, warps


def _split(n: int, c_blocks: int, l: int, bl: int):
    """(split, L_PER): L-splits so that N x C-blocks x split reaches TARGET_PROGRAMS; shape only."""
    split = max(1, min(_cdiv(l, bl), _cdiv(TARGET_PROGRAMS, n * c_blocks)))
    l_per = _cdiv(_cdiv(l, split), bl) * bl
    return _cdiv(l, l_per), l_per


class Plan(NamedTuple):
    kernel: str  # attribute name of the jit function in this module
    grid: tuple
    ints: dict  # the unspecialised integer arguments
    meta: dict  # constexprs
    num_warps: int
    split: int  # number of partial-sum slots (pool / backward)

    def key(self, dtypes) -> tuple:
        return (self.kernel, tuple(str(d) for d in dtypes), tuple(sorted((k, str(v)) for k, v in self.meta.items())),
                self.num_warps)


_ARG_DTYPES = ("_pool_kernel", "_apply_fwd_kernel", "_apply_bwd_kernel")


def arg_dtypes(kernel: str, dtype: torch.dtype) -> tuple:
    """The dtypes of a kernel's tensor arguments for inputs of ``dtype`` (the launches' contract)."""
    acc = acc_dtype(dtype)
    return {
        "_pool_kernel": (dtype, acc),
        "_apply_fwd_kernel": (dtype, dtype, acc, acc, acc),
        "_apply_bwd_kernel": (dtype, dtype, dtype, acc, acc, acc, acc, acc, acc),
    }[kernel]


def _acc_name(dtype: torch.dtype) -> str:
    return "float64" if dtype == torch.float64 else "float32"


def _meta(layout, row, itemsize, bc, bl, dtype):
    return dict(CL=layout == _CL, VEC=_vec(row, itemsize), BLOCK_C=bc, BLOCK_L=bl, ACC=_acc_name(dtype))


@functools.lru_cache(maxsize=4096)  # pure; saves Python time per launch
def plan_pool(shape, layout: int, dtype: torch.dtype) -> Plan:
    n, c, l = shape
    itemsize = dtype.itemsize
    bc, bl, warps = tiles(c, l, layout, itemsize, warps=4)
    c_blocks = _cdiv(c, bc)
    split, l_per = _split(n, c_blocks, l, bl)
    row = c if layout == _CL else l
    return Plan("_pool_kernel", (c_blocks * n * split,), dict(N=n, C=c, L=l, L_PER=l_per, C_BLOCKS=c_blocks),
                _meta(layout, row, itemsize, bc, bl, dtype), warps, split)


@functools.lru_cache(maxsize=4096)  # pure; saves Python time per launch
def plan_forward(shape, layout: int, dtype: torch.dtype, k: int, has_pi: bool) -> Plan:
    n, c, l = shape
    itemsize = dtype.itemsize
    bc, bl, warps = tiles(c, l, layout, itemsize)
    c_blocks, l_blocks = _cdiv(c, bc), _cdiv(l, bl)
    row = c if layout == _CL else l
    meta = dict(HAS_PI=has_pi, **_meta(layout, row, itemsize, bc, bl, dtype))
    return Plan("_apply_fwd_kernel", (n * c_blocks * l_blocks,),
                dict(N=n, C=c, L=l, K=k, C_BLOCKS=c_blocks, L_BLOCKS=l_blocks), meta, warps, 1)


@functools.lru_cache(maxsize=4096)  # pure; saves Python time per launch
def plan_backward(shape, layout: int, dtype: torch.dtype, k: int, has_pi: bool) -> Plan:
    n, c, l = shape
    itemsize = dtype.itemsize
    bc, bl, warps = tiles(c, l, layout, itemsize, backward=True)
    c_blocks = _cdiv(c, bc)
    split, l_per = _split(n, c_blocks, l, bl)
    row = c if layout == _CL else l
    meta = dict(HAS_PI=has_pi, **_meta(layout, row, itemsize, bc, bl, dtype))
    return Plan("_apply_bwd_kernel", (c_blocks * n * split,),
                dict(N=n, C=c, L=l, K=k, L_PER=l_per, C_BLOCKS=c_blocks), meta, warps, split)


# ---------------------------------------------------------------------------------------------
# launching: device guard, and a guarded first launch per configuration
# ---------------------------------------------------------------------------------------------
_OK: set = set()
MAX_REGISTERS = 128  # per thread, apply kernels: 2 blocks of 8 warps per SM


@functools.lru_cache(maxsize=None)
def _has_maxnreg() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions

        return "maxnreg" in CUDAOptions.__dataclass_fields__
    except Exception:  # pragma: no cover - other Triton builds
        return False


def launch_options(plan: Plan) -> dict:
    """Compile options of a launch (the AOT test compiles with the same).

    The apply kernels get ``maxnreg``: without it ptxas 13 sometimes settled on 64 registers and
    spilled (fp32 backward on sm_80), and the backward's worst class took 150 (fewer resident
    blocks); capped at 128 both compile without spills.
    """
    opts = {"num_warps": plan.num_warps}
    if plan.kernel in ("_apply_fwd_kernel", "_apply_bwd_kernel") and _has_maxnreg():
        opts["maxnreg"] = MAX_REGISTERS
    return opts


_STATE = threading.local()


@contextlib.contextmanager
def traced():
    """Launches inside are traced (``wrap_triton``), not run: ops.py enters this where torch.compile,
    export's decompositions or AOTInductor trace an op's body into the graph."""
    before = tracing()
    _STATE.tracing = True
    try:
        yield
    finally:
        _STATE.tracing = before


def tracing() -> bool:
    return getattr(_STATE, "tracing", False)


def recording():
    """The list launches are appended to instead of run (``record_launches``), or None."""
    return getattr(_STATE, "record", None)


@contextlib.contextmanager
def record_launches():
    """Launches inside are counted, not run: each appends (kernel name, its configuration: the
    constexprs, num_warps and the tensor arguments' dtypes) to the yielded list. scripts/count_ops.py
    runs a step on fake CUDA tensors under this (no GPU, no driver)."""
    before = recording()
    _STATE.record = names = []
    try:
        yield names
    finally:
        _STATE.record = before


def launcher(fn, grid):
    """``fn[grid]``; while tracing, its ``torch.library.wrap_triton`` twin, which records the launch as
    a graph node (a user-defined Triton kernel that Inductor calls from the compiled code); while
    recording, a stand-in that notes the kernel's name."""
    if tracing():
        return torch.library.wrap_triton(fn)[grid]
    names = recording()
    if names is not None:
        return lambda *args, **kwargs: names.append((fn.__name__, tuple(sorted(
            (k, str(v)) for k, v in kwargs.items())) + tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))))
    return fn[grid]


# kernel name -> jit function, for the kernels of the other Triton modules (_triton_bn, _triton_site),
# which launch through ``_launch`` too: one guarded first launch and one failure latch for all
KERNELS: dict = {}


def device_guard(device: torch.device):
    """Launch on the tensor's GPU, not the current one (a model on cuda:1 without set_device)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _launch(plan: Plan, device: torch.device, tensors: tuple, args: tuple = ()) -> bool:
    """Runs the plan; False when this configuration has failed (the caller uses another kernel).

    The one failure latch of every Triton kernel here (_triton_bn and _triton_site launch through
    it too). The first launch of each configuration (kernel, dtypes, constexprs, warps, device) is
    guarded: a compile or launch error gives one loud warning (``warnings`` and the ``dyrelu`` logger's
    error) naming the kernel, the configuration and the error, and marks the configuration failed for
    the rest of the process. Later launches are not wrapped (cost nothing extra). Under
    DYRELU_FUSED_BACKEND=triton the error propagates. While tracing (compile, export's decompositions)
    nothing is latched: an error there fails the trace, loudly, instead of switching kernels behind
    the compiled code's back. ``args``: non-tensor arguments after the integers (floats).
    """
    # the input dtype fixes every tensor's dtype (arg_dtypes, checked below on the first launch)
    first = tensors[1 if plan.kernel == "_apply_bwd_kernel" else 0]
    key = (plan.kernel, tuple(plan.meta.items()), plan.num_warps, first.dtype, device)
    meta = dict(plan.meta)
    if "ACC" in meta:
        meta["ACC"] = getattr(tl, meta["ACC"])
    fn = KERNELS.get(plan.kernel) or globals()[plan.kernel]
    if _latch.failed(key):
        return False

    def launch():  # the kernel, or while tracing its graph node
        launcher(fn, plan.grid)(*tensors, *plan.ints.values(), *args, **meta, **launch_options(plan))

    if tracing() or recording() is not None:  # run later by the compiled code / counted: nothing to guard
        launch()
        return True
    if key in _OK:
        with device_guard(device):
            launch()
        return True
    if plan.kernel in _ARG_DTYPES:
        expected = arg_dtypes(plan.kernel, first.dtype)
        if tuple(t.dtype for t in tensors) != expected:  # the AOT test compiles `expected`: keep them equal
            raise AssertionError(f"{plan.kernel}: tensor dtypes {[t.dtype for t in tensors]} != {expected}")
    try:
        with device_guard(device):
            launch()
    except Exception as err:
        if strict():
            raise
        _latch.fail(key, f"Triton kernel {plan.kernel} {plan.meta} num_warps={plan.num_warps} on {device}", err,
                    "this configuration uses slower fallback kernels from now on "
                    "(set DYRELU_FUSED_BACKEND=triton to raise instead)")
        return False
    _OK.add(key)
    return True


def _prepare(x3: torch.Tensor):
    """(x3 in a kernel layout, layout): unsupported strides are copied to NCHW once."""
    layout = layout_of(tuple(x3.shape), x3.stride())
    if layout is None:
        x3 = x3.contiguous()
        layout = layout_of(tuple(x3.shape), x3.stride())
    return x3, layout


def _like(t: torch.Tensor, x3: torch.Tensor, layout: int) -> torch.Tensor:
    """``t`` (same shape as x3) in x3's layout: the kernels index g and x with the same offsets."""
    if layout_of(tuple(t.shape), t.stride()) == layout:
        return t
    if layout == _NCHW:
        return t.contiguous()
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _coefs(a: torch.Tensor, b: Optional[torch.Tensor], c: int, acc: torch.dtype):
    a = a.to(acc).expand(-1, -1, c).contiguous()
    b = torch.zeros_like(a) if b is None else b.to(acc).expand(-1, -1, c).contiguous()
    return a, b


def pool(x3: torch.Tensor) -> Optional[torch.Tensor]:
    """Mean over L of an (N, C, L) view in the accumulation dtype, or None (fell back)."""
    x3, layout = _prepare(x3)
    plan = plan_pool(tuple(x3.shape), layout, x3.dtype)
    n, c, _ = x3.shape
    part = torch.empty(plan.split, n, c, device=x3.device, dtype=acc_dtype(x3.dtype))
    if not _launch(plan, x3.device, (x3, part)):
        return None
    return part[0] if plan.split == 1 else part.sum(0)


def apply_forward(x3, a, b, pi) -> Optional[torch.Tensor]:
    """y3 (x3's layout), or None when K is beyond MAX_K or this configuration fell back."""
    k = a.shape[1]
    if k > MAX_K:
        return None
    x3, layout = _prepare(x3)
    n, c, _ = x3.shape
    plan = plan_forward(tuple(x3.shape), layout, x3.dtype, k, pi is not None)
    af, bf = _coefs(a, b, c, acc_dtype(x3.dtype))
    y3 = torch.empty_strided(x3.shape, x3.stride(), dtype=x3.dtype, device=x3.device)
    pi = af if pi is None else pi.to(af.dtype)  # pi in the accumulation dtype: one config per x dtype
    if not _launch(plan, x3.device, (x3, y3, af, bf, pi)):
        return None
    return y3


def apply_backward(g3, x3, a, b, pi, need_pi: bool, raw: bool = False):
    """(grad_x, sum_gx, sum_g, grad_pi) with (N, K, C) sums and (N, 1, L) grad_pi, or None.

    raw: the per-split partial sums (split, N, K, C) are returned unsummed (the site kernels of
    _triton_site add them while they read them: no launch for the sum)."""
    k = a.shape[1]
    if k > MAX_K:
        return None
    x3, layout = _prepare(x3)
    g3 = _like(g3, x3, layout)
    n, c, l = x3.shape
    acc = acc_dtype(x3.dtype)
    plan = plan_backward(tuple(x3.shape), layout, x3.dtype, k, pi is not None)
    af, bf = _coefs(a, b, c, acc)
    gx3 = torch.empty_strided(x3.shape, x3.stride(), dtype=x3.dtype, device=x3.device)
    psx = torch.empty(plan.split, n, k, c, device=x3.device, dtype=acc)
    ps = torch.empty_like(psx)
    ppi = psx if pi is None else torch.empty(plan.ints["C_BLOCKS"], n, 1, l, device=x3.device, dtype=acc)
    pi = af if pi is None else pi.to(acc)
    if not _launch(plan, x3.device, (g3, x3, gx3, af, bf, pi, psx, ps, ppi)):
        return None
    if raw:
        return gx3, psx, ps, None if (ppi is psx or not need_pi) else ppi
    sum_gx = psx[0] if plan.split == 1 else psx.sum(0)
    sum_g = ps[0] if plan.split == 1 else ps.sum(0)
    gpi = None
    if ppi is not psx and need_pi:
        gpi = ppi[0] if ppi.shape[0] == 1 else ppi.sum(0)
    return gx3, sum_gx, sum_g, gpi

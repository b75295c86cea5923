"""The CPU kernels of ``_cpu_kernels.c``: built with the system C compiler at first use, called
through ctypes on NCHW-contiguous float32 / float64 tensors.

Why C: in eager mode the K = 2 apply costs five full-size memory streams with ATen ops (two
affine passes and a max) where one read and one write do, and its backward about ten where two
do. The kernels are plain loops (gcc vectorises them) parallel over rows with OpenMP; the
extension links the ``libgomp.so.1`` torch has already loaded, so they share torch's threads and
follow ``torch.set_num_threads``.

Build: ``$CC`` (default ``gcc``) ``-O3 -fopenmp -ffp-contract=off`` for the architecture's
generic target (``-march=x86-64 -mtune=generic`` on x86-64, ``-march=armv8-a`` on 64-bit Arm),
never ``-march=native``: the ``omp simd`` reductions are summed in vector-width lanes, so a build
for the host's widest vectors (AVX-512 on one machine, AVX2 on another) rounds differently and the
same seed trained to a different top-1 on another CPU (issue 20). The baseline target gives every
CPU of an architecture the same library and the same numbers. Into ``$DYRELU_NATIVE_CACHE``
(default ``~/.cache/dyrelu/native``), keyed by the source, the compiler, the flags and the
architecture; written to a temporary name and renamed, so concurrent ranks are safe; into the temp directory when the cache directory cannot be written. When there is no
compiler or the build fails, ``library()`` returns None, one warning says why, and the ATen
kernels (the ``bn`` backend) run instead. ``DYRELU_NATIVE=0`` turns the kernels off.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import warnings
from typing import Optional

import torch

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_cpu_kernels.c")
# The generic target of each architecture (GCC's names); elsewhere the compiler's default.
GENERIC_TARGET = {"x86_64": ["-march=x86-64", "-mtune=generic"], "amd64": ["-march=x86-64", "-mtune=generic"],
                  "aarch64": ["-march=armv8-a"], "arm64": ["-march=armv8-a"]}


def _machine() -> str:
    import platform

    return platform.machine().lower()


FLAGS = ["-O3", *GENERIC_TARGET.get(_machine(), []), "-fopenmp", "-ffp-contract=off", "-fPIC", "-shared", "-std=c99"]
LIBS = ["-lm"]
DTYPES = {torch.float32: "f32", torch.float64: "f64"}
MAX_K = 3

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded library, or "error": why not


def _cache_dir() -> str:
    base = os.environ.get("DYRELU_NATIVE_CACHE")
    if not base:
        root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(root, "dyrelu", "native")
    return base


def build_command(cc: str, out: str) -> list:
    return [cc, *FLAGS, SOURCE, "-o", out, *LIBS]


def _compile(cc: str, path: str) -> None:
    """Builds the library at ``path`` under a temporary name, then renames it (atomic)."""
    out_dir = os.path.dirname(path)
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    try:
        proc = subprocess.run(build_command(cc, tmp), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> ctypes.CDLL:
    cc = os.environ.get("CC", "gcc")
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler ({cc!r} not found)")
    with open(SOURCE, "rb") as f:
        src = f.read()
    key = hashlib.sha256(src + " ".join([cc, *FLAGS, *LIBS, _machine()]).encode()).hexdigest()[:20]
    name = f"dyrelu_cpu_{key}.so"
    path = os.path.join(_cache_dir(), name)
    if not os.path.exists(path):
        try:
            _compile(cc, path)
        except OSError:  # a read-only or full cache directory: build into the temp directory
            path = os.path.join(tempfile.gettempdir(), f"dyrelu-native-{os.getuid()}", name)
            if not os.path.exists(path):
                _compile(cc, path)
    lib = ctypes.CDLL(path)
    p, i = ctypes.c_void_p, ctypes.c_int64
    for suf in DTYPES.values():
        getattr(lib, f"dyrelu_fwd_{suf}").argtypes = [p] * 5 + [i] * 6
        getattr(lib, f"dyrelu_bwd_{suf}").argtypes = [p] * 7 + [i] * 6
        getattr(lib, f"dyrelu_bwd_pi_{suf}").argtypes = [p] * 9 + [i] * 7
        getattr(lib, f"row_moments_{suf}").argtypes = [p] * 3 + [i] * 3
        getattr(lib, f"dyrelu_site_{suf}").argtypes = [p] * 8 + [i] * 7
        getattr(lib, f"spatial_fwd_{suf}").argtypes = [p] * 4 + [i] * 5
        getattr(lib, f"spatial_bwd_{suf}").argtypes = [p] * 5 + [i] * 4
        getattr(lib, f"spatial_fwd_{suf}").restype = None
        getattr(lib, f"spatial_bwd_{suf}").restype = None
        for name in ("dyrelu_fwd", "dyrelu_bwd", "dyrelu_bwd_pi", "row_moments"):
            getattr(lib, f"{name}_{suf}").restype = None
        getattr(lib, f"dyrelu_site_{suf}").restype = ctypes.c_int
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, or None (no compiler, build failed, or DYRELU_NATIVE=0)."""
    if os.environ.get("DYRELU_NATIVE", "1") == "0":
        return None
    lib = _state.get("lib")
    if lib is not None or "error" in _state:
        return lib
    with _lock:
        if "lib" not in _state and "error" not in _state:
            try:
                _state["lib"] = _build()
            except Exception as err:  # no compiler, no OpenMP, read-only cache: the ATen kernels run
                _state["error"] = repr(err)
                warnings.warn(f"dyrelu: the native CPU kernels are not available ({err}); "
                              "using the slower ATen kernels", RuntimeWarning, stacklevel=3)
    return _state.get("lib")


def error() -> Optional[str]:
    """Why the kernels are unavailable (switched off, or a failed build), else None."""
    if os.environ.get("DYRELU_NATIVE", "1") == "0":
        return "switched off by DYRELU_NATIVE=0"
    return _state.get("error")


def ok(x3: torch.Tensor, k: int) -> bool:
    """The kernels apply: an NC-contiguous (N, C, L) CPU float32 / float64 view, K <= 3."""
    return (x3.device.type == "cpu" and x3.dtype in DTYPES and k <= MAX_K and x3.is_contiguous()
            and library() is not None)


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def _threads() -> int:
    return torch.get_num_threads()


def _chunks(n: int, length: int) -> int:
    """Position chunks per sample for the (sample, chunk) kernels: enough tasks for every thread,
    at least 512 positions per chunk."""
    return max(1, min(-(-length // 512), -(-2 * _threads() // n)))


def forward(x3, a, b, pi, out=None):
    """max_k(a_k x + b_k) [* pi] on (N, C, L); a, b (N, K, W) contiguous in x's dtype; pi (N, L)."""
    n, c, l = x3.shape
    y = torch.empty_like(x3) if out is None else out
    getattr(_state["lib"], f"dyrelu_fwd_{DTYPES[x3.dtype]}")(
        x3.data_ptr(), y.data_ptr(), a.data_ptr(), _ptr(b), _ptr(pi), n, c, l, a.shape[1], a.shape[2], _threads())
    return y


def backward(g3, x3, a, b, pi, need_pi: bool):
    """grad_x (N, C, L), sum_gx and sum_g (N, K, C), grad_pi (N, 1, L) or None; one pass."""
    n, c, l = x3.shape
    k, w = a.shape[1], a.shape[2]
    gx = torch.empty_like(x3)
    suf = DTYPES[x3.dtype]
    lib = _state["lib"]
    if pi is None:
        s_gx = x3.new_empty(n, k, c)
        s_g = x3.new_empty(n, k, c)
        getattr(lib, f"dyrelu_bwd_{suf}")(g3.data_ptr(), x3.data_ptr(), gx.data_ptr(), a.data_ptr(), _ptr(b),
                                          s_gx.data_ptr(), s_g.data_ptr(), n, c, l, k, w, _threads())
        return gx, s_gx, s_g, None
    chunks = _chunks(n, l)
    part_gx = x3.new_empty(chunks, n, k, c)
    part_g = x3.new_empty(chunks, n, k, c)
    grad_pi = x3.new_empty(n, 1, l)
    getattr(lib, f"dyrelu_bwd_pi_{suf}")(g3.data_ptr(), x3.data_ptr(), gx.data_ptr(), a.data_ptr(), _ptr(b),
                                         pi.data_ptr(), grad_pi.data_ptr(), part_gx.data_ptr(), part_g.data_ptr(),
                                         n, c, l, k, w, chunks, _threads())
    s_gx = part_gx[0] if chunks == 1 else part_gx.sum(0)
    s_g = part_g[0] if chunks == 1 else part_g.sum(0)
    return gx, s_gx, s_g, grad_pi if need_pi else None


def row_moments(x3):
    """Per-(n, c) mean and biased variance over L, both (N, C) in x's dtype."""
    n, c, l = x3.shape
    m = x3.new_empty(n, c)
    v = x3.new_empty(n, c)
    getattr(_state["lib"], f"row_moments_{DTYPES[x3.dtype]}")(x3.data_ptr(), m.data_ptr(), v.data_ptr(),
                                                              n * c, l, _threads())
    return m, v


def site(x3, w1, b1, w2, b2, offset, scale, k: int, width: int, out=None):
    """A whole inference-mode DY-ReLU (A or B, intercepts, all segments dynamic) in one call:
    pool, FC1, ReLU, FC2, ``coef = offset + scale * sigmoid``, apply. All tensors contiguous in
    x's dtype; W1 (H, C), W2 (2 K W, H). ``out=x3`` writes over the input."""
    n, c, l = x3.shape
    y = torch.empty_like(x3) if out is None else out
    rc = getattr(_state["lib"], f"dyrelu_site_{DTYPES[x3.dtype]}")(
        x3.data_ptr(), y.data_ptr(), w1.data_ptr(), b1.data_ptr(), w2.data_ptr(), b2.data_ptr(),
        offset.data_ptr(), scale.data_ptr(), n, c, l, w1.shape[0], k, width, _threads())
    if rc != 0:
        raise MemoryError("dyrelu native site kernel: out of memory for its scratch buffers")
    return y


def spatial_forward(x3, w, bias):
    """Variant C's logits z = sum_c w_c x + bias: (N, C, L) -> (N, L); w (C,), bias (1,) in x's dtype."""
    n, c, l = x3.shape
    z = x3.new_empty(n, l)
    getattr(_state["lib"], f"spatial_fwd_{DTYPES[x3.dtype]}")(
        x3.data_ptr(), w.data_ptr(), bias.data_ptr(), z.data_ptr(), n, c, l, _chunks(n, l), _threads())
    return z


def spatial_backward(x3, w, gz):
    """(grad_x = w_c gz (N, C, L), grad_w = sum over n and l of gz x (C,)); gz (N, L) contiguous."""
    n, c, l = x3.shape
    gx = torch.empty_like(x3)
    part = x3.new_empty(n, c)
    getattr(_state["lib"], f"spatial_bwd_{DTYPES[x3.dtype]}")(
        x3.data_ptr(), w.data_ptr(), gz.data_ptr(), gx.data_ptr(), part.data_ptr(), n, c, l, _threads())
    return gx, part.sum(0)

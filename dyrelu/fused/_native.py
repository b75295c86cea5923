"""The CPU kernels of ``_cpu_kernels.c`` as real PyTorch operators (``torch.ops.dyrelu_cpu.*``,
declared in ``_cpu_ops.cpp``), built by ``torch.utils.cpp_extension`` at first use, for NC-contiguous
float32 / float64 tensors.

Why C: in eager mode the K = 2 apply costs five full-size memory streams with ATen ops (two
affine passes and a max) where one read and one write do, and its backward about ten where two
do. The kernels are plain loops (gcc vectorises them) parallel over rows with OpenMP; the
extension links the ``libgomp.so.1`` torch has already loaded, so they share torch's threads and
follow ``torch.set_num_threads``. As registered operators they have schemas and fake (meta)
implementations (below), so ``torch.library.opcheck`` tests them, and they can be called from
C++ and from an AOTInductor package, not only from Python.

Build: the C++ compiler (``$CXX``, default ``c++``) through ninja, ``-O3 -fopenmp
-ffp-contract=off`` for the architecture's generic target (``-march=x86-64 -mtune=generic`` on
x86-64, ``-march=armv8-a`` on 64-bit Arm), never ``-march=native``: the old kernels' ``omp simd``
sums had the vector width of their target, so a build for the host's widest vectors rounded
differently and the same seed trained to a different top-1 on another CPU (issue 20). The file is
also compiled for AVX2 and AVX-512 (x86-64-v3 / v4, by ``#pragma GCC target``) and the operators run
the best level the CPU has (``torch.ops.dyrelu_cpu.isa_level()``); every sum keeps 8 lanes in a fixed
order, so every level computes the same bits (``_cpu_kernels.c``: LANES). Into
``$DYRELU_NATIVE_CACHE`` (default ``native`` under ``$DYRELU_CACHE``, else ``~/.cache/dyrelu``), one
folder per key of the sources and their path, the flags, the architecture and torch's version;
cpp_extension locks the folder, so concurrent ranks build once; into the temp directory when the
cache directory cannot be written. The first build takes about 16 s (logged at INFO by
``dyrelu.native``); loading a built library about 0.2 s.
When there is no compiler or ninja, or the build fails, ``library()`` returns None, one warning says
why, and the ATen kernels (the ``bn`` backend) run instead. ``DYRELU_NATIVE=0`` turns the kernels off.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from typing import Optional

import torch

from . import _latch

_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(_HERE, "_cpu_kernels.c")  # the kernels (C, included by the operator file)
OPS_SOURCE = os.path.join(_HERE, "_cpu_ops.cpp")  # their registration as torch operators
# The generic target of each architecture (GCC's names); elsewhere the compiler's default.
GENERIC_TARGET = {"x86_64": ["-march=x86-64", "-mtune=generic"], "amd64": ["-march=x86-64", "-mtune=generic"],
                  "aarch64": ["-march=armv8-a"], "arm64": ["-march=armv8-a"]}


def _machine() -> str:
    import platform

    return platform.machine().lower()


FLAGS = ["-O3", *GENERIC_TARGET.get(_machine(), []), "-fopenmp", "-ffp-contract=off"]
LDFLAGS = ["-fopenmp"]
DTYPES = {torch.float32: "f32", torch.float64: "f64"}
MAX_K = 3

_lock = threading.Lock()
_state: dict = {}  # "lib": the operator namespace, or "error": why not


def _cache_dir() -> str:
    """$DYRELU_NATIVE_CACHE, else ``native`` under the project's cache ($DYRELU_CACHE, default
    ~/.cache/dyrelu, where the demo data goes too)."""
    base = os.environ.get("DYRELU_NATIVE_CACHE")
    if base:
        return base
    root = os.environ.get("DYRELU_CACHE")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "dyrelu")
    return os.path.join(root, "native")


def build_key() -> str:
    """Names the build: a change of source, flags, architecture or torch gives a new library, and so
    does another checkout (ninja's build file holds the source's absolute path: two checkouts sharing
    one folder would rebuild each other's library at every switch)."""
    h = hashlib.sha256(OPS_SOURCE.encode())
    for path in (SOURCE, OPS_SOURCE):
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(" ".join([os.environ.get("CXX", "c++"), *FLAGS, *LDFLAGS, _machine(), torch.__version__]).encode())
    return h.hexdigest()[:20]


def _find_ninja() -> None:
    """cpp_extension runs ``ninja``; the PyPI package puts it beside the interpreter, which a
    non-activated venv does not have on PATH."""
    if shutil.which("ninja"):
        return
    try:
        import ninja  # noqa: F401  (the PyPI wheel)

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    except ImportError:
        pass
    if not shutil.which("ninja"):
        raise RuntimeError("ninja not found (pip install ninja)")


def _load(build_dir: str, name: str) -> None:
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on CPU hosts
    from torch.utils import cpp_extension

    os.makedirs(build_dir, exist_ok=True)
    if not any(f.endswith(".so") for f in os.listdir(build_dir)):
        logging.getLogger("dyrelu.native").info("building the native CPU kernels into %s (once, about 16 s)", build_dir)
    cpp_extension.load(name=name, sources=[OPS_SOURCE], extra_cflags=FLAGS, extra_ldflags=LDFLAGS,
                       build_directory=build_dir, is_python_module=False, verbose=False)


def _loaded() -> bool:
    """The operators are registered in this process (a namespace registers once per process)."""
    return hasattr(torch.ops.dyrelu_cpu, "forward")


def _build():
    """Builds (or finds) and loads the operator library; returns ``torch.ops.dyrelu_cpu``."""
    if _loaded():
        _register_fakes()
        return torch.ops.dyrelu_cpu
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler ({cxx!r} not found)")
    _find_ninja()
    key = build_key()
    name = f"dyrelu_cpu_{key}"
    try:
        _load(os.path.join(_cache_dir(), key), name)
    except OSError:  # a read-only or full cache directory: build into the temp directory
        _load(os.path.join(tempfile.gettempdir(), f"dyrelu-native-{os.getuid()}", key), name)
    _register_fakes()
    return torch.ops.dyrelu_cpu


def _short(err: Exception) -> str:
    """The last line of a compiler's error: enough to say why, short enough for one warning."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"


def library():
    """The operators (``torch.ops.dyrelu_cpu``), or None (no compiler, build failed, or DYRELU_NATIVE=0)."""
    if os.environ.get("DYRELU_NATIVE", "1") == "0":
        return None
    lib = _state.get("lib")
    if lib is not None or "error" in _state:
        return lib
    with _lock:
        if "lib" not in _state and "error" not in _state:
            try:
                _state["lib"] = _build()
            except Exception as err:  # no compiler or ninja, read-only cache: the ATen kernels run
                _state["error"] = _short(err)
                _latch.fail(("native", "library"), "building the native CPU kernels", RuntimeError(_state["error"]),
                            "the slower ATen kernels run instead")
    return _state.get("lib")


def error() -> Optional[str]:
    """Why the kernels are unavailable (switched off, or a failed build), else None."""
    if os.environ.get("DYRELU_NATIVE", "1") == "0":
        return "switched off by DYRELU_NATIVE=0"
    return _state.get("error")


_FAKES_DONE: list = []


def _register_fakes() -> None:
    """Fake (meta) implementations: shapes only, so torch.compile, export and opcheck can trace."""
    if _FAKES_DONE:
        return
    _FAKES_DONE.append(True)
    reg = torch.library.register_fake

    @reg("dyrelu_cpu::forward")
    def _(x, a, b, pi):
        return torch.empty_like(x)

    @reg("dyrelu_cpu::forward_")
    def _(x, a, b, pi):
        return x

    @reg("dyrelu_cpu::backward")
    def _(g, x, a, b, pi, need_pi):
        n, c, l = x.shape
        k = a.shape[1]
        return (torch.empty_like(x), x.new_empty(n, k, c), x.new_empty(n, k, c),
                x.new_empty(n, 1, l) if (pi is not None and need_pi) else x.new_empty(0))

    @reg("dyrelu_cpu::row_moments")
    def _(x):
        return x.new_empty(x.shape[:2]), x.new_empty(x.shape[:2])

    @reg("dyrelu_cpu::moments")
    def _(x):
        return x.new_empty(x.shape[:2]), x.new_empty(x.shape[1]), x.new_empty(x.shape[1])

    @reg("dyrelu_cpu::moments_backward")
    def _(x, mu, g_m, g_var):
        return torch.empty_like(x)

    @reg("dyrelu_cpu::site")
    def _(x, w1, b1, w2, b2, offset, scale, k, width):
        return torch.empty_like(x)

    @reg("dyrelu_cpu::site_")
    def _(x, w1, b1, w2, b2, offset, scale, k, width):
        return x

    @reg("dyrelu_cpu::spatial")
    def _(x, w, bias):
        return x.new_empty(x.shape[0], x.shape[2])

    @reg("dyrelu_cpu::spatial_backward")
    def _(x, w, gz):
        return torch.empty_like(x), x.new_empty(x.shape[1])

    def param_grads(ref, weight, bias, w1, w2):  # grad weight, bias (empty where absent), w1, b1, w2, b2
        return (ref.new_empty(0) if weight is None else torch.empty_like(weight),
                ref.new_empty(0) if bias is None else torch.empty_like(bias), torch.empty_like(w1),
                w1.new_empty(w1.shape[0]), torch.empty_like(w2), w2.new_empty(w2.shape[0]))

    def state(m, w1, w2, k, width):  # bn_state's list: r, t, ph, h_pre, h, sig, a
        n, c = m.shape
        cdt = torch.float64 if m.dtype == torch.float64 else torch.float32
        return [m.new_empty(c, dtype=cdt), m.new_empty(c, dtype=cdt), m.new_empty((n, c), dtype=w1.dtype),
                m.new_empty((n, w1.shape[0]), dtype=w1.dtype), m.new_empty((n, w1.shape[0]), dtype=w1.dtype),
                m.new_empty((n, w2.shape[0]), dtype=torch.promote_types(w2.dtype, torch.float32)),
                m.new_empty((n, k, width), dtype=cdt)]

    @reg("dyrelu_cpu::bn_coefs")
    def _(m, mu, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, segments, width,
          use_bias):
        n, c, k = m.shape[0], m.shape[1], init_a.shape[0]
        cdt = torch.float64 if m.dtype == torch.float64 else torch.float32
        return m.new_empty((n, k, c), dtype=cdt), m.new_empty((n, k, c), dtype=cdt), state(m, w1, w2, k, width)

    @reg("dyrelu_cpu::bn_coefs_backward")
    def _(state_, g_big_a, g_big_b, m, mu, var, weight, bias, w1, w2, lambda_a, lambda_b, gs_extra, gt_extra,
          segments, width, use_bias):
        return (torch.empty_like(m), torch.empty_like(var), *param_grads(m, weight, bias, w1, w2))

    @reg("dyrelu_cpu::moments_backward_")
    def _(gx, x, mu, g_m, g_var):
        return gx

    @reg("dyrelu_cpu::site_coefs")
    def site_coefs(x, mean, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, spatial_w, segments,
          width, use_bias):
        n, c, k = x.shape[0], x.shape[1], init_a.shape[0]
        m = x.new_empty((n, c))
        stat = x.new_empty(c) if mean is None else x.new_empty(0)
        z = x.new_empty(0) if spatial_w is None else x.new_empty((n, x.shape[2]))
        return (x.new_empty((n, k, c)), x.new_empty((n, k, c)), z, m, stat, torch.empty_like(stat),
                state(m, w1, w2, k, width))

    @reg("dyrelu_cpu::site_coefs_backward")
    def _(g_big_a, g_big_b, gz, x, m, mu, var, batch, weight, bias, w1, w2, lambda_a, lambda_b, spatial_w, state_,
          segments, width, use_bias):
        with_z = gz is not None and spatial_w is not None
        return (torch.empty_like(x), *param_grads(x, weight, bias, w1, w2),
                torch.empty_like(spatial_w) if with_z else x.new_empty(0))

    @reg("dyrelu_cpu::bn_act")
    def _(x, mean, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b, lambda_a, lambda_b, segments, width,
          use_bias):
        big_a, big_b, _, *rest = site_coefs(x, mean, var, weight, bias, eps, w1, b1, w2, b2, init_a, init_b,
                                            lambda_a, lambda_b, None, segments, width, use_bias)
        return (torch.empty_like(x), big_a, big_b, *rest)

    @reg("dyrelu_cpu::bn_act_backward")
    def _(g, x, big_a, big_b, m, mu, var, batch, weight, bias, w1, w2, lambda_a, lambda_b, state_, segments, width,
          use_bias):
        return (torch.empty_like(x), *param_grads(x, weight, bias, w1, w2))


def ok(x3: torch.Tensor, k: int) -> bool:
    """The kernels apply: an NC-contiguous (N, C, L) CPU float32 / float64 view, K <= 3."""
    return (x3.device.type == "cpu" and x3.dtype in DTYPES and k <= MAX_K and x3.is_contiguous()
            and library() is not None)


def forward(x3, a, b, pi, inplace: bool = False):
    """max_k(a_k x + b_k) [* pi] on (N, C, L); a, b (N, K, W) contiguous in x's dtype; pi (N, L).
    ``inplace`` writes the result over x3."""
    ops = _state["lib"]
    return ops.forward_(x3, a, b, pi) if inplace else ops.forward(x3, a, b, pi)


def backward(g3, x3, a, b, pi, need_pi: bool):
    """grad_x (N, C, L), sum_gx and sum_g (N, K, C), grad_pi (N, 1, L) or None; one pass."""
    gx, s_gx, s_g, grad_pi = _state["lib"].backward(g3, x3, a, b, pi, bool(need_pi and pi is not None))
    return gx, s_gx, s_g, grad_pi if (need_pi and pi is not None) else None


def moments(x3):
    """ops.moments on (N, C, L): (m (N, C), var (C,), mu (C,)) in x's dtype."""
    return _state["lib"].moments(x3)


def moments_backward_(gx3, x3, mu, g_m, g_var):
    """ops.moments_backward on (N, C, L) added into gx3 in place (one pass)."""
    return _state["lib"].moments_backward_(gx3, x3, mu, g_m, g_var)


def moments_backward(x3, mu, g_m, g_var):
    """ops.moments_backward on (N, C, L): grad_x in one affine pass; mu, g_m, g_var in x's dtype."""
    return _state["lib"].moments_backward(x3, mu, g_m, g_var)


def site(x3, w1, b1, w2, b2, offset, scale, k: int, width: int, inplace: bool = False):
    """A whole inference-mode DY-ReLU (A or B, intercepts, all segments dynamic) in one call:
    pool, FC1, ReLU, FC2, ``coef = offset + scale * sigmoid``, apply. All tensors contiguous in
    x's dtype; W1 (H, C), W2 (2 K W, H). ``inplace`` writes over the input."""
    ops = _state["lib"]
    fn = ops.site_ if inplace else ops.site
    return fn(x3, w1, b1, w2, b2, offset, scale, k, width)


def spatial_forward(x3, w, bias):
    """Variant C's logits z = sum_c w_c x + bias: (N, C, L) -> (N, L); w (C,), bias (1,) in x's dtype."""
    return _state["lib"].spatial(x3, w, bias)


def spatial_backward(x3, w, gz):
    """(grad_x = w_c gz (N, C, L), grad_w = sum over n and l of gz x (C,)); gz (N, L) contiguous."""
    return _state["lib"].spatial_backward(x3, w, gz)


def coefs_ok(m: torch.Tensor, w1: torch.Tensor) -> bool:
    """The C++ coefficient math applies: CPU float32 / float64 statistics and weights, no autocast."""
    return (m.device.type == "cpu" and m.dtype in DTYPES and w1.dtype in DTYPES
            and not torch.is_autocast_enabled("cpu") and library() is not None)


def bn_coefs(*args):
    """ops._bn_coefs_math in C++: (A, B, state); the arguments of ``dyrelu_cpu::bn_coefs``."""
    return _state["lib"].bn_coefs(*args)


def bn_coefs_backward(*args):
    """ops._bn_coefs_backward in C++, from the forward's state: (grad m, var, weight, bias, w1, b1, w2, b2)."""
    return _state["lib"].bn_coefs_backward(*args)


def site_coefs(*args):
    """ops.bn_coefs on (N, C, L) in one C++ call: (A, B, z (N, L) or empty, m, batch mu, batch var, state)."""
    return _state["lib"].site_coefs(*args)


def site_coefs_backward(*args):
    """ops.bn_coefs_backward on (N, C, L) in one C++ call: (grad x, weight, bias, w1, b1, w2, b2, spatial_w)."""
    return _state["lib"].site_coefs_backward(*args)


def bn_act(*args):
    """ops.bn_act on (N, C, L) in one C++ call: (y, A, B, m, batch mu, batch var, state)."""
    return _state["lib"].bn_act(*args)


def bn_act_backward(*args):
    """ops.bn_act_backward on (N, C, L) in one C++ call: (grad x, weight, bias, w1, b1, w2, b2)."""
    return _state["lib"].bn_act_backward(*args)

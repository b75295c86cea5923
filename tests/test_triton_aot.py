"""Every Triton kernel configuration the fused path can launch compiles to a cubin for sm_80 and sm_90.

No GPU needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` runs the
whole pipeline (ttir, ttgir, llir, ptx, cubin through Triton's bundled ptxas) on the CPU. The
signature, constexprs and specialisation attributes come from the kernel's own JIT binder, so a
compiled configuration is exactly what a launch on a GPU would build (16-byte aligned pointers,
as from the CUDA caching allocator).

The configurations: ``_triton`` leaves every integer argument unspecialised, so a configuration is
(kernel, input dtype, constexprs, num_warps), and the planners only return a few (two tile classes
per layout, two vector widths, HAS_PI). ``test_configurations_cover_every_launch`` checks that the
planners' answers for the shipped networks' activation shapes and for random shapes all fall in
the enumerated set; ``test_aot_compile`` compiles the set (two worker processes; Triton's cache in
.cache/triton-aot makes a rerun fast) and fails on a compile error or on register spills, printing
registers per configuration (``pytest -s`` shows the table).
"""
from __future__ import annotations

import itertools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # also run as a worker script
    sys.path.insert(0, str(ROOT))

triton = pytest.importorskip("triton") if __name__ != "__main__" else __import__("triton")

from dyrelu.fused import _triton as T  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ARCHS = (80, 90)
# (C, L) pairs that reach every branch of the planners: both tile classes of both layouts (L <= 64
# or not, C < 64 or not), rows that are and are not a multiple of 16 bytes, (N, C) inputs (L = 1).
PROBE_C = (1, 7, 8, 12, 24, 64, 72, 77, 100, 1280)
PROBE_L = (1, 7, 48, 49, 192, 196, 12544, 12545)


def _plans(c, l, layout, dtype):
    shape = (2, c, l)
    yield T.plan_pool(shape, layout, dtype)
    for k, has_pi in itertools.product(range(1, T.MAX_K + 1), (False, True)):
        yield T.plan_forward(shape, layout, dtype, k, has_pi)
        yield T.plan_backward(shape, layout, dtype, k, has_pi)


def _launchable(c, l):
    """The layouts an (N, C, L) input can reach the kernels in (unsupported strides become NCHW)."""
    return [T._CL] if l == 1 else [T._NCHW, T._CL]


def configurations() -> dict:
    """{key: (plan, dtype)} over the probe shapes: the set test_aot_compile compiles."""
    out = {}
    for c, l, dtype in itertools.product(PROBE_C, PROBE_L, DTYPES):
        for layout in _launchable(c, l):
            for plan in _plans(c, l, layout, dtype):
                out.setdefault(plan.key(T.arg_dtypes(plan.kernel, dtype)), (plan, dtype))
    return out


def shipped_shapes() -> set:
    """(C, L) of every DyReLU input in the shipped networks: MobileNetV2 x0.35-x1.0 and ResNet-50
    at 224x224, the pose network at 256x192 (shapes only: built and run on the meta device)."""
    from dyrelu import DyReLU
    from models import build_model
    from models.pose import build_pose_model

    seen = set()

    def record(mod, args):
        x = args[0]
        seen.add((x.shape[1], x[0, 0].numel()))

    nets = [(lambda n=n: build_model(n, act="dyrelu_b"), (224, 224))
            for n in ("mbv2_035", "mbv2_050", "mbv2_075", "mbv2_100", "resnet50")]
    nets.append((lambda: build_pose_model("mbv2_050", act="dyrelu_c", head_act="dyrelu_c"), (256, 192)))
    for build, hw in nets:
        with torch.device("meta"):
            net = build()
            hooks = [m.register_forward_pre_hook(record) for m in net.modules() if isinstance(m, DyReLU)]
            net(torch.empty(1, 3, *hw))
        for h in hooks:
            h.remove()
    return seen


def test_configurations_cover_every_launch():
    universe = configurations()
    shapes = shipped_shapes()
    assert len(shapes) > 30 and any(l == 12544 for _, l in shapes)
    rng = random.Random(0)
    shapes |= {(rng.randint(1, 3000), rng.choice([1, rng.randint(1, 70000)])) for _ in range(300)}
    missing = set()
    for (c, l), dtype in itertools.product(shapes, DTYPES):
        for layout in _launchable(c, l):
            for plan in _plans(c, l, layout, dtype):
                key = plan.key(T.arg_dtypes(plan.kernel, dtype))
                if key not in universe:
                    missing.add((c, l, key))
                # every grid is one-dimensional: no 65535 limit on N (CUDA's grid axes 1 and 2)
                assert len(plan.grid) == 1 and plan.grid[0] < 2 ** 31
    assert not missing, sorted(missing)[:5]
    # the configuration count stays small enough to compile in CI
    assert len(universe) <= 200, len(universe)


def test_folded_grid_has_no_axis_limit():
    """A (N, C) input with 300000 rows: one grid axis, every (n, c-block) program counted once."""
    for layout, (n, c, l) in ((T._CL, (300_000, 64, 1)), (T._NCHW, (70_000, 16, 49))):
        fwd = T.plan_forward((n, c, l), layout, torch.float32, 2, False)
        assert fwd.grid == (n * fwd.ints["C_BLOCKS"] * fwd.ints["L_BLOCKS"],)
        bwd = T.plan_backward((n, c, l), layout, torch.float32, 2, False)
        assert bwd.grid == (n * bwd.ints["C_BLOCKS"] * bwd.split,) and bwd.grid[0] > 65535


# ------------------------------------------------------------------------------------------------
# compiling (worker side)
# ------------------------------------------------------------------------------------------------
class _FakeTensor:
    """What the binder reads from a tensor argument: its dtype and a 16-byte aligned pointer."""

    def __init__(self, dtype):
        self.dtype = dtype

    def data_ptr(self):
        return 0


def _cuobjdump() -> str:
    try:
        path = triton.knobs.nvidia.cuobjdump.path
        if path:
            return path
    except Exception:
        pass
    import triton.backends.nvidia as nv

    return str(Path(nv.__file__).parent / "bin" / "cuobjdump")


def _resources(cubin: bytes, workdir: Path, name: str) -> dict:
    """REG / STACK / LOCAL of the kernel in ``cubin`` (spills go to local memory / the stack)."""
    path = workdir / f"{name}.cubin"
    path.write_bytes(cubin)
    out = subprocess.run([_cuobjdump(), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                         check=True).stdout
    path.unlink()
    line = next(ln for ln in out.splitlines() if "REG:" in ln)
    fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
    return {"regs": int(fields["REG"]), "stack": int(fields["STACK"]), "local": int(fields["LOCAL"])}


def compile_one(plan, dtype, arch: int, workdir: Path) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    fn = getattr(T, plan.kernel)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(plan.meta, ACC=getattr(triton.language, plan.meta["ACC"]), **T.launch_options(plan))
    args = [_FakeTensor(d) for d in T.arg_dtypes(plan.kernel, dtype)] + list(plan.ints.values())
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    assert kernel.asm.get("cubin"), "no cubin"
    return _resources(kernel.asm["cubin"], workdir, f"{plan.kernel}_{arch}_{os.getpid()}")


def _worker(index: int, count: int, archs) -> None:
    """Compiles every count-th configuration starting at index; one JSON line per result."""
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="aot-"))
    items = sorted(configurations().items(), key=lambda kv: repr(kv[0]))
    jobs = [(key, plan, dtype, arch) for (key, (plan, dtype)) in items for arch in archs]
    for key, plan, dtype, arch in jobs[index::count]:
        rec = {"kernel": plan.kernel, "dtype": str(dtype).replace("torch.", ""), "meta": plan.meta,
               "num_warps": plan.num_warps, "arch": arch}
        try:
            rec.update(compile_one(plan, dtype, arch, work))
        except Exception as err:  # reported by the parent, which fails the test
            rec["error"] = f"{type(err).__name__}: {str(err)[-2000:]}"
        print(json.dumps(rec), flush=True)


@pytest.mark.slow  # ~2.5 min on 2 cores with a cold Triton cache, ~20 s warm
def test_aot_compile():
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_CACHE_DIR", str(ROOT / ".cache" / "triton-aot"))
    workers = 2
    procs = [subprocess.Popen([sys.executable, __file__, str(i), str(workers)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT)) for i in range(workers)]
    records, errors = [], []
    for p in procs:
        out, err = p.communicate(timeout=800)
        if p.returncode != 0:
            errors.append(f"worker exited {p.returncode}: {err[-3000:]}")
        records += [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
    expected = len(configurations()) * len(ARCHS)
    assert not errors, errors
    assert len(records) == expected, (len(records), expected)
    failed = [r for r in records if "error" in r]
    spills = [r for r in records if "error" not in r and (r["local"] or r["stack"])]
    print(f"\nAOT: {len(records)} cubins (sm_80 + sm_90); registers per thread (kernel, dtype, tiles):")
    for r in sorted(records, key=lambda r: (r["kernel"], r["dtype"], r["arch"], -r.get("regs", 0))):
        m = r["meta"]
        print(f"  sm_{r['arch']} {r['kernel']:<18} {r['dtype']:<9} PI={int(m.get('HAS_PI', 0))} CL={int(m['CL'])} "
              f"VEC={m['VEC']:<2} {m['BLOCK_C']:>3}x{m['BLOCK_L']:<3} w={r['num_warps']} "
              + (f"regs={r['regs']} stack={r['stack']} local={r['local']}" if "regs" in r else r["error"][:200]))
    assert not failed, [f"{r['kernel']} {r['dtype']} sm_{r['arch']} {r['meta']}: {r['error']}" for r in failed][:3]
    assert not spills, [f"{r['kernel']} {r['dtype']} sm_{r['arch']} {r['meta']}: {r}" for r in spills]


# ------------------------------------------------------------------------------------------------
# the site kernels (dyrelu/fused/_triton_site.py): every configuration one BN + DY-ReLU-B and -C
# site launches (bf16 autocast, channels_last, training), as scripts/count_ops.py runs it on fake
# CUDA, captured with its real arguments and compiled for sm_80 and sm_90: no spills
# ------------------------------------------------------------------------------------------------
def site_launches() -> dict:
    """{(kernel, constexprs, warps, dtypes): (jit function, arguments, keyword arguments)} of one
    B and one C site, forward and backward (launches recorded, not run)."""
    from unittest import mock

    from runs import load_script

    count_ops = load_script("count_ops")
    seen = {}

    def launcher(fn, grid):
        def call(*args, **kwargs):
            dtypes = tuple(str(a.dtype) for a in args if isinstance(a, torch.Tensor))
            key = (fn.__name__, tuple(sorted((k, str(v)) for k, v in kwargs.items())), dtypes)
            seen.setdefault(key, (fn, [_FakeTensor(a.dtype) if isinstance(a, torch.Tensor) else a for a in args],
                                  kwargs))
        return call

    with mock.patch.object(T, "launcher", launcher):
        for act in ("dyrelu_b", "dyrelu_c"):
            count_ops.count_site(act, n=4, c=32, hw=7)
    return seen


def compile_launch(fn, args, kwargs, arch: int, workdir: Path) -> dict:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    assert kernel.asm.get("cubin"), "no cubin"
    return _resources(kernel.asm["cubin"], workdir, f"{fn.__name__}_{arch}_{os.getpid()}")


@pytest.mark.slow  # one compile per site configuration and architecture (Triton's cache makes a rerun fast)
def test_aot_compile_site_kernels(tmp_path, monkeypatch):
    pytest.importorskip("triton.backends.nvidia")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(ROOT / ".cache" / "triton-aot"))
    launches = site_launches()
    names = {key[0] for key in launches}
    assert {"_site_fwd1_kernel", "_site_fwd2_kernel", "_site_bwd1_kernel", "_site_bwd2_kernel"} <= names, names
    bad = []
    for key, (fn, args, kwargs) in sorted(launches.items(), key=lambda kv: repr(kv[0])):
        for arch in ARCHS:
            try:
                res = compile_launch(fn, args, kwargs, arch, tmp_path)
            except Exception as err:
                bad.append(f"{key[0]} sm_{arch}: {type(err).__name__}: {str(err)[-500:]}")
                continue
            print(f"  sm_{arch} {key[0]:<22} w={kwargs.get('num_warps')} regs={res['regs']} stack={res['stack']} "
                  f"local={res['local']}")
            if res["local"] or res["stack"]:
                bad.append(f"{key[0]} sm_{arch} {dict(key[1])}: spills {res}")
    assert not bad, bad


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), ARCHS)

#!/usr/bin/env python
"""Wall-clock cost of DY-ReLU against ReLU: full training steps (forward, backward, SGD step).

    python scripts/bench_act.py --device cpu --model mbv2_035 --res 96 --batch 64 --steps 10 --warmup 3
    python scripts/bench_act.py --device cpu --model mbv2_100 --res 224 --no-train --inference \
        --variants relu,dyrelu_b_fused,dyrelu_c_fused --repeats 3
    python scripts/bench_act.py --device cuda --model mbv2_100 --res 224 --batch 256 --dtype bf16 \
        --channels-last --compile --inference
    python scripts/bench_act.py --device cuda --model mbv2_100 --res 224 --batch 256 --dtype bf16 \
        --channels-last --compile-mode reduce-overhead --variants relu,dyrelu_b_fused
    python scripts/bench_act.py --device cpu --model mbv2_100 --res 224 --no-train --inference \
        --inference-batches 1 --aoti --variants relu,dyrelu_b_fused   # issue 21's AOTInductor batch-1 budget

Variants (same network from ``models.build_model``, same seed):
  relu                   the baseline network
  dyrelu_b_reference     DY-ReLU-B, impl="reference" (core.py's readable ops)
  dyrelu_b_fused         DY-ReLU-B, impl="fused" (dyrelu.fused), BN + DY-ReLU fused (model default)
  dyrelu_c_fused         DY-ReLU-C, impl="fused", BN + DY-ReLU fused
  dyrelu_a_fused         DY-ReLU-A, impl="fused", BN + DY-ReLU fused (not in the default list)
  dyrelu_b_fused_nobn    DY-ReLU-B, impl="fused", fuse_bn_act=False: BN, then the fused DY-ReLU
                         (not in the default list)
  dyrelu_b_public_style  DY-ReLU-B applied as the public unofficial code writes it: permute x,
                         broadcast to (N, C, H, W, K), max over K (same hyper function weights)

Every variant runs in its own subprocess (clean allocator, clean RSS high-water mark, clean
compile caches); with ``--repeats R`` the variants run R times round-robin and the median is
reported with the spread (min, max) -- useful on a shared, noisy machine.

--compile / --compile-mode MODE (default | reduce-overhead | max-autotune-no-cudagraphs; a mode
other than default implies --compile): torch.compile with that mode. Each compiled worker gets a
fresh, empty Inductor cache (TORCHINDUCTOR_CACHE_DIR in a temporary folder), so first_step_s is a
cold compile; --warm-compile-cache keeps the user's cache instead. --no-layout-optimization turns
off Inductor's switch of conv graphs to channels_last (torch._inductor.config.layout_optimization).

first_step_s: wall-clock seconds of the first training step (CUDA synchronised): with --compile,
the compile time of the training step (forward and backward graphs) plus one step.

img_s: batch / median wall-clock step time (CUDA synchronised). cpu_img_s: batch / median process
CPU time per step (all threads): on a shared machine, run with --threads 1 and compare cpu_img_s,
which other processes' load disturbs far less than wall clock.

peak_mem_mb: CUDA: torch.cuda.max_memory_allocated() over the timed steps (reset after warm-up).
CPU: growth of the process's RSS high-water mark (resource.getrusage ru_maxrss) from just before
the first step to the end: it counts what the steps allocate on top of the model and the batch
(activations kept for backward, gradients, optimizer state, allocator caching), not the model.

--inference: eval-mode forward at each of --inference-batches, three ways per variant:
  eager     the model as built (model.eval(), torch.inference_mode; compiled with --compile);
  prepared  dyrelu.prepare_for_inference(model, mode=--prepare-mode): BN folded, one precomputed
            path per DY-ReLU (the ReLU model gets the same BN folding);
  onnxrt    the prepared model exported to ONNX (TorchScript exporter, opset 17) and run by ONNX
            Runtime's CPU provider with --threads intra-op threads (CPU only; skipped on CUDA);
  aoti      with --aoti: the prepared model (as above, the deployment path) exported (torch.export:
            plain ATen ops, no dyrelu:: ops, so the package runs without calling back into Python)
            and compiled by AOTInductor into a package per batch size, then loaded and run (tens of
            seconds of C++ compile per package on a small CPU).
Each reports img/s and cpu_img_s (medians of --inference-steps, wall clock and process CPU time)
and, in "inference", ratio_to_relu / cpu_ratio_to_relu against the ReLU model run the same way. The public-style variant gets eager only. --no-train skips the
training steps (e.g. for batch-1 inference at 224 px).

The LAST stdout line is one JSON object:
  {"variants": {name: {"img_s", "img_s_min", "img_s_max", "cpu_img_s", "cpu_img_s_min",
               "cpu_img_s_max", "step_ms", "peak_mem_mb", "first_step_s", "runs"}},
   "ratios_to_relu": {name: {"img_s", "cpu_img_s", "peak_mem", "first_step_s"}}, "inference": {...} (with --inference),
   "device": "...", "settings": {...}}
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("relu", "dyrelu_b_reference", "dyrelu_b_fused", "dyrelu_c_fused", "dyrelu_b_public_style")
EXTRA_VARIANTS = ("dyrelu_a_fused", "dyrelu_b_fused_nobn")
INFERENCE_WAYS = ("eager", "prepared", "onnxrt", "aoti")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
from _bootstrap import ROOT as _ROOT  # the checkout on sys.path (the framework is not installed)

ROOT = str(_ROOT)  # the workers' cwd and PYTHONPATH


# ---------------------------------------------------------------------------------------------
# the outside baseline: DY-ReLU-B as the public unofficial code applies it
# ---------------------------------------------------------------------------------------------
def public_style_module(dy):
    """Wrap a DyReLU: same pooling and hyper function (same weights), apply by broadcast-then-max."""
    import torch
    from torch import nn

    class PublicStyleDyReLU(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            a, b = self.inner.hyper(self.inner.pool(x))  # (N, K, C|1)
            coefs_a = a.transpose(1, 2).to(x.dtype)  # (N, C, K)
            coefs_b = b.transpose(1, 2).to(x.dtype)
            if x.dim() == 2:
                out = x.unsqueeze(-1) * coefs_a + coefs_b
                return torch.max(out, dim=-1)[0]
            # N x C x H x W -> H x W x N x C x 1, broadcast to K, max over K, permute back
            perm = tuple(range(2, x.dim())) + (0, 1)
            x_perm = x.permute(*perm).unsqueeze(-1)
            out = x_perm * coefs_a + coefs_b
            back = (x.dim() - 2, x.dim() - 1) + tuple(range(x.dim() - 2))
            return torch.max(out, dim=-1)[0].permute(*back)

    return PublicStyleDyReLU(dy)


def _swap_public_style(model):
    import dyrelu

    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, dyrelu.DyReLU):
                setattr(mod, child_name, public_style_module(child))
    return model


def build(variant: str, args):
    import torch
    import models

    torch.manual_seed(0)
    spec = {
        "relu": "relu",
        "dyrelu_b_reference": {"name": "dyrelu_b", "impl": "reference"},
        "dyrelu_b_fused": {"name": "dyrelu_b", "impl": "fused"},
        "dyrelu_c_fused": {"name": "dyrelu_c", "impl": "fused"},
        "dyrelu_b_public_style": {"name": "dyrelu_b", "impl": "reference"},
        "dyrelu_a_fused": {"name": "dyrelu_a", "impl": "fused"},
        "dyrelu_b_fused_nobn": {"name": "dyrelu_b", "impl": "fused"},
    }[variant]
    kwargs = {"fuse_bn_act": False} if variant == "dyrelu_b_fused_nobn" else {}
    model = models.build_model(args.model, act=spec, num_classes=args.num_classes, **kwargs)
    if variant == "dyrelu_b_public_style":
        model = _swap_public_style(model)
    return model


# ---------------------------------------------------------------------------------------------
# one variant, in its own process
# ---------------------------------------------------------------------------------------------
def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_peak_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


def run_worker(variant: str, args) -> dict:
    import torch
    import torch.nn.functional as F

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = build(variant, args).to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.res, args.res, generator=g).to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    model.train()

    def step(m):
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(m(x), y)
        loss.backward()
        opt.step()

    fn = model
    if args.compile and not args.no_train:
        if args.no_layout_optimization:
            import torch._inductor.config

            torch._inductor.config.layout_optimization = False
        fn = torch.compile(model, **compile_kwargs(args))
    result = {"variant": variant}
    if not args.no_train:
        result.update(_train_timing(step, fn, args, device))
    if args.inference:
        result["inference"] = _inference_timing(variant, model, args, device, fmt, autocast, g)
    return result


def compile_kwargs(args) -> dict:
    """torch.compile's arguments for --compile-backend / --compile-mode."""
    kw = {"backend": args.compile_backend}
    if args.compile_mode != "default":
        kw["mode"] = args.compile_mode
    return kw


def _train_timing(step, fn, args, device) -> dict:
    import torch

    result = {}
    rss0 = _rss_peak_mb()
    t0 = time.perf_counter()
    step(fn)  # the first step: with --compile, the compile of forward and backward
    _sync(device)
    result["first_step_s"] = time.perf_counter() - t0
    for _ in range(args.warmup - 1):
        step(fn)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, cpu_times = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step(fn)
        _sync(device)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    med = statistics.median(times)
    result["step_ms"] = med * 1e3
    result["img_s"] = args.batch / med
    result["img_s_mean"] = args.batch * len(times) / sum(times)
    # process CPU time per step (all threads): with --threads 1 a proxy for wall clock that a
    # busy shared machine disturbs much less (other processes' time is not counted)
    result["cpu_img_s"] = args.batch / statistics.median(cpu_times)
    if device.type == "cuda":
        result["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["peak_mem_mb"] = _rss_peak_mb() - rss0
    return result


def _time_calls(call, device, warmup: int, steps: int) -> tuple:
    """(median wall-clock seconds, median process CPU seconds) per call, after the warm-up calls."""
    for _ in range(max(1, warmup)):
        call()
    _sync(device)
    ts, cs = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        _sync(device)
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
    return statistics.median(ts), statistics.median(cs)


def _aoti_runner(model, example, autocast):
    """``model`` (eval, prepared) exported at ``example``'s shape and compiled by AOTInductor; the loaded runner."""
    import tempfile

    import torch

    with torch.no_grad(), autocast:
        ep = torch.export.export(model, (example,))
        path = os.path.join(tempfile.mkdtemp(prefix="dyrelu-bench-aoti-"), "model.pt2")
        torch._inductor.aoti_compile_and_package(ep, package_path=path)
    return torch._inductor.aoti_load_package(path)


def _inference_timing(variant, model, args, device, fmt, autocast, g) -> dict:
    """{"batch_<n>": {way: {"img_s", "cpu_img_s"}}} for way in eager / prepared / onnxrt (absent where it
    does not apply)."""
    import tempfile
    import warnings

    import torch

    import dyrelu

    model.eval()
    ways = {"eager": torch.compile(model, **compile_kwargs(args)) if args.compile else model}
    if variant != "dyrelu_b_public_style":
        example = torch.randn(1, 3, args.res, args.res, generator=g).to(device).contiguous(memory_format=fmt)
        ways["prepared"] = dyrelu.prepare_for_inference(model, mode=args.prepare_mode, example_input=example)
    out = {}
    for bs in args.inference_batches:
        xb = torch.randn(bs, 3, args.res, args.res, generator=g).to(device).contiguous(memory_format=fmt)
        row = {}
        for way, fn in ways.items():
            with torch.inference_mode(), autocast:
                wall, cpu = _time_calls(lambda: fn(xb), device, args.warmup, args.inference_steps)
                row[way] = {"img_s": bs / wall, "cpu_img_s": bs / cpu}
        out[f"batch_{bs}"] = row
    if args.aoti and variant != "dyrelu_b_public_style":
        for bs in args.inference_batches:
            xb = torch.randn(bs, 3, args.res, args.res, generator=g).to(device).contiguous(memory_format=fmt)
            runner = _aoti_runner(dyrelu.prepare_for_inference(model), xb, autocast)
            with torch.inference_mode(), autocast:
                wall, cpu = _time_calls(lambda: runner(xb), device, args.warmup, args.inference_steps)
            out[f"batch_{bs}"]["aoti"] = {"img_s": bs / wall, "cpu_img_s": bs / cpu}
    if "prepared" in ways and device.type == "cpu" and not args.no_onnx:
        try:
            import onnxruntime as ort
        except ImportError:
            return out
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.onnx")
            x0 = torch.randn(1, 3, args.res, args.res, generator=g)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(dyrelu.prepare_for_inference(model.cpu().float()), (x0,), path, dynamo=False, opset_version=17,
                                  input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}})
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            for bs in args.inference_batches:
                xb = torch.randn(bs, 3, args.res, args.res, generator=g).numpy()
                wall, cpu = _time_calls(lambda: sess.run(None, {"x": xb}), device, args.warmup, args.inference_steps)
                out[f"batch_{bs}"]["onnxrt"] = {"img_s": bs / wall, "cpu_img_s": bs / cpu}
    return out


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except Exception:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="mbv2_100")
    p.add_argument("--res", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile mode (implies --compile unless default)")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="compiled workers use the user's Inductor cache (default: a fresh one: a cold compile)")
    p.add_argument("--no-layout-optimization", action="store_true",
                   help="compiled workers keep Inductor from switching conv graphs to channels_last")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16 = autocast bf16")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--inference", action="store_true", help="also time eval-mode forward at --inference-batches")
    p.add_argument("--inference-batches", type=lambda s: [int(v) for v in s.split(",")], default=[1, 64])
    p.add_argument("--inference-steps", type=int, default=10)
    p.add_argument("--prepare-mode", default="eager", choices=["eager", "jit", "compile"],
                   help="dyrelu.prepare_for_inference mode of the 'prepared' inference timing")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime inference timing")
    p.add_argument("--aoti", action="store_true", help="also time the model compiled by AOTInductor (with --inference)")
    p.add_argument("--no-train", action="store_true", help="skip the training steps (use with --inference)")
    p.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=1, help="round-robin repeats of all variants")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = [v for v in args.variants if v not in VARIANTS + EXTRA_VARIANTS]
    if bad:
        p.error(f"unknown variants {bad}; valid: {', '.join(VARIANTS + EXTRA_VARIANTS)}")
    if args.compile_mode != "default":
        args.compile = True
    if args.warmup < 1:
        p.error(f"--warmup={args.warmup}: at least 1 (the first step is timed apart as first_step_s)")
    if args.aoti and not args.inference:
        p.error("--aoti needs --inference (it times eval-mode forward)")
    if args.no_train and not args.inference:
        p.error("--no-train needs --inference (there would be nothing to time)")
    return args


def _spawn(variant: str, argv, args) -> dict:
    import shutil
    import tempfile

    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", variant]
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cache = None
    if args.compile and not args.warm_compile_cache:  # a cold compile: nothing cached by earlier runs
        cache = tempfile.mkdtemp(prefix="dyrelu-bench-inductor-")
        env["TORCHINDUCTOR_CACHE_DIR"] = cache
        env["TRITON_CACHE_DIR"] = os.path.join(cache, "triton")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        return {"variant": variant, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args)))
        return None
    load_start = os.getloadavg()
    runs = {v: [] for v in args.variants}
    for rep in range(args.repeats):
        for v in args.variants:
            r = _spawn(v, argv, args)
            runs[v].append(r)
            if "error" in r:
                msg = r["error"]
            elif "img_s" in r:
                # CUDA: peak allocated; CPU: growth of the RSS high-water mark over the steps
                what = "peak memory" if args.device == "cuda" else "peak RSS growth"
                msg = f"{r['img_s']:.1f} img/s, {what} {r['peak_mem_mb']:.0f} MB"
            else:
                msg = "inference img/s " + ", ".join(f"{k}: " + " ".join(f"{w} {t['img_s']:.1f}" for w, t in row.items())
                                               for k, row in r.get("inference", {}).items())
            print(f"[{rep + 1}/{args.repeats}] {v}: {msg}", flush=True)
    variants, inference = {}, {}
    for v, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            variants[v] = {"error": rs[-1].get("error", "failed")}
            continue
        if not args.no_train:
            speeds = [r["img_s"] for r in ok]
            variants[v] = {
                "img_s": statistics.median(speeds),
                "img_s_min": min(speeds),
                "img_s_max": max(speeds),
                "cpu_img_s": statistics.median(r["cpu_img_s"] for r in ok),
                "cpu_img_s_min": min(r["cpu_img_s"] for r in ok),
                "cpu_img_s_max": max(r["cpu_img_s"] for r in ok),
                "step_ms": statistics.median(r["step_ms"] for r in ok),
                "peak_mem_mb": statistics.median(r["peak_mem_mb"] for r in ok),
                "first_step_s": statistics.median(r["first_step_s"] for r in ok),
                "runs": len(ok),
            }
        if args.inference:
            for key, row in ok[0]["inference"].items():
                for way in row:
                    vals = [r["inference"][key][way]["img_s"] for r in ok]
                    cpu = [r["inference"][key][way]["cpu_img_s"] for r in ok]
                    inference.setdefault(key, {}).setdefault(v, {})[way] = {
                        "img_s": statistics.median(vals), "img_s_min": min(vals), "img_s_max": max(vals),
                        "cpu_img_s": statistics.median(cpu), "cpu_img_s_min": min(cpu), "cpu_img_s_max": max(cpu)}
    ratios = {}
    base = variants.get("relu", {})
    for v, r in variants.items():
        if "img_s" in r and "img_s" in base:
            ratios[v] = {
                "img_s": r["img_s"] / base["img_s"],
                "cpu_img_s": r["cpu_img_s"] / base["cpu_img_s"],
                "peak_mem": r["peak_mem_mb"] / base["peak_mem_mb"] if base["peak_mem_mb"] > 0 else None,
                "first_step_s": r["first_step_s"] / base["first_step_s"],
            }
    # each way against ReLU run the same way (prepared vs prepared, ONNX Runtime vs ONNX Runtime)
    for key, per in inference.items():
        for v, ways in per.items():
            for way, r in ways.items():
                b = per.get("relu", {}).get(way, {})
                if b.get("img_s"):
                    r["ratio_to_relu"] = r["img_s"] / b["img_s"]
                    r["cpu_ratio_to_relu"] = r["cpu_img_s"] / b["cpu_img_s"]
    import torch

    settings = {k: v for k, v in vars(args).items() if k != "worker"}
    settings.update(loadavg_start=load_start, loadavg_end=os.getloadavg(), torch=torch.__version__, threads=args.threads or torch.get_num_threads(),
                    peak_mem="cuda max_memory_allocated" if args.device == "cuda" else "cpu ru_maxrss growth over the steps")
    out = {"variants": variants, "ratios_to_relu": ratios, "device": device_name(args.device), "settings": settings}
    if args.inference:
        out["inference"] = inference
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()

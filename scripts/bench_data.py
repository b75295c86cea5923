#!/usr/bin/env python
"""Images per second of the ImageNet training and evaluation transforms, today's path (classic)
and the uint8 path side by side (issue 32), per core and with N worker processes.

    python scripts/bench_data.py            # about 2-3 minutes
    python scripts/bench_data.py --quick    # under a minute: fewer repeats and images
    python scripts/bench_data.py --workers 8 --repeats 15

Images: the real COCO photos of ``--photos`` (640 px) and the same photos re-encoded at ImageNet's
typical size (longer side 500, quality 90), made in a temporary folder at each run.

Paths, each timed per image on one process pinned to one core (torch.set_num_threads(1)):

* ``today``: load_image + data/transforms.py's training transform with the paper's colour jitter
  (0.4): decode, RandomResizedCrop, flip, ColorJitter, ToTensor, Normalize, all in the worker.
* ``new``: the uint8 worker (data/feeding.py Uint8TrainReader): decode (reduced when the crop
  allows), crop + resize, flip, uint8 out. The jitter and normalisation run on the device.
* ``device_step_on_cpu``: that device step (DeviceFeed.normalise: float, jitter, normalise) run on
  this core, per image of a 64-image batch: what the CPU pays when the device is the CPU (``new``
  plus this is ``new_incl_device_step``, reported too).
* ``gpu_decode_on_cpu``: the data.decode=gpu path's device work (batched decode_jpeg, crop, flip,
  jitter, normalise) run with device=cpu, for reference.

The paths are timed in interleaved rounds (today, new, ... then again), and each path's rate is
the median over the rounds, so a machine busy with other work slows them alike and their ratio
holds. A rate per core counts the process's CPU time (time.process_time), not the wall clock:
the cost in core-seconds, which other processes sharing the core do not inflate (the wall-clock
rates are in the JSON too). The N-worker figure runs N such processes at once, each pinned to its own core, and sums
their medians. Ends with one JSON line (``train_img_s_per_core`` {today, new} and
``ratio_per_core`` on the ImageNet-sized images, and the rest) after a table of the cores one GPU
needs on each path.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

from _bootstrap import ROOT

PHOTO_DIRS = (ROOT.parent / "shared" / "data" / "coco_sample" / "images", Path("/work/shared/data/coco_sample/images"),
              ROOT / "tests" / "data" / "coco_sample" / "images")
IMAGENET_LONG_SIDE, IMAGENET_QUALITY = 500, 90
JITTER = 0.4           # the paper's colour jitter (configs/model/mbv2_*.yaml aug.color_jitter)
DEVICE_BATCH = 64

# Training img/s of one GPU per network, for the cores-per-GPU table. "ours" = measured here.
GPU_RATES = [
    ("MobileNetV2 x0.35", None, "not measured on a GPU here; see x1.0 and the MAdds note below"),
    ("MobileNetV2 x1.0", 7499.0, "ours: H200, bf16, channels_last, ReLU, eager, batch 256 (docs/gpu.md)"),
    ("ResNet-50", 2470.0, "NOT ours: NVIDIA DeepLearningExamples, PyTorch ResNet50 v1.5 README, "
                          "1x A100 80GB, mixed precision (pytorch-21.03 container)"),
]
MADDS = {"MobileNetV2 x0.35": 59e6, "MobileNetV2 x1.0": 300e6}  # the paper's Table 2 / MobileNetV2 paper


def _photos(arg) -> list[Path]:
    dirs = [Path(arg)] if arg else list(PHOTO_DIRS)
    for d in dirs:
        found = sorted(p for p in d.glob("*") if p.suffix.lower() in (".jpg", ".jpeg")) if d.is_dir() else []
        if found:
            return found
    from dyrelu.errors import BadValueError

    raise BadValueError(f"no JPEG photos in {', '.join(str(d) for d in dirs)} (--photos DIR)")


def _imagenet_sized(photos, folder: Path) -> list[Path]:
    from PIL import Image

    out = []
    for p in photos:
        img = Image.open(p).convert("RGB")
        w, h = img.size
        k = IMAGENET_LONG_SIDE / max(w, h)
        dest = folder / p.name
        img.resize((round(w * k), round(h * k)), Image.BICUBIC).save(dest, quality=IMAGENET_QUALITY)
        out.append(dest)
    return out


def _paths(crop: int):
    """name -> (kind, callable): 'image' callables take a path; 'batch' callables take nothing and
    process DEVICE_BATCH images (their time is divided by it)."""
    import torch
    from torch.utils.data import default_collate

    from data.feeding import DeviceFeed, EncodedReader, TrainParams, Uint8TrainReader, Uint8ValReader, collate_encoded
    from data.imagenet import load_image
    from data.transforms import build_train_transform, build_val_transform

    today_train = build_train_transform(crop, color_jitter=JITTER)
    today_val = build_val_transform(crop)
    params = TrainParams(crop, color_jitter=JITTER)
    new_train, new_val = Uint8TrainReader(params), Uint8ValReader(crop)
    feed = DeviceFeed("uint8", crop, color_jitter=JITTER)
    gpu_feed = DeviceFeed("gpu_decode", crop, color_jitter=JITTER)
    enc = EncodedReader(params)
    return {
        "train": {
            "today": ("image", lambda p: today_train(load_image(p))),
            "new": ("image", new_train),
            "device_step_on_cpu": ("batch", lambda batch: feed.normalise(batch[0], batch[1])),
            "gpu_decode_on_cpu": ("encoded", lambda b: gpu_feed(b, "cpu")),
        },
        "eval": {
            "today": ("image", lambda p: today_val(load_image(p))),
            "new": ("image", new_val),
            "device_step_on_cpu": ("batch_val", lambda batch: feed.normalise(batch[0], batch[1])),
        },
    }, new_train, (default_collate, collate_encoded, enc, new_val, torch)


def _measure(core, sets: dict, crop: int, repeats: int, per_round: int, seed: int, queue=None):
    """Median img/s per (set, transform, path) on this process, pinned to ``core``."""
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torchvision's decode deprecation note
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    paths, new_train, (default_collate, collate_encoded, enc, new_val, _) = _paths(crop)
    # inputs of the batch paths, made once per set: uint8 batches as the loader hands them over
    batches = {}
    for name, files in sets.items():
        tr = default_collate([new_train(str(files[k % len(files)])) for k in range(DEVICE_BATCH)])
        va = default_collate([new_val(str(files[k % len(files)])) for k in range(DEVICE_BATCH)])
        encoded = collate_encoded([(enc(str(files[k % len(files)])), 0) for k in range(DEVICE_BATCH)])
        batches[name] = {"batch": (tr[0], tr[1]), "batch_val": (va[0], va[1]),
                         "encoded": encoded}
    rates, wall = {}, {}
    for _ in range(repeats):
        for name, files in sets.items():
            for tf, by_path in paths.items():
                for path, (kind, fn) in by_path.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    if kind == "image":
                        for k in range(per_round):
                            fn(str(files[k % len(files)]))
                        n = per_round
                    else:
                        fn(batches[name][kind])
                        n = DEVICE_BATCH
                    key = f"{name}/{tf}/{path}"
                    rates.setdefault(key, []).append(n / max(time.process_time() - c0, 1e-9))
                    wall.setdefault(key, []).append(n / (time.perf_counter() - t0))
    # img/s per core = images per second of this process's CPU time: what one fully busy core
    # does, whatever else the machine runs; the wall-clock rates come along in the JSON
    out = {k: statistics.median(v) for k, v in rates.items()}
    out["_wall"] = {k: statistics.median(v) for k, v in wall.items()}
    out["_reduced_decodes"] = dict(new_train.stats)
    if queue is not None:
        queue.put(out)
    return out


def _draft_fraction(files, crop: int, draws: int) -> float:
    """How often the uint8 reader decodes at a reduced JPEG scale: crops whose shorter side is at
    least 2x the output (drawn from the image sizes alone, no decode)."""
    import torch
    from PIL import Image

    from data.feeding import TrainParams, _draft_scale

    params = TrainParams(crop)
    torch.manual_seed(0)
    hits = total = 0
    for p in files:
        with Image.open(p) as img:
            for _ in range(draws // len(files)):
                row = params(img)
                hits += _draft_scale(row[3].item(), row[2].item(), crop) > 1
                total += 1
    return hits / max(total, 1)


def _parallel(n: int, sets, crop, repeats, per_round) -> list[dict]:
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    procs = [ctx.Process(target=_measure, args=(cores[i % len(cores)], sets, crop, repeats, per_round, i, q))
             for i in range(n)]
    for p in procs:
        p.start()
    results = [q.get() for _ in procs]
    for p in procs:
        p.join()
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repeats and images: under a minute")
    ap.add_argument("--workers", type=int, default=None, help="N for the N-worker figure (default: the usable cores)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 9, --quick 3)")
    ap.add_argument("--per-round", type=int, default=None, help="images per path per round (default 40, --quick 12)")
    ap.add_argument("--crop", type=int, default=224)
    ap.add_argument("--photos", default=None, help="a folder of JPEG photos (default: the COCO sample)")
    args = ap.parse_args(argv)
    from dyrelu.errors import BadValueError
    from engine.errors import exit_on_user_error

    with exit_on_user_error():
        repeats = args.repeats if args.repeats is not None else (3 if args.quick else 9)
        per_round = args.per_round if args.per_round is not None else (12 if args.quick else 40)
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        workers = args.workers if args.workers is not None else usable
        for name, v in (("--repeats", repeats), ("--per-round", per_round), ("--workers", workers), ("--crop", args.crop)):
            if v < 1:
                raise BadValueError(f"{name}={v} must be >= 1")
        photos = _photos(args.photos)
        with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
            sets = {"imagenet_sized": _imagenet_sized(photos, Path(tmp)), "coco_640": photos}
            t0 = time.time()
            one = _measure(0 if hasattr(os, "sched_setaffinity") else None, sets, args.crop, repeats, per_round, 0)
            t1 = time.time()
            many = _parallel(workers, sets, args.crop, max(2, repeats // 2), per_round)
            t2 = time.time()
            draft = {name: _draft_fraction(files, args.crop, 400 if args.quick else 4000) for name, files in sets.items()}
        _report(one, many, workers, usable, draft, sets, photos, args, repeats, per_round, t1 - t0, t2 - t1)
    return 0


def _report(one, many, workers, usable, draft, sets, photos, args, repeats, per_round, t_one, t_many):
    def r(key):
        return one[key]

    print(f"photos: {len(photos)} from {photos[0].parent}; ImageNet-sized copies: longer side {IMAGENET_LONG_SIDE}, "
          f"q{IMAGENET_QUALITY}; crop {args.crop}; colour jitter {JITTER}")
    print(f"one process pinned to one core, {repeats} interleaved rounds of {per_round} images, medians "
          f"({t_one:.0f} s); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("img/s per core = images per second of the process's CPU time (wall-clock rates in the JSON's per_core_wall)")
    print(f"{'images':<16}{'transform':<10}{'today':>8}{'new':>8}{'ratio':>7}{'device step':>13}"
          f"{'new+dev':>9}{'ratio':>7}{'gpu-dec on cpu':>16}")
    for name in sets:
        for tf in ("train", "eval"):
            today, new, dev = r(f"{name}/{tf}/today"), r(f"{name}/{tf}/new"), r(f"{name}/{tf}/device_step_on_cpu")
            both = 1.0 / (1.0 / new + 1.0 / dev)
            gd = one.get(f"{name}/{tf}/gpu_decode_on_cpu")
            print(f"{name:<16}{tf:<10}{today:>8.0f}{new:>8.0f}{new / today:>6.2f}x{dev:>13.0f}{both:>9.0f}"
                  f"{both / today:>6.2f}x{(f'{gd:.0f}' if gd else '-'):>16}")
    agg = {k: sum(m["_wall"][k] for m in many) for k in many[0]["_wall"]}
    print(f"\n{workers} worker processes at once, each pinned to a core ({usable} usable; {t_many:.0f} s), "
          f"summed wall-clock medians (shares the machine with whatever else runs):")
    for name in sets:
        today, new = agg[f"{name}/train/today"], agg[f"{name}/train/new"]
        print(f"  {name:<16} train today {today:7.0f} img/s   new {new:7.0f} img/s   ratio {new / today:.2f}x")
    print(f"\nreduced-size JPEG decode (crop >= 2x the output on both sides) at crop {args.crop}: "
          + ", ".join(f"{k} {100 * v:.1f} % of crops" for k, v in draft.items()))

    today_pc, new_pc = r("imagenet_sized/train/today"), r("imagenet_sized/train/new")
    dev_pc = r("imagenet_sized/train/device_step_on_cpu")
    print("\ncores per GPU (ImageNet-sized JPEGs, training transform with jitter; one core's rate above):")
    print(f"{'network':<20}{'GPU img/s':>10}{'today':>8}{'new':>8}  source")
    cores = {}
    for net, rate, source in GPU_RATES:
        if rate is None:
            continue
        cores[net] = {"gpu_img_s": rate, "today": rate / today_pc, "new": rate / new_pc}
        print(f"{net:<20}{rate:>10.0f}{rate / today_pc:>8.1f}{rate / new_pc:>8.1f}  {source}")
    est = GPU_RATES[1][1] * MADDS["MobileNetV2 x1.0"] / MADDS["MobileNetV2 x0.35"]
    cores["MobileNetV2 x0.35"] = {"gpu_img_s": None, "gpu_img_s_upper_bound": est,
                                  "today": est / today_pc, "new": est / new_pc}
    print(f"{'MobileNetV2 x0.35':<20}{'<=' + format(est, '.0f'):>10}{est / today_pc:>8.1f}{est / new_pc:>8.1f}  "
          f"NOT measured: x1.0's rate x its MAdds ratio (300M / 59M), an upper bound (small layers use a GPU worse)")
    print("(with data.decode=gpu a worker only reads bytes: the decode moves to the GPU too)")
    summary = {
        "train_img_s_per_core": {"today": round(today_pc, 1), "new": round(new_pc, 1)},
        "ratio_per_core": round(new_pc / today_pc, 3),
        "new_incl_device_step_on_cpu": round(1.0 / (1.0 / new_pc + 1.0 / dev_pc), 1),
        "ratio_incl_device_step_on_cpu": round(1.0 / (1.0 / new_pc + 1.0 / dev_pc) / today_pc, 3),
        "eval_img_s_per_core": {"today": round(r("imagenet_sized/eval/today"), 1), "new": round(r("imagenet_sized/eval/new"), 1)},
        "per_core": {k: round(v, 1) for k, v in one.items() if not k.startswith("_")},
        "per_core_wall": {k: round(v, 1) for k, v in one["_wall"].items()},
        "ratio_per_core_wall": round(one["_wall"]["imagenet_sized/train/new"] / one["_wall"]["imagenet_sized/train/today"], 3),
        "workers": workers, "train_img_s_workers": {k: round(v, 1) for k, v in agg.items() if "/train/" in k},
        "reduced_decode_fraction": {k: round(v, 4) for k, v in draft.items()},
        "cores_per_gpu": {k: {kk: (round(vv, 1) if isinstance(vv, float) else vv) for kk, vv in v.items()} for k, v in cores.items()},
        "quick": bool(args.quick), "repeats": repeats, "per_round": per_round, "loadavg_1m": os.getloadavg()[0],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())

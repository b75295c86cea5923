#!/usr/bin/env python
"""gpu_check.py's input-pipeline section (issue 32): images/s decoded and augmented on the device.

    python scripts/_gpu_data_check.py                       # on cuda, ImageNet-sized JPEGs, batch 256
    python scripts/_gpu_data_check.py --device cpu --quick  # the code path on the CPU, tiny sizes

Measures, on batches of JPEG bytes made from the COCO sample re-encoded at ImageNet's typical size
(longer side 500, quality 90), data/feeding.py's DeviceFeed as train.py runs it:

* ``decode``: torchvision's batched ``decode_jpeg(list, device=...)`` alone (nvJPEG on CUDA);
* ``gpu_decode train``: decode + RandomResizedCrop + flip + colour jitter (0.4) + normalise;
* ``gpu_decode eval``: decode + resize 256 + center crop 224 + normalise;
* ``uint8 device step``: what data.pipeline=uint8 leaves to the device (float, jitter, normalise)
  on a 224 uint8 batch from the loader.

Checks: a truncated JPEG in a batch is skipped, named in one warning line, the rest decoded; the
device's evaluation pixels match the same code run on the CPU within 2 grey levels on average
(nvJPEG and libjpeg-turbo round differently). ``section_g(run, Skip)`` is the gpu_check.py form
(``run`` has ``.args.device`` and ``.args.quick``); it returns the section's record. Wiring, in
gpu_check.py: ``import _gpu_data_check``; add "g" to SECTIONS and to ORDER after "d";
``TITLES["g"] = _gpu_data_check.TITLE``; ``FUNCS["g"] = lambda run: _gpu_data_check.section_g(run, Skip)``.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

from _bootstrap import ROOT

TITLE = "input pipeline: JPEG decode and augmentation on the device (data.decode=gpu, data.pipeline=uint8)"
PHOTOS = ROOT / "tests" / "data" / "coco_sample" / "images"
EVAL_MAX_MEAN_ABS = 2.0   # grey levels: device decode vs the CPU's, same resize and crop


def _jpeg_bytes(long_side: int) -> list[bytes]:
    from PIL import Image

    out = []
    for p in sorted(PHOTOS.glob("*.jpg")):
        img = Image.open(p).convert("RGB")
        w, h = img.size
        k = long_side / max(w, h)
        buf = io.BytesIO()
        img.resize((round(w * k), round(h * k)), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _batch(blobs, n, params, paths=None):
    """collate_encoded's batch of ``n`` samples cycling over ``blobs`` (rows drawn by ``params``)."""
    import torch
    from PIL import Image

    from data.feeding import collate_encoded

    samples = []
    for k in range(n):
        data = blobs[k % len(blobs)]
        row = params(Image.open(io.BytesIO(data))) if params is not None else torch.empty(0)
        name = paths[k] if paths else f"mem://{k}.JPEG"
        samples.append(((torch.frombuffer(bytearray(data), dtype=torch.uint8), row, name), k))
    return collate_encoded(samples)


def _rate(fn, n_images: int, steps: int, device) -> float:
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *a: None)
    fn()
    sync()
    ts = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return n_images / statistics.median(ts)


def check(device: str = "cuda", quick: bool = False) -> dict:
    warnings.filterwarnings("ignore", category=DeprecationWarning)  # torchvision's decode deprecation note
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from data.feeding import DeviceFeed, TrainParams

    dev = torch.device(device)
    crop, resize, n, steps = (32, 36, 8, 2) if quick else (224, 256, 256, 10)
    blobs = _jpeg_bytes(96 if quick else 500)
    params = TrainParams(crop, color_jitter=0.4)
    train_feed = DeviceFeed("gpu_decode", crop, color_jitter=0.4, resize=resize)
    torch.manual_seed(0)
    train_b, val_b = _batch(blobs, n, params), _batch(blobs, n, None)
    uint8_feed = DeviceFeed("uint8", crop, color_jitter=0.4)
    u8 = torch.randint(0, 256, (n, 3, crop, crop), dtype=torch.uint8)
    u8 = u8.pin_memory() if dev.type == "cuda" else u8
    u8_batch = ((u8, train_b[0][1]), train_b[1])
    rates = {
        "decode": _rate(lambda: decode_jpeg(train_b[0][0], mode=ImageReadMode.RGB, device=dev), n, steps, dev),
        "gpu_decode_train": _rate(lambda: train_feed(train_b, dev, True), n, steps, dev),
        "gpu_decode_eval": _rate(lambda: train_feed(val_b, dev, True), n, steps, dev),
        "uint8_device_step": _rate(lambda: uint8_feed(u8_batch, dev, True), n, steps, dev),
    }
    failures = []
    # a truncated JPEG among good ones: skipped by name, the rest kept
    bad = blobs[0][: len(blobs[0]) // 3]
    mixed = _batch([blobs[0], bad, blobs[1]], 3, params, paths=["good0.JPEG", "truncated.JPEG", "good1.JPEG"])
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("data.feeding").addHandler(handler)
    try:
        x, t = train_feed(mixed, dev, True)
    finally:
        logging.getLogger("data.feeding").removeHandler(handler)
    named = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    if tuple(x.shape) != (2, 3, crop, crop) or t.tolist() != [0, 2] or len(named) != 1 or "truncated.JPEG" not in named[0]:
        failures.append(f"corrupt JPEG: got {tuple(x.shape)}, targets {t.tolist()}, warnings {named}")
    # the device's evaluation pixels against the same code on the CPU
    cpu_x, _ = DeviceFeed("gpu_decode", crop, resize=resize)(_batch(blobs, len(blobs), None), torch.device("cpu"))
    dev_x, _ = DeviceFeed("gpu_decode", crop, resize=resize)(_batch(blobs, len(blobs), None), dev)
    std = torch.tensor(train_feed.std).view(1, 3, 1, 1)
    diff = float(((dev_x.cpu() - cpu_x) * std * 255).abs().mean())
    if diff > EVAL_MAX_MEAN_ABS:
        failures.append(f"device eval pixels differ from the CPU's by {diff:.2f} grey levels on average (> {EVAL_MAX_MEAN_ABS})")
    rates = {k: round(v, 1) for k, v in rates.items()}
    return {"device": str(dev), "batch": n, "crop": crop, "img_s": rates, "eval_mean_abs_diff_vs_cpu": round(diff, 3),
            "failures": failures,
            "note": "; ".join(f"{k} {v:,.0f} img/s" for k, v in rates.items()) + f" (batch {n}, crop {crop})"}


def section_g(run, skip: type) -> dict:
    """gpu_check.py's form; ``skip`` is its Skip class (raised under --quick, the CI run, where
    the sizes mean nothing: ``--device cpu --quick`` of this script covers the code path)."""
    if run.args.quick:
        raise skip("not in --quick; scripts/_gpu_data_check.py --device cpu --quick runs the code path")
    return check(run.args.device, quick=False)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the code path, not the speed")
    args = ap.parse_args(argv)
    from dyrelu.errors import BadValueError
    from engine.errors import exit_on_user_error

    with exit_on_user_error():
        import torch

        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise BadValueError("--device cuda but no CUDA device is available; use --device cpu")
        out = check(args.device, quick=args.quick)
    print(json.dumps(out))
    return 1 if out["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

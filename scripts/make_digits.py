#!/usr/bin/env python
"""Real held-back images for the dynamics check: scikit-learn's handwritten digits in ImageNet's layout.

    pip install scikit-learn
    python scripts/make_digits.py [--out ~/.cache/dyrelu/digits] [--size 56]
    python train.py data=digits data.root=<out> act=dyrelu_b

The 1,797 8x8 grey digits that scikit-learn ships (from UCI's optical recognition set) are split
80/20 per class with a fixed seed (1,438 train, 359 val), upscaled to ``--size`` pixels (bilinear) and
written as PNG files to <out>/train/<digit>/ and <out>/val/<digit>/. They are real handwriting, unlike
the demo's generated shapes, so a choice made on the demo can be checked on a second data set
(docs/training-health.md). Nothing is downloaded: the images are inside the scikit-learn package.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  the checkout on sys.path


def write_digits(out: Path, size: int = 56, val_fraction: float = 0.2, seed: int = 0) -> dict:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    counts = {"train": 0, "val": 0}
    for label in range(10):
        idx = np.flatnonzero(digits.target == label)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        for split, part in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = out / split / f"digit{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in part:
                grey = (digits.images[i] * (255.0 / 16.0)).round().astype("uint8")  # 0..16 -> 0..255
                img = Image.fromarray(grey, mode="L").resize((size, size), Image.BILINEAR).convert("RGB")
                img.save(folder / f"{i:04d}.png")
                counts[split] += 1
    return counts


def main(argv=None) -> int:
    from data.cache import cache_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(cache_dir() / "digits"))
    ap.add_argument("--size", type=int, default=56)
    args = ap.parse_args(argv)
    try:
        import sklearn  # noqa: F401
    except ImportError:
        print("make_digits.py: scikit-learn is not installed; run `pip install scikit-learn`", file=sys.stderr)
        return 2
    out = Path(args.out).expanduser()
    if (out / "train").exists():
        print(f"{out} exists already; delete it to write it again")
        return 0
    counts = write_digits(out, args.size)
    print(f"wrote {counts['train']} train and {counts['val']} val images to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

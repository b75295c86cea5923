"""The embedded ``demo`` classification dataset.

Small procedurally drawn images, generated ONCE into a cache folder. A class is a shape x colour
pattern: a fill pattern (solid, stripes, checker) and a hue family that is shared by two classes
and holds only 80% of the time. Position, size, rotation, lightness, saturation, background
gradient, clutter and noise are random. The folder is laid out exactly like ImageNet::

    <root>/train/<wnid>/*.JPEG
    <root>/val/<wnid>/*.JPEG
    <root>/LOC_synset_mapping.txt      "<wnid> <human name>" per line
    <root>/manifest.json               generation parameters (written last)

so the ImageNet reader (:class:`data.imagenet.RobustImageFolder`) serves both. Generation is
deterministic given the seed (each image has its own RNG stream keyed by (seed, split, class,
index), so adding images never changes existing ones) and safe when several processes (DDP ranks,
multirun jobs) call :func:`ensure_demo_dataset` at once: the data is written into a temporary
folder next to the target and renamed into place under a lock file; a process that finds a
complete dataset with a matching manifest just uses it.
"""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageDraw

from data.cache import MANIFEST, cache_dir, ensure_generated, read_manifest


log = logging.getLogger(__name__)

VERSION = 1                      # the cache folder name: demo_imagenet_v1
REVISION = 2                     # the drawing recipe; a cached dataset of another revision is regenerated
DEFAULT_DIRNAME = f"demo_imagenet_v{VERSION}"
SYNSET_FILE = "LOC_synset_mapping.txt"
SPLITS = ("train", "val")

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "crescent")
PATTERNS = ("solid", "stripes", "checker")
# Each class also has a hue family (the colour of its colour pattern): hue centre in [0, 1), the
# drawn hue is centre +- HUE_HALF_WIDTH, or any hue with probability OFF_FAMILY_PROB. Colour is the
# cue a tiny network picks up first; it is shared by two classes (and unreliable), so the
# pattern and the shape are needed too.
HUE_FAMILIES = (0.0, 0.2, 0.4, 0.6, 0.8)
HUE_HALF_WIDTH = 0.06
OFF_FAMILY_PROB = 0.2
MAX_CLASSES = len(SHAPES) * len(PATTERNS)

DEFAULTS = dict(num_classes=10, train_per_class=160, val_per_class=40, image_size=72, seed=0)  # = configs/data/demo.yaml

_SUPERSAMPLE = 2  # draw at 2x, box-downsample: anti-aliased edges


def default_root(**params) -> Path:
    """Cache folder for a parameter set: ``<cache>/demo_imagenet_v1`` for the defaults, a
    suffixed sibling otherwise (so different settings never overwrite each other)."""
    p = {**DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
    if p == DEFAULTS:
        return cache_dir() / DEFAULT_DIRNAME
    suffix = "c{num_classes}_t{train_per_class}_v{val_per_class}_s{image_size}_seed{seed}".format(**p)
    return cache_dir() / f"{DEFAULT_DIRNAME}_{suffix}"


def class_specs(num_classes: int) -> List[Tuple[str, str]]:
    """(shape, pattern) of each class. Uses as few patterns as needed and spreads classes evenly
    over shapes: 10 classes = 5 shapes x {solid, stripes}; 8 = 8 shapes, solid."""
    if not 2 <= num_classes <= MAX_CLASSES:
        raise ValueError(f"demo num_classes must be in [2, {MAX_CLASSES}], got {num_classes}")
    n_pat = math.ceil(num_classes / len(SHAPES))
    n_shapes = math.ceil(num_classes / n_pat)
    return [(s, p) for s in SHAPES[:n_shapes] for p in PATTERNS[:n_pat]][:num_classes]


def hue_family(shape: str, pattern: str) -> int:
    """Index into HUE_FAMILIES: classes sharing a family differ in both shape and pattern."""
    return (SHAPES.index(shape) + 2 * PATTERNS.index(pattern)) % len(HUE_FAMILIES)


def class_wnids(num_classes: int) -> List[str]:
    """WordNet-id-like folder names; their sorted order is the class order."""
    return [f"n{9_000_000 + i:08d}" for i in range(num_classes)]


def class_names(num_classes: int) -> List[str]:
    return [f"{s}_{p}" for s, p in class_specs(num_classes)]


# --------------------------------------------------------------------------------------------
# drawing
# --------------------------------------------------------------------------------------------

def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - math.floor(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, dtype=np.float32) * 255.0


def _luma(c: np.ndarray) -> float:
    return float(0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2])


def _polygon(n: int, r: float, rot: float, cx: float, cy: float, inner: Optional[float] = None):
    pts = []
    steps = n * 2 if inner is not None else n
    for i in range(steps):
        rad = r if (inner is None or i % 2 == 0) else r * inner
        a = rot + 2 * math.pi * i / steps
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float, rot: float, aspect: float) -> np.ndarray:
    """Float mask in [0, 1] of a shape drawn at (cx, cy) with radius r (pixels of ``size``)."""
    m = Image.new("L", (size, size), 0)
    d = ImageDraw.Draw(m)
    if shape == "circle":
        d.ellipse([cx - r, cy - r * aspect, cx + r, cy + r * aspect], fill=255)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ri = r * 0.55
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    elif shape == "crescent":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        ox, oy = cx + 0.55 * r * math.cos(rot), cy + 0.55 * r * math.sin(rot)
        ri = r * 0.85
        d.ellipse([ox - ri, oy - ri, ox + ri, oy + ri], fill=0)
    elif shape == "square":
        d.polygon(_polygon(4, r, rot, cx, cy), fill=255)
    elif shape == "triangle":
        d.polygon(_polygon(3, r * 1.1, rot, cx, cy), fill=255)
    elif shape == "hexagon":
        d.polygon(_polygon(6, r, rot, cx, cy), fill=255)
    elif shape == "star":
        d.polygon(_polygon(5, r * 1.1, rot, cx, cy, inner=0.45), fill=255)
    elif shape == "cross":
        w = 0.36  # half arm width relative to r
        base = [(1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w),
                (-1, -w), (-w, -w), (-w, -1), (w, -1), (w, -w), (1, -w)]
        c, s = math.cos(rot), math.sin(rot)
        d.polygon([(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in base], fill=255)
    else:  # pragma: no cover
        raise ValueError(shape)
    return np.asarray(m, dtype=np.float32) / 255.0


def _texture(pattern: str, size: int, rng: np.random.Generator, c1: np.ndarray, c2: np.ndarray) -> np.ndarray:
    if pattern == "solid":
        # a mild shading gradient so "solid" is not literally flat
        g = np.linspace(-1, 1, size, dtype=np.float32)
        ang = rng.uniform(0, 2 * math.pi)
        ramp = math.cos(ang) * g[None, :] + math.sin(ang) * g[:, None]
        return c1[None, None, :] * (1.0 + 0.12 * ramp[..., None])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ang = rng.uniform(0, math.pi)
    period = rng.uniform(0.09, 0.14) * size  # 5.8-9 px at 64 px (stripe / cell width = period / 2)
    u = xx * math.cos(ang) + yy * math.sin(ang) + rng.uniform(0, period)
    if pattern == "stripes":
        sel = np.floor(u / (period / 2)) % 2
    elif pattern == "checker":
        v = -xx * math.sin(ang) + yy * math.cos(ang)
        cell = period * 0.6
        sel = (np.floor(u / cell) + np.floor(v / cell)) % 2
    else:  # pragma: no cover
        raise ValueError(pattern)
    sel = sel[..., None].astype(np.float32)
    return c1[None, None, :] * (1 - sel) + c2[None, None, :] * sel


def _family_colour(rng: np.random.Generator, hue: float, ref: np.ndarray, min_diff: float,
                   val=(0.35, 1.0)) -> np.ndarray:
    """A saturated colour of hue ``hue`` whose luma differs from ``ref`` by at least ``min_diff``
    (the best of 16 tries)."""
    best, best_d = None, -1.0
    for _ in range(16):
        c = _hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(*val))
        d = abs(_luma(c) - _luma(ref))
        if d >= min_diff:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def render_image(shape: str, pattern: str, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw one demo image (RGB, ``image_size`` square)."""
    S = image_size * _SUPERSAMPLE
    if rng.random() < OFF_FAMILY_PROB:
        hue = rng.random()
    else:
        hue = (HUE_FAMILIES[hue_family(shape, pattern)] + rng.uniform(-HUE_HALF_WIDTH, HUE_HALF_WIDTH)) % 1.0
    # background: gradient between two low-saturation colours
    bg1 = _hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.2, 0.95))
    bg2 = _hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.2, 0.95))
    g = np.linspace(0, 1, S, dtype=np.float32)
    ang = rng.uniform(0, 2 * math.pi)
    t = np.clip(0.5 + 0.5 * (math.cos(ang) * (g[None, :] - 0.5) + math.sin(ang) * (g[:, None] - 0.5)) * 2, 0, 1)
    img = bg1[None, None, :] * (1 - t[..., None]) + bg2[None, None, :] * t[..., None]
    bg_mean = (bg1 + bg2) / 2

    # clutter: 0-3 thin random lines / small dots, never the class cue
    clutter = Image.new("L", (S, S), 0)
    cd = ImageDraw.Draw(clutter)
    for _ in range(int(rng.integers(0, 4))):
        x0, y0, x1, y1 = (rng.uniform(0, S) for _ in range(4))
        cd.line([x0, y0, x1, y1], fill=255, width=int(rng.integers(1, 3)) * _SUPERSAMPLE)
    cm = np.asarray(clutter, dtype=np.float32)[..., None] / 255.0
    ccol = _hsv_to_rgb(rng.random(), rng.uniform(0, 1), rng.uniform(0.2, 1.0))
    img = img * (1 - cm) + ccol[None, None, :] * cm

    # foreground shape
    fg = _family_colour(rng, hue, bg_mean, 60.0)
    # the second colour of stripes / checker: same hue, clearly lighter or darker
    fg2 = _family_colour(rng, hue, fg, 60.0, val=(0.1, 1.0))
    r = rng.uniform(0.24, 0.40) * S
    margin = max(S / 2 - r, 0) * 0.7
    cx = S / 2 + rng.uniform(-margin, margin)
    cy = S / 2 + rng.uniform(-margin, margin)
    mask = _shape_mask(shape, S, cx, cy, r, rng.uniform(0, 2 * math.pi), rng.uniform(0.85, 1.0))[..., None]
    tex = _texture(pattern, S, rng, fg, fg2)
    img = img * (1 - mask) + tex * mask

    # downsample (anti-aliasing), then sensor-like noise
    small = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").resize(
        (image_size, image_size), Image.BOX)
    arr = np.asarray(small, dtype=np.float32)
    arr = arr + rng.normal(0.0, rng.uniform(3.0, 10.0), size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _image_rng(seed: int, split: str, class_idx: int, idx: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLITS.index(split), int(class_idx), int(idx)])


def generate_demo_dataset(out: Union[str, Path], num_classes: int = 10, train_per_class: int = 160,
                          val_per_class: int = 40, image_size: int = 72, seed: int = 0) -> Path:
    """Write the dataset into ``out`` (no locking, no atomic rename: see ensure_demo_dataset)."""
    out = Path(out)
    specs = class_specs(num_classes)
    wnids = class_wnids(num_classes)
    counts = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        n = 0
        for ci, ((shape, pattern), wnid) in enumerate(zip(specs, wnids)):
            d = out / split / wnid
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                im = render_image(shape, pattern, image_size, _image_rng(seed, split, ci, i))
                im.save(d / f"{wnid}_{split}_{i:05d}.JPEG", format="JPEG", quality=90)
                n += 1
        counts[split] = n
    (out / SYNSET_FILE).write_text("".join(f"{w} {s}_{p}\n" for w, (s, p) in zip(wnids, specs)))
    manifest = dict(
        generator="data.demo", version=VERSION, revision=REVISION,
        params=dict(num_classes=num_classes, train_per_class=train_per_class, val_per_class=val_per_class,
                    image_size=image_size, seed=seed),
        classes=[dict(wnid=w, name=f"{s}_{p}", shape=s, pattern=p, hue=HUE_FAMILIES[hue_family(s, p)])
                 for w, (s, p) in zip(wnids, specs)],
        counts=counts,
    )
    # the manifest is written last: its presence marks a finished dataset
    tmp = out / (MANIFEST + ".part")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / MANIFEST)
    return out


def _is_complete(root: Path, params: dict) -> bool:
    m = read_manifest(root)
    if not m or m.get("version") != VERSION or m.get("revision") != REVISION or m.get("params") != params:
        return False
    for split in SPLITS:
        d = root / split
        if not d.is_dir():
            return False
        n = sum(len(os.listdir(c)) for c in d.iterdir() if c.is_dir())
        if n != m.get("counts", {}).get(split):
            return False
    return True


def ensure_demo_dataset(root: Union[str, Path, None] = None, num_classes: int = 10, train_per_class: int = 160,
                        val_per_class: int = 40, image_size: int = 72, seed: int = 0) -> Path:
    """Return the demo dataset folder, generating it first if needed.

    ``root=None`` uses :func:`default_root` (``${DYRELU_CACHE:-~/.cache/dyrelu}/demo_imagenet_v1`` for
    the default parameters). If ``root`` holds a complete dataset whose manifest matches the
    parameters it is returned as is; one with a different manifest is regenerated; a non-empty
    folder without a manifest is never touched (FileExistsError).
    """
    params = dict(num_classes=int(num_classes), train_per_class=int(train_per_class),
                  val_per_class=int(val_per_class), image_size=int(image_size), seed=int(seed))
    class_specs(params["num_classes"])  # validates
    if params["image_size"] < 16:
        raise ValueError(f"demo image_size must be >= 16, got {image_size}")
    root = Path(root).expanduser() if root is not None else default_root(**params)
    return ensure_generated(root, lambda r: _is_complete(r, params),
                            lambda tmp: generate_demo_dataset(tmp, **params), f"demo dataset {params}")


def preview_grid(root: Union[str, Path], split: str = "val", per_class: int = 8) -> Image.Image:
    """A grid image (one row per class) for eyeballing the dataset."""
    root = Path(root)
    classes = sorted(p for p in (root / split).iterdir() if p.is_dir())
    tiles = [[Image.open(f).convert("RGB") for f in sorted(c.iterdir())[:per_class]] for c in classes]
    s = tiles[0][0].size[0]
    grid = Image.new("RGB", (per_class * s, len(classes) * s))
    for r, row in enumerate(tiles):
        for c, im in enumerate(row):
            grid.paste(im, (c * s, r * s))
    return grid


if __name__ == "__main__":  # python -m data.demo [root]: (re)generate and print the path
    import sys

    logging.basicConfig(level=logging.INFO)
    print(ensure_demo_dataset(sys.argv[1] if len(sys.argv) > 1 else None))

"""``coco_demo``: a small generated person-keypoint dataset in COCO's format and layout.

Images of articulated figures that carry COCO's 17 joints (front-facing, so a figure's
left side is on the image's right, as for a person facing the camera; mirroring one
gives a valid figure with swapped labels, so flip augmentation and the flip test are
consistent). Each image has 1-3 labelled figures of varied size, position and pose
(torso lean, arm and leg angles, knee/elbow bends, foreshortened limbs, head yaw), a
plausible background (two-tone gradient "wall and floor", furniture-like boxes and
ellipses, noise), occluders, sometimes a tiny unlabelled background figure
(``num_keypoints == 0``, as COCO's small people). Visibility follows COCO: 2 visible,
1 labelled but occluded (by another figure or an occluder), 0 unlabelled (outside the
image, or some occluded joints and a few random ones, as annotators skip them).
Limbs are thick, per-figure clothing colours; each joint type has its own colour dot
(left and right share a colour).

Layout (what :func:`data.coco.build_coco_datasets` expects)::

    <root>/annotations/person_keypoints_train2017.json
    <root>/annotations/person_keypoints_val2017.json
    <root>/train2017/*.jpg, <root>/val2017/*.jpg
    <root>/person_detections_val2017.json     detector-style boxes for val (jittered GT,
                                              duplicates, false positives, with scores)
    <root>/manifest.json                       parameters and counts (written last)

Generated once into ``${DYRELU_CACHE:-~/.cache/dyrelu}/coco_demo_v1`` (a suffixed sibling
for non-default parameters), deterministic given the seed (one RNG stream per image),
atomically renamed into place under a lock file, so concurrent callers are safe.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import cv2
import numpy as np

from data.cache import MANIFEST, cache_dir, ensure_generated, read_manifest
from data.keypoints import JOINT_NAMES, NUM_JOINTS, SKELETON


log = logging.getLogger(__name__)

VERSION = 1
DEFAULT_DIRNAME = f"coco_demo_v{VERSION}"
DET_FILE = "person_detections_val2017.json"
DEFAULTS = dict(num_train=300, num_val=60, image_size=256, seed=0)
SPLITS = ("train", "val")

# joint dot colours (RGB), shared by left/right so that a mirrored figure is a valid figure
_JOINT_COLOURS = {
    "nose": (255, 255, 255), "eye": (20, 20, 20), "ear": (150, 75, 20), "shoulder": (230, 30, 30),
    "elbow": (255, 140, 0), "wrist": (255, 230, 0), "hip": (30, 80, 255), "knee": (0, 220, 220),
    "ankle": (230, 0, 230),
}


def _joint_colour(j: int):
    name = JOINT_NAMES[j].split("_")[-1]
    return _JOINT_COLOURS[name]


def default_root(**params) -> Path:
    p = {**DEFAULTS, **{k: v for k, v in params.items() if v is not None}}
    if p == DEFAULTS:
        return cache_dir() / DEFAULT_DIRNAME
    return cache_dir() / "{}_t{num_train}_v{num_val}_s{image_size}_seed{seed}".format(DEFAULT_DIRNAME, **p)


# --------------------------------------------------------------------------- figure geometry

def _rot(v: np.ndarray, deg: float) -> np.ndarray:
    """Rotate a 2D vector by ``deg`` (image coordinates, y down; positive = clockwise on screen)."""
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([v[0] * c - v[1] * s, v[0] * s + v[1] * c])


def sample_pose(rng: np.random.Generator, height: float, foot: np.ndarray) -> dict:
    """Joint positions (17, 2) of a front-facing figure ``height`` px tall standing near ``foot``.

    Returns {"joints", "head_center", "head_radius", "width" (limb thickness)}.
    """
    H = float(height)
    down = np.array([0.0, 1.0])
    lean = rng.normal(0.0, 8.0)  # torso lean (deg)
    body_rot = rng.normal(0.0, 6.0)
    up_t = _rot(-down, lean + body_rot)  # pelvis -> neck direction
    side_t = _rot(np.array([1.0, 0.0]), lean + body_rot)  # image-right across the torso
    fs = lambda: rng.uniform(0.75, 1.0)  # noqa: E731  foreshortening of a limb
    torso = 0.30 * H * rng.uniform(0.9, 1.05)
    sh_w, hip_w = 0.11 * H * rng.uniform(0.85, 1.1), 0.075 * H * rng.uniform(0.85, 1.1)
    legs = (0.24 + 0.23) * H
    crouch = rng.uniform(0.0, 1.0) < 0.15
    pelvis = np.array([foot[0], foot[1] - legs * (0.75 if crouch else 0.95)])
    neck = pelvis + up_t * torso
    j = np.zeros((NUM_JOINTS, 2))
    # person's left (odd ids 5, 7, ...) sits at the image right for a front-facing figure
    j[5], j[6] = neck + side_t * sh_w, neck - side_t * sh_w
    j[11], j[12] = pelvis + side_t * hip_w, pelvis - side_t * hip_w
    for side, sh, el, wr in ((+1, 5, 7, 9), (-1, 6, 8, 10)):
        out = rng.uniform(-15.0, 150.0)  # upper arm away from the body, 0 = hanging down
        bend = rng.uniform(-30.0, 140.0)  # elbow bend toward the body / upward
        d1 = _rot(down, -side * out + lean + body_rot)
        d2 = _rot(d1, -side * bend)
        j[el] = j[sh] + d1 * 0.17 * H * fs()
        j[wr] = j[el] + d2 * 0.15 * H * fs()
    for side, hp, kn, an in ((+1, 11, 13, 15), (-1, 12, 14, 16)):
        out = rng.uniform(-8.0, 35.0) if not crouch else rng.uniform(20.0, 70.0)
        bend = rng.uniform(-10.0, 40.0) if not crouch else rng.uniform(60.0, 110.0)
        d1 = _rot(down, -side * out + body_rot)
        d2 = _rot(d1, side * bend)
        j[kn] = j[hp] + d1 * 0.24 * H * fs()
        j[an] = j[kn] + d2 * 0.23 * H * fs()
    r = 0.065 * H * rng.uniform(0.9, 1.1)
    tilt = rng.normal(0.0, 10.0)
    up_h = _rot(up_t, tilt)
    side_h = _rot(side_t, tilt)
    head = neck + up_h * (r * 1.45)
    yaw = rng.uniform(-0.45, 0.45)  # head turned toward the image right (+) / left (-)
    j[0] = head + side_h * (yaw * r) - up_h * (0.25 * r)
    j[1] = head + side_h * ((0.38 + yaw) * r) + up_h * (0.15 * r)  # left eye, image right
    j[2] = head + side_h * ((-0.38 + yaw) * r) + up_h * (0.15 * r)
    j[3] = head + side_h * ((0.98 - 0.3 * max(yaw, 0)) * r) + up_h * (0.05 * r)
    j[4] = head + side_h * ((-0.98 - 0.3 * min(yaw, 0)) * r) + up_h * (0.05 * r)
    return {"joints": j, "head_center": head, "head_radius": r, "width": max(2.0, 0.055 * H), "yaw": yaw}


_LIMBS = ((5, 7, "shirt"), (7, 9, "skin"), (6, 8, "shirt"), (8, 10, "skin"),
          (11, 13, "pants"), (13, 15, "pants"), (12, 14, "pants"), (14, 16, "pants"))


def _pt(p) -> tuple[int, int]:
    return int(round(float(p[0]) * 4)), int(round(float(p[1]) * 4))  # cv2 shift=2 sub-pixel


def draw_figure(img: np.ndarray, owner: np.ndarray, pid: int, fig: dict, colours: dict, own_mask: np.ndarray,
                draw_dots: bool = True) -> None:
    """Draw a figure into ``img`` (RGB uint8), its id into ``owner`` and its silhouette into ``own_mask``."""
    j = fig["joints"]
    w = int(round(fig["width"]))
    aa = cv2.LINE_AA

    def both(fn, colour, *args, **kw):
        fn(img, *args, colour, **kw, lineType=aa, shift=2)
        fn(owner, *args, int(pid), **{**kw}, lineType=cv2.LINE_8, shift=2)
        fn(own_mask, *args, 1, **{**kw}, lineType=cv2.LINE_8, shift=2)

    torso = np.array([_pt(j[5]), _pt(j[6]), _pt(j[12]), _pt(j[11])], np.int32)
    for target, val in ((img, colours["shirt"]), (owner, int(pid)), (own_mask, 1)):
        cv2.fillPoly(target, [torso], val, lineType=aa if target is img else cv2.LINE_8, shift=2)
    both(cv2.line, colours["shirt"], _pt(j[5]), _pt(j[6]), thickness=w)
    both(cv2.line, colours["pants"], _pt(j[11]), _pt(j[12]), thickness=w)
    neck = (j[5] + j[6]) / 2
    both(cv2.line, colours["skin"], _pt(neck), _pt(fig["head_center"]), thickness=max(2, int(w * 0.8)))
    for a, b, part in _LIMBS:
        both(cv2.line, colours[part], _pt(j[a]), _pt(j[b]), thickness=w)
    r4 = int(round(fig["head_radius"] * 4))
    both(cv2.circle, colours["skin"], _pt(fig["head_center"]), r4, thickness=-1)
    if colours.get("hair") is not None:
        hc = fig["head_center"]
        cv2.ellipse(img, _pt(hc), (r4, int(r4 * 0.6)), 0, 180, 360, colours["hair"], -1, aa, shift=2)
    if draw_dots:
        dot = max(1.5, fig["head_radius"] * 0.22)
        for k in range(NUM_JOINTS):
            rad = dot * (0.7 if k <= 4 else 1.4)
            cv2.circle(img, _pt(j[k]), int(round(rad * 4)), _joint_colour(k), -1, aa, shift=2)
            cv2.circle(owner, _pt(j[k]), int(round(rad * 4)), int(pid), -1, cv2.LINE_8, shift=2)


# --------------------------------------------------------------------------- scenes

def _muted(rng, lo=60, hi=200):
    base = rng.uniform(lo, hi)
    return np.clip(base + rng.normal(0, 18, 3), 0, 255)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    wall, floor = _muted(rng), _muted(rng, 40, 170)
    horizon = int(h * rng.uniform(0.45, 0.8))
    img = np.zeros((h, w, 3), np.float32)
    t = np.linspace(0, 1, horizon)[:, None]
    img[:horizon] = (wall * (1 - 0.25 * t))[:, None, :]
    t2 = np.linspace(0, 1, h - horizon)[:, None]
    img[horizon:] = (floor * (0.8 + 0.2 * t2))[:, None, :]
    for _ in range(int(rng.integers(2, 7))):  # furniture, windows, pictures
        c = tuple(float(v) for v in _muted(rng, 30, 220))
        x0, y0 = int(rng.uniform(-0.1, 0.95) * w), int(rng.uniform(0.0, 0.9) * h)
        bw, bh = int(rng.uniform(0.08, 0.4) * w), int(rng.uniform(0.06, 0.4) * h)
        if rng.random() < 0.7:
            cv2.rectangle(img, (x0, y0), (x0 + bw, y0 + bh), c, -1)
        else:
            cv2.ellipse(img, (x0, y0), (bw // 2 + 1, bh // 2 + 1), float(rng.uniform(0, 180)), 0, 360, c, -1)
    img = cv2.GaussianBlur(img, (0, 0), 1.0)
    return np.clip(img, 0, 255).astype(np.uint8)


def _clothes(rng: np.random.Generator) -> dict:
    def vivid():
        hsv = np.uint8([[[rng.integers(0, 180), rng.integers(120, 256), rng.integers(90, 230)]]])
        return tuple(int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])

    skin = tuple(int(v) for v in np.clip(np.array([224, 172, 140]) * rng.uniform(0.45, 1.1), 0, 255))
    hair = tuple(int(v) for v in np.clip(np.array([60, 40, 25]) * rng.uniform(0.3, 2.5), 0, 255))
    return {"shirt": vivid(), "pants": vivid(), "skin": skin, "hair": hair if rng.random() < 0.8 else None}


def _polygons(mask: np.ndarray) -> list:
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = []
    for c in contours:
        c = cv2.approxPolyDP(c, 1.0, True).reshape(-1, 2)
        if len(c) >= 3:
            polys.append([float(v) for v in c.reshape(-1)])
    return polys


def render_scene(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, list[dict]]:
    """One image (RGB uint8) and its person annotations (COCO fields, no ids)."""
    h = int(round(image_size * rng.uniform(0.8, 1.1)))
    w = int(round(image_size * rng.uniform(0.85, 1.3)))
    img = _background(rng, h, w)
    owner = np.zeros((h, w), np.int32)
    n_people = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    figs = []
    if rng.random() < 0.15:  # a tiny unlabelled person far away (COCO labels no joints on such people)
        H = h * rng.uniform(0.1, 0.18)
        figs.append(("tiny", sample_pose(rng, H, np.array([rng.uniform(0.05, 0.95) * w, rng.uniform(0.3, 0.7) * h]))))
    for _ in range(n_people):
        H = h * (rng.uniform(0.45, 0.95) if n_people == 1 else rng.uniform(0.35, 0.8))
        foot = np.array([rng.uniform(0.1, 0.9) * w, rng.uniform(0.75, 1.08) * h])
        figs.append(("person", sample_pose(rng, H, foot)))
    # draw back to front: lower feet (closer to the camera) last
    order = sorted(range(len(figs)), key=lambda i: figs[i][1]["joints"][15:17, 1].max())
    masks = {}
    for pid, i in enumerate(order, start=1):
        mask = np.zeros((h, w), np.uint8)
        draw_figure(img, owner, pid, figs[i][1], _clothes(rng), mask)
        masks[i] = (pid, mask)
    if rng.random() < 0.35:  # an occluder in front (table, pole, sign)
        c = tuple(float(v) for v in _muted(rng, 20, 230))
        if rng.random() < 0.5:
            x0, bw = int(rng.uniform(0.0, 0.9) * w), int(rng.uniform(0.05, 0.15) * w)
            y0, bh = 0 if rng.random() < 0.5 else int(rng.uniform(0.3, 0.7) * h), h
        else:
            x0, bw = int(rng.uniform(-0.2, 0.7) * w), int(rng.uniform(0.2, 0.6) * w)
            y0, bh = int(rng.uniform(0.55, 0.85) * h), int(rng.uniform(0.1, 0.3) * h)
        cv2.rectangle(img, (x0, y0), (x0 + bw, y0 + bh), c, -1)
        cv2.rectangle(owner, (x0, y0), (x0 + bw, y0 + bh), -1, -1)
    img = img.astype(np.float32) + rng.normal(0.0, rng.uniform(2.0, 7.0), img.shape)
    img = np.clip(img, 0, 255).astype(np.uint8)

    anns = []
    for i, (kind, fig) in enumerate(figs):
        pid, mask = masks[i]
        if mask.sum() == 0:
            continue
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
        kpts = np.zeros((NUM_JOINTS, 3))
        if kind == "person":
            for k, (x, y) in enumerate(fig["joints"]):
                xi, yi = int(math.floor(x)), int(math.floor(y))
                if not (0 <= x < w and 0 <= y < h):
                    continue  # outside the image: unlabelled
                visible = owner[yi, xi] == pid
                if k in (3, 4):  # an ear turned away from the camera is hidden by the head
                    if (k == 3 and fig["yaw"] < -0.3) or (k == 4 and fig["yaw"] > 0.3):
                        visible = False
                if rng.random() < 0.03 or (not visible and rng.random() < 0.4):
                    continue  # annotator skipped it
                kpts[k] = (round(float(x), 2), round(float(y), 2), 2 if visible else 1)
        num = int((kpts[:, 2] > 0).sum())
        anns.append({
            "segmentation": _polygons(mask), "num_keypoints": num, "area": float(mask.sum()), "iscrowd": 0,
            "keypoints": [float(v) if c % 3 != 2 else int(v) for c, v in enumerate(kpts.reshape(-1))],
            "bbox": [x0, y0, x1 - x0, y1 - y0], "category_id": 1,
        })
    return img, anns


def _image_rng(seed: int, split: str, idx: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), SPLITS.index(split), int(idx)])


def _detections(rng: np.random.Generator, image: dict, anns: list[dict]) -> list[dict]:
    """Detector-style boxes: jittered GT (1-3 per person, decreasing scores) and false positives."""
    out = []
    w, h = image["width"], image["height"]
    for a in anns:
        x, y, bw, bh = a["bbox"]
        for k in range(int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))):
            j = 0.04 if k == 0 else 0.1
            cx = x + bw / 2 + rng.normal(0, j) * bw
            cy = y + bh / 2 + rng.normal(0, j) * bh
            nw, nh = bw * math.exp(rng.normal(0, j)), bh * math.exp(rng.normal(0, j))
            score = rng.uniform(0.7, 1.0) if k == 0 else rng.uniform(0.05, 0.6)
            if a["num_keypoints"] == 0:
                score *= 0.5
            out.append({"image_id": image["id"], "category_id": 1,
                        "bbox": [round(cx - nw / 2, 2), round(cy - nh / 2, 2), round(nw, 2), round(nh, 2)],
                        "score": round(float(score), 4)})
    for _ in range(int(rng.integers(0, 3))):
        bw, bh = rng.uniform(0.1, 0.4) * w, rng.uniform(0.2, 0.7) * h
        x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
        out.append({"image_id": image["id"], "category_id": 1,
                    "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)],
                    "score": round(float(rng.uniform(0.02, 0.35)), 4)})
    return out


def _categories() -> list[dict]:
    return [{"supercategory": "person", "id": 1, "name": "person", "keypoints": list(JOINT_NAMES),
             "skeleton": [list(s) for s in SKELETON]}]


def generate_coco_demo(out, num_train: int = 300, num_val: int = 60, image_size: int = 256, seed: int = 0) -> Path:
    """Write the dataset into ``out`` (no locking, no atomic rename: see :func:`ensure_coco_demo`)."""
    out = Path(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    counts, ann_id = {}, 1
    dets = []
    for split, n in (("train", num_train), ("val", num_val)):
        img_dir = out / f"{split}2017"
        img_dir.mkdir(parents=True, exist_ok=True)
        images, anns = [], []
        base_id = 1 if split == "train" else 1_000_000
        for i in range(n):
            rng = _image_rng(seed, split, i)
            img, objs = render_scene(rng, image_size)
            image = {"license": 1, "file_name": f"{base_id + i:012d}.jpg", "height": int(img.shape[0]),
                     "width": int(img.shape[1]), "id": base_id + i}
            ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
            if not ok:  # pragma: no cover
                raise RuntimeError("JPEG encoding failed")
            (img_dir / image["file_name"]).write_bytes(buf.tobytes())
            images.append(image)
            for o in objs:
                anns.append({**o, "image_id": image["id"], "id": ann_id})
                ann_id += 1
            if split == "val":
                dets.extend(_detections(rng, image, objs))
        data = {
            "info": {"description": "dyrelu coco_demo: generated articulated figures with COCO's 17 keypoints",
                     "version": str(VERSION), "year": 2020, "contributor": "dyrelu", "date_created": "generated"},
            "licenses": [{"id": 1, "name": "generated by dyrelu (public domain)", "url": ""}],
            "categories": _categories(), "images": images, "annotations": anns,
        }
        (out / "annotations" / f"person_keypoints_{split}2017.json").write_text(json.dumps(data))
        counts[split] = {"images": len(images), "annotations": len(anns),
                         "labelled_people": sum(a["num_keypoints"] > 0 for a in anns),
                         "keypoints": sum(a["num_keypoints"] for a in anns)}
    (out / DET_FILE).write_text(json.dumps(dets))
    counts["detections"] = len(dets)
    manifest = {"generator": "data.coco_demo", "version": VERSION,
                "params": {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed},
                "counts": counts}
    tmp = out / (MANIFEST + ".part")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / MANIFEST)  # written last: marks a finished dataset
    return out


def _is_complete(root: Path, params: dict) -> bool:
    m = read_manifest(root)
    if not m or m.get("version") != VERSION or m.get("params") != params:
        return False
    for split in SPLITS:
        d = root / f"{split}2017"
        if not (root / "annotations" / f"person_keypoints_{split}2017.json").is_file() or not d.is_dir():
            return False
        if len(os.listdir(d)) != m["counts"][split]["images"]:
            return False
    return (root / DET_FILE).is_file()


def ensure_coco_demo(root=None, num_train: int = 300, num_val: int = 60, image_size: int = 256,
                     seed: int = 0) -> Path:
    """Return the coco_demo folder, generating it first if needed (see module docstring).

    A complete folder whose manifest matches the parameters is reused; one with other
    parameters is regenerated; a non-empty folder without a manifest is never touched
    (``FileExistsError``).
    """
    params = {"num_train": int(num_train), "num_val": int(num_val), "image_size": int(image_size), "seed": int(seed)}
    if params["num_train"] < 1 or params["num_val"] < 1:
        raise ValueError(f"coco_demo needs num_train >= 1 and num_val >= 1, got {num_train}, {num_val}")
    if params["image_size"] < 64:
        raise ValueError(f"coco_demo image_size must be >= 64, got {image_size}")
    root = Path(root).expanduser() if root is not None else default_root(**params)
    return ensure_generated(root, lambda r: _is_complete(r, params),
                            lambda tmp: generate_coco_demo(tmp, **params), f"coco_demo {params}")


def build_coco_demo_datasets(root=None, num_train: int = 300, num_val: int = 60, image_size: int = 256,
                             seed: int = 0, **kwargs):
    """``ensure_coco_demo`` then :func:`data.coco.build_coco_datasets` on it (kwargs go there)."""
    from data.coco import build_coco_datasets

    root = ensure_coco_demo(root, num_train, num_val, image_size, seed)
    return build_coco_datasets(root=root, **kwargs)


if __name__ == "__main__":  # python -m data.coco_demo [root]: generate, print the path and counts
    import sys

    logging.basicConfig(level=logging.INFO)
    r = ensure_coco_demo(sys.argv[1] if len(sys.argv) > 1 else None)
    print(r)
    print(json.dumps(read_manifest(r)["counts"]))

"""COCO person keypoints, top-down, exactly as Simple Baselines / HRNet (used by DY-ReLU Sec. 5.3).

``CocoKeypoints`` yields ``(image (3,H,W) float32, target (17,h,w) float32,
target_weight (17,1) float32, meta)`` with ``meta`` a dict of tensors that
``default_collate`` stacks: image_id, center (2,), scale (2,), rotation, score, area,
index, flipped, valid, joints (17,3: x, y in crop pixels, labelled flag).

Box convention: HRNet's (``center`` = box centre, ``scale`` = box size / 200 px after
widening to the crop aspect 192/256 and x1.25). ``meta["area"] = prod(scale * 200)``
is the area HRNet's OKS-NMS uses.

Train samples (HRNet ``_load_coco_keypoint_annotation_kernal``): person, non-crowd
annotations with ``area > 0``, a non-degenerate box after clipping to the image, and at
least one labelled keypoint. Test samples: the same instances with box score 1
(``use_gt_boxes``), or the detector boxes of ``det_file`` (category 1, score >=
``det_score_thresh``; boxes not clipped, as HRNet).

Training augmentation (HRNet ``JointsDataset.__getitem__``): half body (prob 0.3, when
more than 8 joints are labelled), scale ``s * clip(N(1, 0.35), 0.65, 1.35)``, rotation
``clip(N(0, rot_factor), -2 rot_factor, 2 rot_factor)`` with probability 0.6 (HRNet's
code for the papers' "rotation [-45, 45]"; ``rot_max=45`` confines it to +-45), flip
with probability 0.5 and the COCO flip pairs. Crop with ``cv2.warpAffine`` (bilinear),
RGB, ImageNet mean/std.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from dyrelu.errors import CorruptDataError, MissingPathError

from data.keypoints import (
    FLIP_PAIRS, IMAGENET_MEAN, IMAGENET_STD, NUM_JOINTS, PIXEL_STD, UPPER_BODY_IDS, KeypointEvaluator,
    affine_transform, box_to_center_scale, flip_average, fliplr_joints, generate_target, get_affine_transform,
)

log = logging.getLogger(__name__)

__all__ = [
    "CocoFormatError", "CocoImageError", "CocoKeypoints", "build_coco_dataset", "build_coco_datasets",
    "codec_check", "load_detections", "load_keypoint_annotations", "resolve_coco_paths",
    "validate_detections", "validate_keypoint_annotations",
]


_WORKER_CV2_THREADS_SET = False


class CocoFormatError(CorruptDataError, ValueError):
    """An annotation or detection file lacks a field or has a malformed one (message names file and field)."""


class CocoImageError(CorruptDataError, OSError):
    """An image file cannot be decoded (message names the path)."""


# --------------------------------------------------------------------------- file validation

_IMAGE_FIELDS = ("id", "file_name", "width", "height")
_ANN_FIELDS = ("id", "image_id", "category_id", "bbox", "area", "iscrowd")
_KPT_FIELDS = ("keypoints", "num_keypoints")
_DET_FIELDS = ("image_id", "category_id", "bbox", "score")


def _read_json(path, what: str):
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingPathError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CocoFormatError(f"{path}: not valid JSON ({e})") from e


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_box(box, path, where: str, field: str = "bbox") -> None:
    if not isinstance(box, (list, tuple)) or len(box) < 4 or not all(_is_number(v) for v in box[:4]):
        raise CocoFormatError(f"{path}: {where} field '{field}' must be [x, y, w, h] numbers, got {box!r}")


def person_category_id(data: dict) -> int:
    """Id of the category named "person" (COCO: 1); 1 when no category is named so."""
    for c in data.get("categories", []):
        if c.get("name") == "person":
            return int(c["id"])
    return 1


def validate_keypoint_annotations(data: Any, path, num_joints: int = NUM_JOINTS) -> None:
    """Check a COCO person-keypoint annotation JSON up front; raise ``CocoFormatError`` naming
    ``path``, the entry and the missing / malformed field."""
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: expected a JSON object with 'images', 'annotations', 'categories', "
                              f"got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise CocoFormatError(f"{path}: missing top-level field '{key}'")
        if not isinstance(data[key], list):
            raise CocoFormatError(f"{path}: top-level field '{key}' must be a list")
    for i, c in enumerate(data["categories"]):
        for f in ("id", "name"):
            if not isinstance(c, dict) or f not in c:
                raise CocoFormatError(f"{path}: categories[{i}] has no field '{f}'")
    image_ids = set()
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict):
            raise CocoFormatError(f"{path}: images[{i}] is not an object")
        for f in _IMAGE_FIELDS:
            if f not in im:
                raise CocoFormatError(f"{path}: images[{i}] (id={im.get('id')}) has no field '{f}'")
        image_ids.add(im["id"])
    person = person_category_id(data)
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict):
            raise CocoFormatError(f"{path}: annotations[{i}] is not an object")
        fields = _ANN_FIELDS + (_KPT_FIELDS if a.get("category_id") == person else ())
        for f in fields:
            if f not in a:
                raise CocoFormatError(f"{path}: annotations[{i}] (id={a.get('id')}) has no field '{f}'")
        where = f"annotations[{i}] (id={a['id']})"
        _check_box(a["bbox"], path, where)
        if a["image_id"] not in image_ids:
            raise CocoFormatError(f"{path}: {where} field 'image_id' = {a['image_id']} is not in 'images'")
        if a["category_id"] == person:
            k = a["keypoints"]
            if not isinstance(k, list) or len(k) != 3 * num_joints:
                raise CocoFormatError(f"{path}: {where} field 'keypoints' must be a list of {3 * num_joints} "
                                      f"numbers (x, y, v for {num_joints} joints), got length "
                                      f"{len(k) if isinstance(k, list) else type(k).__name__}")


def validate_detections(dets: Any, path) -> None:
    """Check a detector result file (list of {image_id, category_id, bbox, score})."""
    if not isinstance(dets, list):
        raise CocoFormatError(f"{path}: a detection file must be a JSON list of "
                              f"{{image_id, category_id, bbox, score}}, got {type(dets).__name__}")
    for i, d in enumerate(dets):
        if not isinstance(d, dict):
            raise CocoFormatError(f"{path}: detections[{i}] is not an object")
        for f in _DET_FIELDS:
            if f not in d:
                raise CocoFormatError(f"{path}: detections[{i}] has no field '{f}'")
        _check_box(d["bbox"], path, f"detections[{i}]")
        if not _is_number(d["score"]):
            raise CocoFormatError(f"{path}: detections[{i}] field 'score' must be a number")


def load_keypoint_annotations(ann_file) -> dict:
    """Read and validate a COCO keypoint annotation file."""
    data = _read_json(ann_file, "COCO keypoint annotation file")
    validate_keypoint_annotations(data, ann_file)
    return data


def load_detections(det_file) -> list:
    """Read and validate a person detection result file."""
    dets = _read_json(det_file, "detection file")
    validate_detections(dets, det_file)
    return dets


def _coco_from_dict(data: dict):
    import contextlib
    import io

    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


# --------------------------------------------------------------------------- dataset

class CocoKeypoints(Dataset):
    """Top-down COCO keypoint samples (see module docstring). Sizes are (h, w)."""

    num_joints = NUM_JOINTS
    flip_pairs = FLIP_PAIRS

    def __init__(self, ann_file, image_dir, train: bool, input_size=(256, 192), heatmap_size=(64, 48),
                 sigma: float = 2.0, det_file=None, det_score_thresh: float = 0.0, scale_factor: float = 1.25,
                 rot_factor: float = 45, scale_range=(0.65, 1.35), flip: bool = True, half_body_prob: float = 0.3,
                 half_body_joints: int = 8, use_gt_boxes: bool | None = None, skip_bad_images: bool = True,
                 rot_prob: float = 0.6, rot_max: float | None = None):
        self.ann_file = str(ann_file)
        self.image_dir = str(image_dir)
        self.train = bool(train)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.heatmap_size = (int(heatmap_size[0]), int(heatmap_size[1]))
        self.aspect_ratio = self.input_size[1] / self.input_size[0]
        self.sigma = float(sigma)
        self.det_file = None if det_file is None else str(det_file)
        self.det_score_thresh = float(det_score_thresh)
        self.scale_factor = float(scale_factor)
        self.rot_factor = float(rot_factor)
        self.rot_prob = float(rot_prob)
        self.rot_max = 2.0 * self.rot_factor if rot_max is None else float(rot_max)
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not lo <= 1.0 <= hi:
            raise ValueError(f"scale_range must contain 1, got {scale_range}")
        self.scale_range = (lo, hi)
        self.flip = bool(flip)
        self.half_body_prob = float(half_body_prob)
        self.half_body_joints = int(half_body_joints)
        self.skip_bad_images = bool(skip_bad_images)
        if use_gt_boxes is None:
            use_gt_boxes = self.train or self.det_file is None
        if self.train and not use_gt_boxes:
            raise ValueError("CocoKeypoints: training uses ground-truth boxes (use_gt_boxes=False needs train=False)")
        if not use_gt_boxes and self.det_file is None:
            raise ValueError("CocoKeypoints: use_gt_boxes=False needs a det_file")
        self.use_gt_boxes = bool(use_gt_boxes)
        if not os.path.isdir(self.image_dir):
            raise MissingPathError(f"COCO image directory not found: {self.image_dir}")

        data = load_keypoint_annotations(self.ann_file)
        self.person_id = person_category_id(data)
        coco = _coco_from_dict(data)
        self.images = {int(i): {"file_name": im["file_name"], "width": int(im["width"]), "height": int(im["height"])}
                       for i, im in coco.imgs.items()}
        self.image_ids = sorted(self.images)
        self.gt = self._load_gt(coco)  # image_id -> list of GT instances (train/val kernel)
        if self.use_gt_boxes:
            self.records = [r for img_id in self.image_ids for r in self.gt[img_id]]
        else:
            self.records = self._load_det(load_detections(self.det_file))
        self.skipped_images: list[str] = []
        self.num_bad_reads = 0
        self._check_image_files()
        log.info("CocoKeypoints(%s, train=%s): %d samples from %d images (%s boxes)", self.ann_file, self.train,
                 len(self.records), len({r["image_id"] for r in self.records}),
                 "GT" if self.use_gt_boxes else f"detector, {self.det_file}")

    # ------------------------------------------------------------------ loading
    def _load_gt(self, coco) -> dict[int, list[dict]]:
        out: dict[int, list[dict]] = {}
        crowd = zero_kpt = bad_box = 0
        for img_id in self.image_ids:
            im = self.images[img_id]
            width, height = im["width"], im["height"]
            recs = []
            for obj in coco.loadAnns(coco.getAnnIds(imgIds=img_id)):
                if int(obj["category_id"]) != self.person_id:
                    continue
                if obj["iscrowd"]:
                    crowd += 1
                    continue
                x, y, w, h = [float(v) for v in obj["bbox"][:4]]
                x1, y1 = max(0.0, x), max(0.0, y)
                x2 = min(width - 1.0, x1 + max(0.0, w - 1.0))
                y2 = min(height - 1.0, y1 + max(0.0, h - 1.0))
                if not (obj["area"] > 0 and x2 >= x1 and y2 >= y1):
                    bad_box += 1
                    continue
                kpts = np.asarray(obj["keypoints"], dtype=np.float32).reshape(NUM_JOINTS, 3)
                if kpts.max() == 0:
                    zero_kpt += 1
                    continue
                joints = np.zeros((NUM_JOINTS, 3), dtype=np.float32)
                joints[:, :2] = kpts[:, :2]
                joints[:, 2] = np.minimum(kpts[:, 2], 1.0)
                clean = [x1, y1, x2 - x1, y2 - y1]
                center, scale = box_to_center_scale(clean, self.aspect_ratio, self.scale_factor)
                recs.append({"image_id": img_id, "ann_id": int(obj["id"]), "box": np.asarray(clean, np.float32),
                             "center": center, "scale": scale, "score": 1.0, "joints": joints})
            out[img_id] = recs
        self.num_crowd, self.num_zero_keypoint, self.num_bad_box = crowd, zero_kpt, bad_box
        return out

    def _load_det(self, dets: list) -> list[dict]:
        recs, unknown, degenerate = [], 0, 0
        for d in dets:
            if int(d["category_id"]) != 1:
                continue
            if float(d["score"]) < self.det_score_thresh:
                continue
            img_id = int(d["image_id"])
            if img_id not in self.images:
                unknown += 1
                continue
            box = [float(v) for v in d["bbox"][:4]]
            if box[2] <= 0 or box[3] <= 0:
                degenerate += 1
                continue
            center, scale = box_to_center_scale(box, self.aspect_ratio, self.scale_factor)
            recs.append({"image_id": img_id, "ann_id": -1, "box": np.asarray(box, np.float32), "center": center,
                         "scale": scale, "score": float(d["score"]),
                         "joints": np.zeros((NUM_JOINTS, 3), dtype=np.float32)})
        if unknown:
            log.warning("%s: %d detections refer to images not in %s; ignored", self.det_file, unknown,
                        self.ann_file)
        if degenerate:
            log.warning("%s: %d detections with zero width or height; ignored", self.det_file, degenerate)
        recs.sort(key=lambda r: (r["image_id"], -r["score"]))
        return recs

    def image_path(self, image_id: int) -> str:
        return os.path.join(self.image_dir, self.images[int(image_id)]["file_name"])

    def _check_image_files(self) -> None:
        missing = []
        for img_id in sorted({r["image_id"] for r in self.records}):
            p = self.image_path(img_id)
            if not os.path.isfile(p) or os.path.getsize(p) == 0:
                missing.append((img_id, p))
        if not missing:
            return
        if not self.skip_bad_images:
            img_id, p = missing[0]
            raise MissingPathError(f"image file missing or empty: {p} (image id {img_id} in {self.ann_file}; "
                                    f"{len(missing)} such image(s); pass skip_bad_images=True to skip them)")
        bad = {i for i, _ in missing}
        before = len(self.records)
        self.records = [r for r in self.records if r["image_id"] not in bad]
        self.skipped_images = [p for _, p in missing]
        log.warning("CocoKeypoints: %d image file(s) missing or empty under %s (e.g. %s); skipped %d samples",
                    len(missing), self.image_dir, missing[0][1], before - len(self.records))

    def read_image(self, image_id: int) -> np.ndarray:
        """RGB uint8 (H, W, 3); ``FileNotFoundError`` / ``CocoImageError`` naming the path."""
        p = self.image_path(image_id)
        if not os.path.isfile(p):
            raise MissingPathError(f"image file not found: {p} (image id {image_id} in {self.ann_file})")
        img = cv2.imread(p, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        if img is None:
            raise CocoImageError(f"cannot decode image {p} (corrupt or not an image; image id {image_id})")
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)

    # ------------------------------------------------------------------ samples
    def __len__(self) -> int:
        return len(self.records)

    def gt_instances(self, image_id: int) -> list[dict]:
        """GT instances of an image (the train kernel: non-crowd, labelled), image coordinates."""
        return self.gt.get(int(image_id), [])

    def crop_transform(self, center, scale, rotation: float = 0.0) -> np.ndarray:
        """Image -> input crop affine (2x3)."""
        return get_affine_transform(center, scale, rotation, (self.input_size[1], self.input_size[0]))

    def render_target(self, joints_crop, vis) -> tuple[np.ndarray, np.ndarray]:
        """Target heatmaps and weights for joints given in crop pixels (the dataset's own target generation)."""
        return generate_target(joints_crop, vis, self.input_size, self.heatmap_size, self.sigma)

    def _half_body(self, joints: np.ndarray, vis: np.ndarray, rng: np.random.Generator):
        upper, lower = [], []
        for j in range(NUM_JOINTS):
            if vis[j] > 0:
                (upper if j in UPPER_BODY_IDS else lower).append(joints[j])
        # np.random.randn() < 0.5 (not rand) as in HRNet: the upper body is picked ~69% of the time
        if rng.standard_normal() < 0.5 and len(upper) > 2:
            sel = upper
        else:
            sel = lower if len(lower) > 2 else upper
        if len(sel) < 2:
            return None, None
        sel = np.asarray(sel, dtype=np.float32)
        center = sel.mean(axis=0)[:2]
        lt, rb = sel.min(axis=0), sel.max(axis=0)
        w, h = rb[0] - lt[0], rb[1] - lt[1]
        if w > self.aspect_ratio * h:
            h = w / self.aspect_ratio
        elif w < self.aspect_ratio * h:
            w = h * self.aspect_ratio
        scale = np.array([w / PIXEL_STD, h / PIXEL_STD], dtype=np.float32) * 1.5
        return center, scale

    def _augment(self, img, center, scale, joints, vis, rng):
        rot, flipped = 0.0, False
        if vis.sum() > self.half_body_joints and rng.random() < self.half_body_prob:
            c_hb, s_hb = self._half_body(joints, vis, rng)
            if c_hb is not None:
                center, scale = c_hb, s_hb
        lo, hi = self.scale_range
        sf = (hi - lo) / 2.0
        scale = scale * np.clip(rng.standard_normal() * sf + 1.0, lo, hi)
        if rng.random() <= self.rot_prob:
            rot = float(np.clip(rng.standard_normal() * self.rot_factor, -self.rot_max, self.rot_max))
        if self.flip and rng.random() <= 0.5:
            img = cv2.flip(img, 1)
            width = img.shape[1]
            joints, vis = fliplr_joints(joints, vis, width, FLIP_PAIRS)
            center = center.copy()
            center[0] = width - center[0] - 1
            flipped = True
        return img, center.astype(np.float32), scale.astype(np.float32), rot, joints, vis, flipped

    def _rng(self) -> np.random.Generator:
        # torch's generator is seeded per DataLoader worker and by torch.manual_seed
        return np.random.default_rng(int(torch.randint(0, 2 ** 62, ()).item()))

    def __getitem__(self, index: int):
        global _WORKER_CV2_THREADS_SET
        if not _WORKER_CV2_THREADS_SET and torch.utils.data.get_worker_info() is not None:
            cv2.setNumThreads(1)  # DataLoader workers: no OpenCV thread pool per worker (oversubscription)
            _WORKER_CV2_THREADS_SET = True
        index = int(index)
        rec = self.records[index]
        valid = True
        try:
            img = self.read_image(rec["image_id"])
        except (FileNotFoundError, CocoImageError) as e:
            if not self.skip_bad_images:
                raise
            self.num_bad_reads += 1
            log.warning("%s; %s", e, "using another sample" if self.train else "sample marked invalid")
            if self.train and len(self.records) > 1:
                return self[(index + 1 + int(self._rng().integers(len(self.records) - 1))) % len(self.records)]
            info = self.images[rec["image_id"]]
            img = np.zeros((info["height"], info["width"], 3), np.uint8)
            valid = False
        center, scale = rec["center"].copy(), rec["scale"].copy()
        joints, vis = rec["joints"][:, :2].copy(), rec["joints"][:, 2].copy()
        rot, flipped = 0.0, False
        if self.train:
            img, center, scale, rot, joints, vis, flipped = self._augment(img, center, scale, joints, vis,
                                                                          self._rng())
        in_h, in_w = self.input_size
        trans = self.crop_transform(center, scale, rot)
        crop = cv2.warpAffine(img, trans, (in_w, in_h), flags=cv2.INTER_LINEAR)
        lab = vis > 0
        joints_crop = np.zeros_like(joints)
        if lab.any():
            joints_crop[lab] = affine_transform(joints[lab], trans)
        target, target_weight = self.render_target(joints_crop, vis)
        x = crop.astype(np.float32) / 255.0
        x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
        image = torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
        meta = {
            "image_id": torch.tensor(rec["image_id"], dtype=torch.int64),
            "center": torch.from_numpy(np.asarray(center, np.float32)),
            "scale": torch.from_numpy(np.asarray(scale, np.float32)),
            "rotation": torch.tensor(rot, dtype=torch.float32),
            "score": torch.tensor(rec["score"], dtype=torch.float32),
            "area": torch.tensor(float(np.prod(np.asarray(scale, np.float64) * PIXEL_STD)), dtype=torch.float32),
            "index": torch.tensor(index, dtype=torch.int64),
            "flipped": torch.tensor(flipped),
            "valid": torch.tensor(valid),
            "joints": torch.from_numpy(np.concatenate([joints_crop, lab[:, None].astype(np.float32)], 1)
                                       .astype(np.float32)),
        }
        return image, torch.from_numpy(target), torch.from_numpy(target_weight), meta

    def evaluator(self, **kwargs) -> KeypointEvaluator:
        """A ``KeypointEvaluator`` bound to this dataset's annotation file."""
        return KeypointEvaluator(self.ann_file, **kwargs)


# --------------------------------------------------------------------------- builders

LAYOUT = ("expected layout under data.root: annotations/person_keypoints_train2017.json, "
          "annotations/person_keypoints_val2017.json, train2017/, val2017/ "
          "(or set data.train_ann, data.train_images, data.val_ann, data.val_images)")

_TRAIN_ONLY = {"rot_factor", "scale_range", "flip", "half_body_prob", "half_body_joints", "rot_prob", "rot_max"}
_VAL_ONLY = {"det_score_thresh", "use_gt_boxes"}
_COMMON = {"scale_factor", "skip_bad_images"}


def _resolve(path, root, default_rel: str, what: str, key: str, is_dir: bool) -> Path:
    if path is None:
        if root is None:
            raise MissingPathError(f"COCO keypoints: no {what} given: set data.{key} or data.root ({LAYOUT})")
        p = Path(root) / default_rel
    else:
        p = Path(os.path.expanduser(os.fspath(path)))
        if not p.is_absolute() and not p.exists() and root is not None and (Path(root) / p).exists():
            p = Path(root) / p
    ok = p.is_dir() if is_dir else p.is_file()
    if not ok:
        src = f"data.{key}" if path is not None else f"data.root={root}"
        raise MissingPathError(f"COCO keypoints: {what} not found: {p} (from {src}); {LAYOUT}")
    return p


def resolve_coco_paths(split: str, root=None, ann=None, images=None) -> tuple[Path, Path]:
    """(annotation file, image dir) for ``split`` in {"train", "val"}; relative overrides are
    tried as given, then under ``root``. Raises ``FileNotFoundError`` naming the path and the layout."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = None if root is None else Path(os.path.expanduser(os.fspath(root)))
    ann_p = _resolve(ann, root, f"annotations/person_keypoints_{split}2017.json", f"{split} annotation file",
                     f"{split}_ann", is_dir=False)
    img_p = _resolve(images, root, f"{split}2017", f"{split} image directory", f"{split}_images", is_dir=True)
    return ann_p, img_p


def build_coco_dataset(split: str, root=None, ann=None, images=None, det_file=None, input_size=(256, 192),
                       heatmap_size=(64, 48), sigma: float = 2.0, **kwargs) -> CocoKeypoints:
    """One split; ``split == "train"`` enables augmentation, ``det_file`` is used for "val" only."""
    allowed = _COMMON | (_TRAIN_ONLY if split == "train" else _VAL_ONLY)
    unknown = set(kwargs) - _COMMON - _TRAIN_ONLY - _VAL_ONLY
    if unknown:
        raise TypeError(f"build_coco_dataset: unknown option(s) {sorted(unknown)}; valid: "
                        f"{sorted(_COMMON | _TRAIN_ONLY | _VAL_ONLY)}")
    kw = {k: v for k, v in kwargs.items() if k in allowed and v is not None}
    ann_p, img_p = resolve_coco_paths(split, root, ann, images)
    det_p = None
    if split == "val" and det_file not in (None, ""):
        det_p = Path(os.path.expanduser(os.fspath(det_file)))
        if not det_p.is_absolute() and not det_p.exists() and root is not None and (Path(root) / det_p).exists():
            det_p = Path(root) / det_p
        if not det_p.is_file():
            raise MissingPathError(f"COCO keypoints: detection file not found: {det_p} (from data.det_file)")
    return CocoKeypoints(ann_p, img_p, train=(split == "train"), input_size=tuple(input_size),
                         heatmap_size=tuple(heatmap_size), sigma=sigma, det_file=det_p, **kw)


def build_coco_datasets(root=None, train_ann=None, train_images=None, val_ann=None, val_images=None, det_file=None,
                        input_size=(256, 192), heatmap_size=(64, 48), sigma: float = 2.0,
                        **aug) -> tuple[CocoKeypoints, CocoKeypoints]:
    """(train_ds, val_ds) from ``root`` (standard COCO layout) and/or explicit paths.

    ``aug``: CocoKeypoints options (rot_factor, scale_range, flip, half_body_prob,
    half_body_joints, rot_prob, rot_max go to train; det_score_thresh, use_gt_boxes to val;
    scale_factor, skip_bad_images to both; None values are ignored).
    """
    train = build_coco_dataset("train", root, train_ann, train_images, None, input_size, heatmap_size, sigma, **aug)
    val = build_coco_dataset("val", root, val_ann, val_images, det_file, input_size, heatmap_size, sigma, **aug)
    return train, val


# --------------------------------------------------------------------------- codec check

def _box_iou(a, b) -> float:
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0.0, min(ax2, bx2) - max(a[0], b[0]))
    ih = max(0.0, min(ay2, by2) - max(a[1], b[1]))
    inter = iw * ih
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def codec_check(dataset: CocoKeypoints, flip: bool = True, read_images: bool = True, match_iou: float = 0.5,
                out_json=None, batch_size: int = 64) -> dict:
    """Ground-truth heatmaps through the exact test-time path; returns ``evaluate_predictions`` metrics.

    For each evaluation sample, the GT keypoints (GT-box samples: their own instance;
    detector boxes: the GT instance of that image with the highest box IoU >= ``match_iou``,
    else none) are mapped into the sample's crop and rendered with the dataset's target
    generation. With ``flip``, the "prediction on the mirrored crop" is the target rendered
    from the mirrored crop's joints, and goes through flip_back + shift + average. Then
    decode, rescoring, OKS-NMS and COCOeval, as for a model. ``read_images`` also runs
    ``dataset[i]`` (image read + warp) and, for GT boxes, checks its target equals ours.
    """
    if dataset.train:
        raise ValueError("codec_check needs an evaluation dataset (train=False)")
    ev = dataset.evaluator()
    in_w = dataset.input_size[1]
    heat, metas = [], []

    def flush():
        if heat:
            meta = {k: torch.stack([m[k] for m in metas]) for k in metas[0]}
            ev.update(np.stack(heat), meta)
            heat.clear()
            metas.clear()

    matched = 0
    for i, rec in enumerate(dataset.records):
        if dataset.use_gt_boxes:
            joints_img = rec["joints"]
        else:
            best, best_iou = None, match_iou
            for g in dataset.gt_instances(rec["image_id"]):
                iou = _box_iou(rec["box"], g["box"])
                if iou >= best_iou:
                    best, best_iou = g, iou
            joints_img = best["joints"] if best is not None else np.zeros((NUM_JOINTS, 3), np.float32)
            matched += best is not None
        vis = joints_img[:, 2].copy()
        lab = vis > 0
        trans = dataset.crop_transform(rec["center"], rec["scale"])
        jc = np.zeros((NUM_JOINTS, 2), np.float32)
        if lab.any():
            jc[lab] = affine_transform(joints_img[lab, :2], trans)
        target, _ = dataset.render_target(jc, vis)
        if read_images:
            _, t_ds, _, meta = dataset[i]
            if dataset.use_gt_boxes and not np.allclose(t_ds.numpy(), target):
                raise AssertionError(f"codec_check: dataset target of sample {i} differs from the rendered one")
        else:
            meta = {"image_id": torch.tensor(rec["image_id"]), "center": torch.from_numpy(rec["center"]),
                    "scale": torch.from_numpy(rec["scale"]), "score": torch.tensor(rec["score"]),
                    "index": torch.tensor(i), "valid": torch.tensor(True)}
        meta = {k: meta[k] for k in ("image_id", "center", "scale", "score", "index", "valid")}
        h = target
        if flip:
            jf, vf = fliplr_joints(jc, vis, in_w, FLIP_PAIRS)
            target_f, _ = dataset.render_target(jf, vf)
            h = flip_average(target[None], target_f[None])[0]
        heat.append(h.astype(np.float32))
        metas.append(meta)
        if len(heat) >= batch_size:
            flush()
    flush()
    metrics = ev.compute(out_json=out_json)
    metrics["num_samples"] = len(dataset)
    if not dataset.use_gt_boxes:
        metrics["num_matched"] = matched
    return metrics

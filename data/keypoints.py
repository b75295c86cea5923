"""COCO single-person (top-down) keypoint codec and evaluation.

Pure numpy / torch / OpenCV / pycocotools; no Hydra. Everything here follows the
procedure of Simple Baselines (Xiao et al. 2018) and HRNet (Sun et al. 2019), which
the DY-ReLU paper (Chen et al., ECCV 2020, Sec. 5.3) uses for COCO keypoints:

* box -> crop: ``box_to_center_scale`` (aspect w/h = 192/256, x1.25, scale in units
  of ``PIXEL_STD`` = 200 px as in HRNet's ``_box2cs``), ``get_affine_transform``;
* Gaussian targets: ``generate_target`` (sigma 2, 64x48; weight 0 for unlabelled joints
  and joints whose 3-sigma window falls completely outside the map);
* test: ``flip_test_average`` (flip the crop, ``flip_back``, shift one pixel right,
  average), ``decode_heatmaps`` (argmax, quarter offset toward the higher neighbour,
  inverse affine), rescoring, ``oks_nms`` at 0.9 per image, ``evaluate_coco``
  (pycocotools ``COCOeval(iouType="keypoints")``), all in ``evaluate_predictions``.

Conventions: a heatmap pixel index ``j`` corresponds to crop pixel ``j * stride``
(stride = input / heatmap = 4); coordinates are (x, y); image sizes are (h, w) in the
public signatures of this project and (w, h) only where OpenCV needs them (noted).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections import defaultdict
from typing import Callable, Iterable, Sequence

import cv2
import numpy as np
import torch

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- constants

NUM_JOINTS = 17
JOINT_NAMES = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
UPPER_BODY_IDS = tuple(range(0, 11))
LOWER_BODY_IDS = tuple(range(11, 17))
# COCO OKS per-keypoint sigmas (pycocotools' kpt_oks_sigmas).
OKS_SIGMAS = np.array(
    [.026, .025, .025, .035, .035, .079, .079, .072, .072, .062, .062, .107, .107, .087, .087, .089, .089],
    dtype=np.float64,
)
# COCO skeleton, 1-based as in the annotation files' categories[].skeleton.
SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8),
    (7, 9), (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)
PIXEL_STD = 200.0  # HRNet's unit of "scale": scale = box size / 200
BOX_SCALE_FACTOR = 1.25  # box enlargement before cropping
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IN_VIS_THRESH = 0.2  # joints with score above this enter the rescoring mean
OKS_THRESH = 0.9  # OKS-NMS threshold
METRIC_NAMES = ("ap", "ap50", "ap75", "apm", "apl", "ar", "ar50", "ar75", "arm", "arl")


def flip_permutation(num_joints: int = NUM_JOINTS, flip_pairs: Iterable[Sequence[int]] = FLIP_PAIRS) -> np.ndarray:
    """Index array ``perm`` with ``flipped[:, j] = original[:, perm[j]]`` (swaps each pair)."""
    perm = np.arange(num_joints)
    for a, b in flip_pairs:
        perm[a], perm[b] = b, a
    return perm


# --------------------------------------------------------------------------- geometry

def box_to_center_scale(box, aspect_ratio: float = 192 / 256, scale_factor: float = BOX_SCALE_FACTOR,
                        pixel_std: float = PIXEL_STD) -> tuple[np.ndarray, np.ndarray]:
    """COCO box ``[x, y, w, h]`` -> (center (2,), scale (2,)) as HRNet's ``_box2cs``.

    ``aspect_ratio`` is crop width / height (192/256). The shorter side is widened to
    that aspect, then both are multiplied by ``scale_factor``; scale is in units of
    ``pixel_std`` px (so the crop covers ``scale * pixel_std`` image pixels).
    """
    x, y, w, h = [float(v) for v in box[:4]]
    center = np.array([x + w * 0.5, y + h * 0.5], dtype=np.float32)
    if w > aspect_ratio * h:
        h = w * 1.0 / aspect_ratio
    elif w < aspect_ratio * h:
        w = h * aspect_ratio
    scale = np.array([w / pixel_std, h / pixel_std], dtype=np.float32) * scale_factor
    return center, scale


def _rotate_point(pt, rot_rad: float) -> np.ndarray:
    sn, cs = math.sin(rot_rad), math.cos(rot_rad)
    return np.array([pt[0] * cs - pt[1] * sn, pt[0] * sn + pt[1] * cs], dtype=np.float32)


def _third_point(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = a - b
    return b + np.array([-d[1], d[0]], dtype=np.float32)


def get_affine_transform(center, scale, rot: float, output_size, shift=(0.0, 0.0), inv: bool = False,
                         pixel_std: float = PIXEL_STD) -> np.ndarray:
    """2x3 affine matrix mapping image pixels to the crop (``inv``: crop -> image).

    Identical to HRNet's ``get_affine_transform``: ``output_size`` is **(w, h)** (OpenCV
    order); ``scale`` (2,) in ``pixel_std`` units, only its width is used (the aspect
    was fixed by ``box_to_center_scale``); ``rot`` in degrees, counter-clockwise
    positive in the image as OpenCV displays it (y down).
    """
    scale = np.asarray(scale, dtype=np.float32)
    if scale.ndim == 0:
        scale = np.array([scale, scale], dtype=np.float32)
    center = np.asarray(center, dtype=np.float32)
    shift = np.asarray(shift, dtype=np.float32)
    scale_tmp = scale * pixel_std
    src_w = scale_tmp[0]
    dst_w, dst_h = float(output_size[0]), float(output_size[1])
    rot_rad = np.pi * rot / 180.0
    src_dir = _rotate_point([0.0, src_w * -0.5], rot_rad)
    dst_dir = np.array([0.0, dst_w * -0.5], dtype=np.float32)
    src = np.zeros((3, 2), dtype=np.float32)
    dst = np.zeros((3, 2), dtype=np.float32)
    src[0] = center + scale_tmp * shift
    src[1] = center + src_dir + scale_tmp * shift
    dst[0] = [dst_w * 0.5, dst_h * 0.5]
    dst[1] = dst[0] + dst_dir
    src[2] = _third_point(src[0], src[1])
    dst[2] = _third_point(dst[0], dst[1])
    if inv:
        return cv2.getAffineTransform(dst, src)
    return cv2.getAffineTransform(src, dst)


def affine_transform(points, trans: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine to points (..., 2)."""
    pts = np.asarray(points, dtype=np.float64)
    out = pts @ trans[:, :2].T.astype(np.float64) + trans[:, 2].astype(np.float64)
    return out


def transform_preds(coords, center, scale, heatmap_size_wh) -> np.ndarray:
    """Heatmap coordinates (K, 2) -> image pixels through the inverse affine of the crop."""
    trans = get_affine_transform(center, scale, 0, heatmap_size_wh, inv=True)
    return affine_transform(np.asarray(coords)[:, :2], trans)


def fliplr_joints(joints, joints_vis, width: float, flip_pairs=FLIP_PAIRS) -> tuple[np.ndarray, np.ndarray]:
    """Mirror joints (K, 2|3) for an image of ``width`` px: x -> width - 1 - x, swap pairs.

    As HRNet's ``fliplr_joints``: returns (joints * vis, vis) so unlabelled joints stay at 0.
    ``joints_vis`` may be (K,) or (K, n) (its first column is the flag).
    """
    joints = np.array(joints, dtype=np.float32, copy=True)
    vis = np.array(joints_vis, dtype=np.float32, copy=True)
    joints[:, 0] = width - joints[:, 0] - 1
    perm = flip_permutation(joints.shape[0], flip_pairs)
    joints, vis = joints[perm], vis[perm]
    mask = vis.reshape(vis.shape[0], -1)[:, :1] if vis.ndim > 1 else vis[:, None]
    return joints * mask, vis


# --------------------------------------------------------------------------- targets

def generate_target(joints, joints_vis, input_size=(256, 192), heatmap_size=(64, 48),
                    sigma: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian heatmaps exactly as HRNet's ``generate_target`` (target_type gaussian).

    joints: (K, >=2) in crop pixels; joints_vis: (K,) or (K, >=1), > 0 means labelled.
    Sizes are (h, w). Returns target (K, hm_h, hm_w) float32 and target_weight (K, 1)
    float32: 1 for labelled joints whose 3-sigma window touches the map, else 0.
    """
    joints = np.asarray(joints, dtype=np.float32)
    vis = np.asarray(joints_vis, dtype=np.float32).reshape(joints.shape[0], -1)[:, 0]
    num = joints.shape[0]
    in_h, in_w = int(input_size[0]), int(input_size[1])
    hm_h, hm_w = int(heatmap_size[0]), int(heatmap_size[1])
    stride_x, stride_y = in_w / hm_w, in_h / hm_h
    target_weight = (vis > 0).astype(np.float32).reshape(num, 1)
    target = np.zeros((num, hm_h, hm_w), dtype=np.float32)
    tmp_size = sigma * 3
    size = int(2 * tmp_size + 1)
    x = np.arange(0, size, 1, np.float32)
    y = x[:, None]
    x0 = y0 = size // 2
    g = np.exp(-((x - x0) ** 2 + (y - y0) ** 2) / (2 * sigma ** 2))
    for j in range(num):
        if target_weight[j, 0] <= 0.5:
            continue
        # int() truncates toward zero, as in the reference implementation
        mu_x = int(joints[j, 0] / stride_x + 0.5)
        mu_y = int(joints[j, 1] / stride_y + 0.5)
        ul = [int(mu_x - tmp_size), int(mu_y - tmp_size)]
        br = [int(mu_x + tmp_size + 1), int(mu_y + tmp_size + 1)]
        if ul[0] >= hm_w or ul[1] >= hm_h or br[0] < 0 or br[1] < 0:
            target_weight[j, 0] = 0.0
            continue
        g_x = max(0, -ul[0]), min(br[0], hm_w) - ul[0]
        g_y = max(0, -ul[1]), min(br[1], hm_h) - ul[1]
        img_x = max(0, ul[0]), min(br[0], hm_w)
        img_y = max(0, ul[1]), min(br[1], hm_h)
        target[j, img_y[0]:img_y[1], img_x[0]:img_x[1]] = g[g_y[0]:g_y[1], g_x[0]:g_x[1]]
    return target, target_weight


# --------------------------------------------------------------------------- test time

def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def flip_back(heatmaps, flip_pairs=FLIP_PAIRS):
    """Heatmaps predicted on a mirrored crop -> heatmaps of the original crop.

    Reverses the width axis and swaps the left/right channels. Accepts a numpy array or
    a torch tensor of shape (N, K, H, W) and returns the same type (a new array).
    """
    if heatmaps.ndim != 4:
        raise ValueError(f"flip_back expects (N, K, H, W) heatmaps, got shape {tuple(heatmaps.shape)}")
    perm = flip_permutation(heatmaps.shape[1], flip_pairs)
    if isinstance(heatmaps, torch.Tensor):
        return heatmaps.flip(-1)[:, torch.as_tensor(perm, device=heatmaps.device)]
    return np.ascontiguousarray(np.asarray(heatmaps)[:, perm, :, ::-1])


def shift_right(heatmaps):
    """Shift heatmaps one pixel right (column j <- j-1; column 0 kept), as HRNet's SHIFT_HEATMAP."""
    out = heatmaps.clone() if isinstance(heatmaps, torch.Tensor) else np.array(heatmaps, copy=True)
    out[..., 1:] = heatmaps[..., :-1]
    return out


def flip_average(heatmaps, heatmaps_of_flipped, flip_pairs=FLIP_PAIRS, shift: bool = True):
    """Average heatmaps with those predicted on the mirrored crop (flipped back, shifted)."""
    back = flip_back(heatmaps_of_flipped, flip_pairs)
    if shift:
        back = shift_right(back)
    return (heatmaps + back) * 0.5


def flip_test_average(model_fn: Callable, images: torch.Tensor, flip_pairs=FLIP_PAIRS,
                      shift: bool = True) -> torch.Tensor:
    """Flip test: ``(f(x) + shift(flip_back(f(flip(x))))) / 2``.

    ``model_fn`` maps images (N, 3, H, W) to heatmaps (N, K, h, w) (a list/tuple of
    outputs is allowed; its last element is used, as for multi-stage networks).
    """
    def _run(x):
        out = model_fn(x)
        if isinstance(out, (list, tuple)):
            out = out[-1]
        return out

    heat = _run(images)
    heat_f = _run(torch.flip(images, dims=[3]))
    return flip_average(heat, heat_f, flip_pairs, shift)


def get_max_preds(heatmaps) -> tuple[np.ndarray, np.ndarray]:
    """Argmax of each heatmap: coords (N, K, 2) in heatmap pixels (x, y), maxvals (N, K, 1).

    Joints whose maximum is <= 0 get coords (0, 0), as in the reference.
    """
    hm = _to_numpy(heatmaps)
    if hm.ndim != 4:
        raise ValueError(f"heatmaps must be (N, K, H, W), got shape {hm.shape}")
    n, k, _, w = hm.shape
    flat = hm.reshape(n, k, -1)
    idx = np.argmax(flat, axis=2).reshape(n, k, 1)
    maxvals = np.amax(flat, axis=2).reshape(n, k, 1)
    preds = np.tile(idx, (1, 1, 2)).astype(np.float32)
    preds[:, :, 0] = preds[:, :, 0] % w
    preds[:, :, 1] = np.floor(preds[:, :, 1] / w)
    preds *= np.tile(maxvals > 0.0, (1, 1, 2)).astype(np.float32)
    return preds, maxvals.astype(np.float32)


def decode_heatmaps(heatmaps, centers, scales, post_process: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps (N, K, h, w) -> (coords (N, K, 2) in image pixels, maxvals (N, K, 1)).

    HRNet's ``get_final_preds``: argmax; then (``post_process``) a quarter heatmap
    pixel toward the higher neighbour in x and in y, for peaks with ``1 < px < w-1`` and
    ``1 < py < h-1`` (the reference's exact bounds); then the inverse crop affine of
    each sample's ``centers`` (N, 2) / ``scales`` (N, 2).
    """
    hm = _to_numpy(heatmaps).astype(np.float32)
    centers = _to_numpy(centers).astype(np.float32).reshape(-1, 2)
    scales = _to_numpy(scales).astype(np.float32).reshape(-1, 2)
    coords, maxvals = get_max_preds(hm)
    n, k, h, w = hm.shape
    if centers.shape[0] != n or scales.shape[0] != n:
        raise ValueError(f"decode_heatmaps: {n} heatmaps but {centers.shape[0]} centers / {scales.shape[0]} scales")
    if post_process:
        px = np.floor(coords[..., 0] + 0.5).astype(np.int64)
        py = np.floor(coords[..., 1] + 0.5).astype(np.int64)
        ok = (px > 1) & (px < w - 1) & (py > 1) & (py < h - 1)
        ni, ki = np.nonzero(ok)
        if ni.size:
            x, y = px[ni, ki], py[ni, ki]
            dx = hm[ni, ki, y, x + 1] - hm[ni, ki, y, x - 1]
            dy = hm[ni, ki, y + 1, x] - hm[ni, ki, y - 1, x]
            coords[ni, ki, 0] += np.sign(dx) * 0.25
            coords[ni, ki, 1] += np.sign(dy) * 0.25
    preds = np.zeros((n, k, 2), dtype=np.float64)
    for i in range(n):
        preds[i] = transform_preds(coords[i], centers[i], scales[i], (w, h))
    return preds.astype(np.float32), maxvals


# --------------------------------------------------------------------------- rescoring, NMS

def rescore(box_score: float, joint_scores, in_vis_thresh: float = IN_VIS_THRESH) -> float:
    """Box score x mean of the joint scores above ``in_vis_thresh`` (0 if none is)."""
    s = np.asarray(joint_scores, dtype=np.float64).reshape(-1)
    s = s[s > in_vis_thresh]
    return float(box_score) * (float(s.mean()) if s.size else 0.0)


def oks_iou(g, d, area_g: float, area_d, sigmas=None, in_vis_thresh=None) -> np.ndarray:
    """OKS between one pose ``g`` (K*3 flat or (K,3)) and poses ``d`` (M, K*3), as HRNet's ``oks_iou``.

    The scale is the mean of the two areas. ``in_vis_thresh``: when given, only joints
    scored above it in both poses count (HRNet writes ``list(a) and list(b)``, which
    keeps only the second mask; we use the intended logical and; the default None,
    which HRNet's evaluation uses, is unaffected).
    """
    sigmas = OKS_SIGMAS if sigmas is None else np.asarray(sigmas, dtype=np.float64)
    var = (sigmas * 2) ** 2
    g = np.asarray(g, dtype=np.float64).reshape(-1)
    d = np.asarray(d, dtype=np.float64).reshape(len(area_d), g.size)
    xg, yg, vg = g[0::3], g[1::3], g[2::3]
    ious = np.zeros(d.shape[0])
    for n in range(d.shape[0]):
        xd, yd, vd = d[n, 0::3], d[n, 1::3], d[n, 2::3]
        e = ((xd - xg) ** 2 + (yd - yg) ** 2) / var / ((area_g + area_d[n]) / 2 + np.spacing(1)) / 2
        if in_vis_thresh is not None:
            e = e[(vg > in_vis_thresh) & (vd > in_vis_thresh)]
        ious[n] = np.sum(np.exp(-e)) / e.shape[0] if e.shape[0] != 0 else 0.0
    return ious


def oks_nms(kpts_db: Sequence[dict], thresh: float = OKS_THRESH, sigmas=None, in_vis_thresh=None) -> list[int]:
    """Greedy OKS-NMS over the poses of ONE image; returns kept indices, best first.

    Each entry: {"keypoints": (K, 3) or K*3, "score": float, "area": float}. A pose is
    suppressed when its OKS with a kept, higher-scored pose is > ``thresh``.
    """
    if len(kpts_db) == 0:
        return []
    scores = np.array([float(k["score"]) for k in kpts_db])
    kpts = np.array([np.asarray(k["keypoints"], dtype=np.float64).reshape(-1) for k in kpts_db])
    areas = np.array([float(k["area"]) for k in kpts_db])
    order = scores.argsort(kind="stable")[::-1]
    keep: list[int] = []
    while order.size > 0:
        i = int(order[0])
        keep.append(i)
        ovr = oks_iou(kpts[i], kpts[order[1:]], areas[i], areas[order[1:]], sigmas, in_vis_thresh)
        order = order[np.where(ovr <= thresh)[0] + 1]
    return keep


# --------------------------------------------------------------------------- evaluation

_GT_CACHE: dict = {}


def load_coco_gt(ann_file):
    """pycocotools COCO for ``ann_file`` (cached by path, size and mtime; prints silenced)."""
    from pycocotools.coco import COCO

    path = os.path.abspath(os.fspath(ann_file))
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _GT_CACHE:
        with contextlib.redirect_stdout(io.StringIO()):
            _GT_CACHE.clear()
            _GT_CACHE[key] = COCO(path)
    return _GT_CACHE[key]


def _zero_metrics() -> dict:
    return {k: 0.0 for k in METRIC_NAMES}


def evaluate_coco(predictions: list[dict], ann_file, out_json=None, image_ids=None) -> dict:
    """COCO keypoint AP of result dicts ``{image_id, category_id, keypoints (K*3), score}``.

    Uses ``COCOeval(gt, dt, "keypoints")`` over all images of ``ann_file`` (or
    ``image_ids``); pycocotools' prints are captured and logged at INFO. Returns
    {ap, ap50, ap75, apm, apl, ar, ar50, ar75, arm, arl} in percent (floats).
    ``out_json``: where to write the results file (the usual ``keypoints_val2017_results.json``).
    """
    from pycocotools.cocoeval import COCOeval

    preds = [
        {"image_id": int(p["image_id"]), "category_id": int(p.get("category_id", 1)),
         "keypoints": [float(v) for v in np.asarray(p["keypoints"]).reshape(-1)], "score": float(p["score"])}
        for p in predictions
    ]
    if out_json is not None:
        os.makedirs(os.path.dirname(os.path.abspath(os.fspath(out_json))), exist_ok=True)
        with open(out_json, "w") as f:
            json.dump(preds, f)
    if not preds:
        log.warning("evaluate_coco: no predictions; all metrics are 0")
        return _zero_metrics()
    gt = load_coco_gt(ann_file)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        dt = gt.loadRes(preds)
        ev = COCOeval(gt, dt, "keypoints")
        ev.params.useSegm = None
        if image_ids is not None:
            ev.params.imgIds = sorted({int(i) for i in image_ids})
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    log.debug("COCOeval(keypoints) on %s:\n%s", ann_file, buf.getvalue().rstrip())
    stats = [max(float(s), 0.0) * 100.0 for s in ev.stats[:10]]  # -1 (no GT in a range) -> 0
    return dict(zip(METRIC_NAMES, stats))


def evaluate_predictions(all_preds, all_boxes, image_ids, ann_file, oks_thresh: float = OKS_THRESH,
                         in_vis_thresh: float = IN_VIS_THRESH, out_json=None, valid=None,
                         sigmas=None) -> dict:
    """Rescoring + per-image OKS-NMS + COCOeval, as HRNet's ``COCODataset.evaluate``.

    all_preds: (N, K, 3) image-pixel x, y and joint score (``decode_heatmaps`` coords and
    maxvals). all_boxes: (N, 6) ``[cx, cy, sw, sh, area, score]`` from the samples' meta
    (area = ``prod(scale * 200)``, score = box score, 1 for GT boxes). image_ids: (N,).
    valid: optional (N,) mask; False rows (unreadable images) are dropped.
    Returns the ``evaluate_coco`` dict (percent) plus ``num_poses`` (after NMS).
    """
    all_preds = _to_numpy(all_preds).astype(np.float64)
    all_boxes = _to_numpy(all_boxes).astype(np.float64).reshape(-1, 6)
    image_ids = _to_numpy(image_ids).astype(np.int64).reshape(-1)
    if not (all_preds.shape[0] == all_boxes.shape[0] == image_ids.shape[0]):
        raise ValueError(f"evaluate_predictions: {all_preds.shape[0]} poses, {all_boxes.shape[0]} boxes, "
                         f"{image_ids.shape[0]} image ids")
    keep_rows = np.ones(len(image_ids), bool) if valid is None else _to_numpy(valid).astype(bool).reshape(-1)
    per_image: dict[int, list[dict]] = defaultdict(list)
    for i in np.nonzero(keep_rows)[0]:
        per_image[int(image_ids[i])].append({
            "keypoints": all_preds[i], "area": all_boxes[i, 4],
            "score": rescore(all_boxes[i, 5], all_preds[i, :, 2], in_vis_thresh),
        })
    results = []
    for img_id, poses in per_image.items():
        keep = oks_nms(poses, oks_thresh, sigmas=sigmas)
        kept = [poses[k] for k in keep] if keep else poses
        for p in kept:
            results.append({"image_id": img_id, "category_id": 1,
                            "keypoints": p["keypoints"].reshape(-1).tolist(), "score": p["score"]})
    metrics = evaluate_coco(results, ann_file, out_json=out_json)
    metrics["num_poses"] = len(results)
    return metrics


def boxes_from_meta(meta: dict) -> np.ndarray:
    """(N, 6) ``[cx, cy, sw, sh, area, score]`` from a collated meta dict of ``CocoKeypoints``."""
    c = _to_numpy(meta["center"]).reshape(-1, 2)
    s = _to_numpy(meta["scale"]).reshape(-1, 2)
    area = np.prod(s * PIXEL_STD, axis=1)
    score = _to_numpy(meta["score"]).reshape(-1)
    return np.concatenate([c, s, area[:, None], score[:, None]], axis=1).astype(np.float64)


class KeypointEvaluator:
    """Accumulates decoded predictions batch by batch, then runs ``evaluate_predictions``.

    ``update(heatmaps, meta)`` decodes test-time heatmaps (already flip-averaged if wanted)
    with the batch's meta (``center``, ``scale``, ``score``, ``image_id``, optional ``valid``).
    ``state()`` / ``load_state(list_of_states)`` let a distributed loop gather from ranks.
    """

    def __init__(self, ann_file, oks_thresh: float = OKS_THRESH, in_vis_thresh: float = IN_VIS_THRESH):
        self.ann_file = ann_file
        self.oks_thresh = oks_thresh
        self.in_vis_thresh = in_vis_thresh
        self.reset()

    def reset(self) -> None:
        self._preds, self._boxes, self._ids, self._valid, self._index = [], [], [], [], []

    def update(self, heatmaps, meta: dict) -> None:
        coords, maxvals = decode_heatmaps(heatmaps, meta["center"], meta["scale"])
        n = coords.shape[0]
        self._preds.append(np.concatenate([coords, maxvals], axis=2))
        self._boxes.append(boxes_from_meta(meta))
        self._ids.append(_to_numpy(meta["image_id"]).reshape(-1).astype(np.int64))
        self._valid.append(_to_numpy(meta["valid"]).reshape(-1).astype(bool) if "valid" in meta
                           else np.ones(n, bool))
        self._index.append(_to_numpy(meta["index"]).reshape(-1).astype(np.int64) if "index" in meta
                           else np.full(n, -1, np.int64))

    def state(self) -> dict:
        cat = lambda xs, shape: np.concatenate(xs) if xs else np.zeros(shape)  # noqa: E731
        return {"preds": cat(self._preds, (0, NUM_JOINTS, 3)), "boxes": cat(self._boxes, (0, 6)),
                "image_ids": cat(self._ids, (0,)).astype(np.int64), "valid": cat(self._valid, (0,)).astype(bool),
                "index": cat(self._index, (0,)).astype(np.int64)}

    def load_state(self, states: Sequence[dict]) -> None:
        """Replace the accumulated data by the union of ``states`` (e.g. gathered from all ranks);
        duplicates of a dataset index (DistributedSampler padding) are dropped."""
        self.reset()
        seen: set[int] = set()
        for st in states:
            keep = []
            for j, idx in enumerate(st["index"]):
                if idx >= 0 and int(idx) in seen:
                    continue
                seen.add(int(idx))
                keep.append(j)
            keep = np.asarray(keep, dtype=np.int64)
            self._preds.append(st["preds"][keep])
            self._boxes.append(st["boxes"][keep])
            self._ids.append(st["image_ids"][keep])
            self._valid.append(st["valid"][keep])
            self._index.append(st["index"][keep])

    def compute(self, out_json=None) -> dict:
        st = self.state()
        return evaluate_predictions(st["preds"], st["boxes"], st["image_ids"], self.ann_file,
                                    self.oks_thresh, self.in_vis_thresh, out_json=out_json, valid=st["valid"])

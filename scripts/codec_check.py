#!/usr/bin/env python
"""Codec check: ground-truth keypoints through the exact COCO test-time path; prints COCO AP.

    python scripts/codec_check.py data=coco data.root=/datasets/coco
    python scripts/codec_check.py data=coco data.root=/datasets/coco \\
        data.det_file=person_detection_results/COCO_val2017_detections_AP_H_56_person.json
    python scripts/codec_check.py data=coco_sample            # tests/data/coco_sample, GT boxes
    python scripts/codec_check.py data=coco_sample boxes=det  # its detector boxes
    python scripts/codec_check.py data=coco_demo              # the generated demo (cached)

For every evaluation sample of the val split (GT boxes, or detector boxes when a det file
is set), the GT keypoints are rendered into heatmaps with the dataset's own target
generation; with ``flip=true`` (default) the heatmaps "predicted" on the mirrored crop are
the targets rendered from the mirrored crop and go through flip_back + one-pixel shift +
average. Then the test-time decode (argmax, quarter offset, inverse affine), rescoring,
OKS-NMS and pycocotools COCOeval run exactly as for a model (see data.coco.codec_check).
A correct codec gives AP close to 100 with GT boxes; a lower value measures what the
heatmap resolution alone costs, and a much lower one means a bug.

Arguments are ``key=value`` (values parsed as YAML), a minimal Hydra-like syntax parsed
here so the script works without composing the training config:

  data=NAME            coco | coco_demo | coco_sample. Defaults come from
                       configs/data/NAME.yaml when it exists (keys root, val_ann, val_images,
                       det_file, det_score_thresh, input_size, heatmap_size, sigma; also
                       task.* of a @package _global_ file).
  data.root=PATH       COCO root (standard layout); coco_demo: null = the cached demo.
  data.val_ann=PATH    data.val_images=PATH   data.det_file=PATH   data.det_score_thresh=X
  task.input_size=[256,192]  task.heatmap_size=[64,48]  task.sigma=2.0   (h, w; also
                       accepted as data.input_size etc.; defaults from the data yaml)
  boxes=gt|det         default: det when a det_file is set, else gt
  flip=true|false      flip test (default true)
  images=true|false    also read every image and run the dataset's crop (default true)
  match_iou=0.5        detector box -> GT instance matching threshold
  out_json=PATH        write the keypoint results file

The LAST stdout line is one JSON object: {"AP", "AP50", "AP75", "APm", "APl", "AR",
"AR50", "AR75", "ARm", "ARl" (percent), "boxes", "flip", "num_samples", "num_poses", ...}.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SAMPLE_DIR = ROOT / "tests" / "data" / "coco_sample"
DATA_KEYS = ("root", "val_ann", "val_images", "det_file", "det_score_thresh")
TASK_KEYS = ("input_size", "heatmap_size", "sigma")
OPTIONS = {"boxes": None, "flip": True, "images": True, "match_iou": 0.5, "out_json": None}
TASK_DEFAULTS = {"input_size": [256, 192], "heatmap_size": [64, 48], "sigma": 2.0}
BUILTIN = {
    "coco": {"root": os.environ.get("COCO_ROOT")},
    "coco_demo": {"root": None},
    "coco_sample": {"root": str(SAMPLE_DIR), "val_ann": "person_keypoints_sample.json", "val_images": "images",
                    "det_file": None, "sample_det_file": "person_detections_sample.json"},
}


class UsageError(ValueError):
    pass


def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        return text


def _yaml_defaults(name: str) -> tuple[dict, dict]:
    """(data keys, task keys) from configs/data/<name>.yaml, best effort."""
    path = ROOT / "configs" / "data" / f"{name}.yaml"
    if not path.is_file():
        return {}, {}
    try:
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(path)
        text = path.read_text()
        glob = "@package _global_" in text
        d = cfg.get("data", {}) if glob else cfg
        t = cfg.get("task", {}) if glob else {}
        data, task = {}, {}
        for k in DATA_KEYS:
            if k in d and not OmegaConf.is_missing(d, k):
                try:
                    data[k] = OmegaConf.to_container(d, resolve=True)[k]
                except Exception:  # an interpolation only Hydra resolves
                    pass
        for k in TASK_KEYS:  # sizes may sit under data (coco_demo.yaml) or task
            for src in (t, d):
                if k in src:
                    task[k] = OmegaConf.to_container(src, resolve=True)[k]
        return data, task
    except Exception as e:  # a config we cannot read must not block the check
        logging.getLogger(__name__).warning("ignoring %s: %s", path, e)
        return {}, {}


def parse_args(argv: list[str]) -> dict:
    kv = {}
    for a in argv:
        if a in ("-h", "--help"):
            raise UsageError("help")
        if "=" not in a:
            raise UsageError(f"expected key=value, got {a!r}")
        k, v = a.split("=", 1)
        kv[k.lstrip("+")] = _parse_value(v)
    name = str(kv.pop("data", "coco_sample"))
    if name not in BUILTIN:
        raise UsageError(f"data={name!r}: expected one of {sorted(BUILTIN)}")
    data = dict(BUILTIN[name])
    y_data, y_task = _yaml_defaults(name) if name != "coco_sample" else ({}, {})
    data.update({k: v for k, v in y_data.items() if not (k == "root" and v is None and data.get("root"))})
    task = {**TASK_DEFAULTS, **y_task}
    opts = dict(OPTIONS)
    for k, v in kv.items():
        if k.startswith("data.") and k[5:] in TASK_KEYS:
            task[k[5:]] = v
        elif k.startswith("data."):
            key = k[5:]
            if key not in DATA_KEYS:
                raise UsageError(f"unknown data key {key!r}; valid: {', '.join(DATA_KEYS)}")
            data[key] = v
        elif k.startswith("task."):
            key = k[5:]
            if key not in TASK_KEYS:
                raise UsageError(f"unknown task key {key!r}; valid: {', '.join(TASK_KEYS)}")
            task[key] = v
        elif k in OPTIONS:
            opts[k] = v
        else:
            raise UsageError(f"unknown argument {k!r}")
    if opts["boxes"] not in (None, "gt", "det"):
        raise UsageError(f"boxes must be gt or det, got {opts['boxes']!r}")
    if opts["boxes"] == "det" and not data.get("det_file"):
        data["det_file"] = data.get("sample_det_file") or ("person_detections_val2017.json"
                                                            if name == "coco_demo" else None)
        if not data["det_file"]:
            raise UsageError("boxes=det needs data.det_file=...")
    if opts["boxes"] is None:
        opts["boxes"] = "det" if data.get("det_file") else "gt"
    data.pop("sample_det_file", None)
    return {"name": name, "data": data, "task": task, "opts": opts}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        args = parse_args(argv)
    except UsageError as e:
        if str(e) != "help":
            print(f"codec_check: {e}", file=sys.stderr)
        print(__doc__, file=sys.stderr)
        return 0 if str(e) == "help" else 2

    from data.coco import build_coco_dataset, codec_check

    name, data, task, opts = args["name"], args["data"], args["task"], args["opts"]
    root = data.get("root")
    if name == "coco_demo" and root is None and not data.get("val_ann"):
        from data.coco_demo import ensure_coco_demo

        root = ensure_coco_demo()
    if name == "coco" and root is None and not (data.get("val_ann") and data.get("val_images")):
        print("codec_check: data=coco needs data.root=<COCO root> (or $COCO_ROOT, or data.val_ann and "
              "data.val_images)", file=sys.stderr)
        return 2
    det = data.get("det_file") if opts["boxes"] == "det" else None
    t0 = time.perf_counter()
    ds = build_coco_dataset(
        "val", root=root, ann=data.get("val_ann"), images=data.get("val_images"), det_file=det,
        input_size=tuple(task["input_size"]), heatmap_size=tuple(task["heatmap_size"]), sigma=float(task["sigma"]),
        det_score_thresh=float(data.get("det_score_thresh") or 0.0), use_gt_boxes=(opts["boxes"] == "gt"))
    print(f"codec_check: data={name} ann={ds.ann_file} images={ds.image_dir}")
    print(f"codec_check: {len(ds)} samples ({opts['boxes']} boxes{', ' + str(ds.det_file) if det else ''}), "
          f"input {ds.input_size} heatmap {ds.heatmap_size} sigma {ds.sigma}, flip={bool(opts['flip'])}")
    m = codec_check(ds, flip=bool(opts["flip"]), read_images=bool(opts["images"]),
                    match_iou=float(opts["match_iou"]), out_json=opts["out_json"])
    names = {"ap": "AP", "ap50": "AP50", "ap75": "AP75", "apm": "APm", "apl": "APl", "ar": "AR", "ar50": "AR50",
             "ar75": "AR75", "arm": "ARm", "arl": "ARl"}
    out = {v: round(float(m[k]), 3) for k, v in names.items()}
    out.update({"boxes": opts["boxes"], "flip": bool(opts["flip"]), "num_samples": int(m["num_samples"]),
                "num_poses": int(m["num_poses"]), "data": name, "seconds": round(time.perf_counter() - t0, 2)})
    if "num_matched" in m:
        out["num_matched"] = int(m["num_matched"])
    print("codec_check: " + "  ".join(f"{k} {out[k]:.1f}" for k in ("AP", "AP50", "AP75", "APm", "APl", "AR")))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

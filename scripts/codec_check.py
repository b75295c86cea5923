#!/usr/bin/env python
"""Codec check: ground-truth keypoints through the exact COCO test-time path; prints COCO AP.

    python scripts/codec_check.py data=coco data.root=/datasets/coco
    python scripts/codec_check.py data=coco data.root=/datasets/coco \\
        data.det_file=person_detection_results/COCO_val2017_detections_AP_H_56_person.json
    python scripts/codec_check.py --sample                    # tests/data/coco_sample, GT boxes
    python scripts/codec_check.py --sample --boxes det        # its detector boxes
    python scripts/codec_check.py                             # the generated coco_demo (cached)

For every evaluation sample of the val split (GT boxes, or detector boxes when a det file
is set), the GT keypoints are rendered into heatmaps with the dataset's own target
generation; by default (``--no-flip`` turns it off) the heatmaps "predicted" on the mirrored crop are
the targets rendered from the mirrored crop and go through flip_back + one-pixel shift +
average. Then the test-time decode (argmax, quarter offset, inverse affine), rescoring,
OKS-NMS and pycocotools COCOeval run exactly as for a model (see data.coco.codec_check).
A correct codec gives AP close to 100 with GT boxes; a lower value measures what the
heatmap resolution alone costs, and a much lower one means a bug.

Arguments are ``train.py``'s overrides (composed by engine.config.compose with ``task=kpt``
first, so the default data is the cached coco_demo): ``data=coco|coco_demo``, ``data.root=``,
``data.val_ann=``, ``data.val_images=``, ``data.det_file=``, ``data.det_score_thresh=``,
``data.input_size=``, ``data.heatmap_size=``, ``data.sigma=`` and any other key ``train.py``
accepts; an unknown key fails with ``train.py``'s message. The script's own options:

  --sample             the four real COCO val2017 images in tests/data/coco_sample
  --boxes gt|det       default: det when a det_file is set, else gt (coco_demo and --sample
                       bring their detector files)
  --no-flip            no flip test
  --no-images          do not read the images nor run the crop
  --match-iou 0.5      detector box -> GT instance matching threshold
  --out-json PATH      write the keypoint results file

The LAST stdout line is one JSON object: {"AP", "AP50", "AP75", "APm", "APl", "AR",
"AR50", "AR75", "ARm", "ARl" (percent), "boxes", "flip", "num_samples", "num_poses", ...}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from _bootstrap import ROOT  # the checkout on sys.path (the framework is not installed)

SAMPLE_DIR = ROOT / "tests" / "data" / "coco_sample"
SAMPLE = [f"data.root={SAMPLE_DIR}", "data.val_ann=person_keypoints_sample.json", "data.val_images=images"]
SAMPLE_DET = "person_detections_sample.json"
DEMO_DET = "person_detections_val2017.json"


def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="codec_check.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("overrides", nargs="*", help="train.py's overrides (data=coco data.root=...)")
    ap.add_argument("--sample", action="store_true", help="tests/data/coco_sample (4 real val2017 images)")
    ap.add_argument("--boxes", choices=["gt", "det"], default=None)
    ap.add_argument("--no-flip", dest="flip", action="store_false")
    ap.add_argument("--no-images", dest="images", action="store_false")
    ap.add_argument("--match-iou", type=float, default=0.5)
    ap.add_argument("--out-json", default=None)
    return ap.parse_intermixed_args(argv)


def data_config(args: argparse.Namespace):
    """The composed ``data`` node, with the detector file that ``--boxes det`` needs."""
    from omegaconf import OmegaConf

    from engine.config import compose

    overrides = ["task=kpt", *(["data=coco", *SAMPLE] if args.sample else []), *args.overrides]
    data = compose(overrides).data
    if OmegaConf.is_missing(data, "root"):
        raise ValueError(f"data={data.name} needs data.root=<COCO root> (the folder with annotations/, "
                         "train2017/, val2017/)")
    if args.boxes == "det" and not data.det_file:
        if args.sample:
            data.det_file = SAMPLE_DET
        elif data.name == "coco_demo":
            data.det_file = DEMO_DET
        else:
            raise ValueError("--boxes det needs data.det_file=<detector results JSON>")
    if args.boxes is None:
        args.boxes = "det" if data.det_file else "gt"
    return data


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from engine.errors import exit_on_user_error

    with exit_on_user_error():
        return check(args)
    return 1


def check(args: argparse.Namespace) -> int:
    from data.coco import build_coco_dataset, codec_check

    data = data_config(args)
    name = "coco_sample" if args.sample else str(data.name)
    root = data.root
    if data.name == "coco_demo" and root is None and not data.val_ann:
        from data.coco_demo import ensure_coco_demo

        root = ensure_coco_demo()
    det = data.det_file if args.boxes == "det" else None
    t0 = time.perf_counter()
    ds = build_coco_dataset(
        "val", root=root, ann=data.val_ann, images=data.val_images, det_file=det,
        input_size=tuple(data.input_size), heatmap_size=tuple(data.heatmap_size), sigma=float(data.sigma),
        det_score_thresh=float(data.det_score_thresh or 0.0), use_gt_boxes=(args.boxes == "gt"))
    print(f"codec_check: data={name} ann={ds.ann_file} images={ds.image_dir}")
    print(f"codec_check: {len(ds)} samples ({args.boxes} boxes{', ' + str(ds.det_file) if det else ''}), "
          f"input {ds.input_size} heatmap {ds.heatmap_size} sigma {ds.sigma}, flip={args.flip}")
    m = codec_check(ds, flip=args.flip, read_images=args.images, match_iou=args.match_iou, out_json=args.out_json)
    names = {"ap": "AP", "ap50": "AP50", "ap75": "AP75", "apm": "APm", "apl": "APl", "ar": "AR", "ar50": "AR50",
             "ar75": "AR75", "arm": "ARm", "arl": "ARl"}
    out = {v: round(float(m[k]), 3) for k, v in names.items()}
    out.update({"boxes": args.boxes, "flip": args.flip, "num_samples": int(m["num_samples"]),
                "num_poses": int(m["num_poses"]), "data": name, "seconds": round(time.perf_counter() - t0, 2)})
    if "num_matched" in m:
        out["num_matched"] = int(m["num_matched"])
    print("codec_check: " + "  ".join(f"{k} {out[k]:.1f}" for k in ("AP", "AP50", "AP75", "APm", "APl", "AR")))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

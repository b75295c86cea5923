"""COCO top-down keypoint data on REAL COCO files (tests/data/coco_sample) and on coco_demo."""
from __future__ import annotations

import copy
import hashlib
import json
import multiprocessing as mp
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data import keypoints as kp
from data.coco import (CocoFormatError, CocoImageError, CocoKeypoints, build_coco_datasets,
                       codec_check)
from runs import load_script

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "coco_sample"
ANN = SAMPLE / "person_keypoints_sample.json"
DET = SAMPLE / "person_detections_sample.json"
IMAGES = SAMPLE / "images"
SIZES = {785: (425, 640), 40083: (333, 500), 196141: (429, 640), 197388: (392, 640)}


def _val(**kw):
    return CocoKeypoints(ANN, IMAGES, train=False, **kw)


def _write(tmp_path, data, name="ann.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


@pytest.fixture(scope="module")
def ann_data():
    return json.loads(ANN.read_text())


# ----------------------------------------------------------------------------- the sample itself

def test_sample_is_real_coco_with_attribution(ann_data):
    assert "cocodataset.org" in (SAMPLE / "README.md").read_text()
    assert {im["id"]: (im["height"], im["width"]) for im in ann_data["images"]} == SIZES
    assert len(ann_data["annotations"]) == 14
    assert sum(a["num_keypoints"] == 0 for a in ann_data["annotations"]) == 2


# ----------------------------------------------------------------------------- GT boxes

def test_val_gt_samples_and_collate():
    ds = _val()
    # 14 person instances, 2 with no labelled keypoint (HRNet's kernel drops them in train and GT-box eval)
    assert len(ds) == 12 and ds.num_zero_keypoint == 2 and ds.num_crowd == 0
    assert ds.use_gt_boxes and not ds.train
    image, target, weight, meta = ds[0]
    assert image.shape == (3, 256, 192) and image.dtype == torch.float32
    assert target.shape == (17, 64, 48) and weight.shape == (17, 1)
    assert meta["score"] == 1.0 and not meta["flipped"] and meta["rotation"] == 0
    batch = next(iter(DataLoader(ds, batch_size=5)))
    im, t, w, m = batch
    assert im.shape == (5, 3, 256, 192) and t.shape == (5, 17, 64, 48) and w.shape == (5, 17, 1)
    assert m["center"].shape == (5, 2) and m["scale"].shape == (5, 2) and m["image_id"].shape == (5,)
    assert m["index"].tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_allclose(m["area"].numpy(), np.prod(m["scale"].numpy() * 200, axis=1), rtol=1e-5)


def test_images_of_different_sizes_crop_and_decode():
    """Every sample (four images of four sizes): the crop shows the image around the box, the
    weights mark the labelled joints, and decoding the sample's own target returns the GT joints."""
    ds = _val()
    seen = set()
    mean, std = np.array(kp.IMAGENET_MEAN), np.array(kp.IMAGENET_STD)
    for i, rec in enumerate(ds.records):
        image, target, weight, meta = ds[i]
        raw = ds.read_image(rec["image_id"])
        assert raw.shape[:2] == SIZES[rec["image_id"]]
        seen.add(raw.shape[:2])
        # crop centre pixel == the image at the box centre (bilinear, RGB, ImageNet-normalised)
        px = image[:, 128, 96].numpy() * std + mean
        cx, cy = rec["center"]
        trans = ds.crop_transform(rec["center"], rec["scale"])
        src = kp.affine_transform(np.array([96.0, 128.0]), kp.get_affine_transform(
            rec["center"], rec["scale"], 0, (192, 256), inv=True))
        assert abs(src[0] - cx) < 2.5 and abs(src[1] - cy) < 2.5
        np.testing.assert_allclose(px * 255, raw[int(round(src[1])), int(round(src[0]))], atol=40)
        lab = rec["joints"][:, 2] > 0
        assert (weight[:, 0].numpy() > 0).sum() <= lab.sum()
        assert (weight[~lab, 0] == 0).all()
        coords, maxvals = kp.decode_heatmaps(target[None], meta["center"][None], meta["scale"][None])
        ok = weight[:, 0].numpy() > 0
        stride = rec["scale"][0] * 200 / 48
        err = np.linalg.norm(coords[0][ok] - rec["joints"][ok, :2], axis=1)
        assert err.max() < 0.75 * stride, (i, err.max(), stride)
        assert trans.shape == (2, 3)
    assert len(seen) == 4


def test_train_skips_crowd_and_zero_keypoint_and_clips_boxes(tmp_path, ann_data):
    data = copy.deepcopy(ann_data)
    anns = data["annotations"]
    crowd = next(a for a in anns if a["id"] == 460541)
    crowd["iscrowd"] = 1  # a crowd region, even one with keypoints, is not a training instance
    outside = next(a for a in anns if a["id"] == 531914)  # image 197388 is 640 wide
    outside["bbox"] = [590.0, 48.81, 120.0, 223.36]  # runs 70 px past the right edge
    zero_area = next(a for a in anns if a["id"] == 437295)
    zero_area["area"] = 0
    p = _write(tmp_path, data)
    ds = CocoKeypoints(p, IMAGES, train=True)
    ids = {r["ann_id"] for r in ds.records}
    assert 460541 not in ids and 437295 not in ids
    assert {1202706, 508900}.isdisjoint(ids)  # the two zero-keypoint people
    assert len(ds) == 10 and ds.num_crowd == 1 and ds.num_zero_keypoint == 2 and ds.num_bad_box == 1
    rec = next(r for r in ds.records if r["ann_id"] == 531914)
    x, y, w, h = rec["box"]
    assert x == pytest.approx(590.0) and x + w == pytest.approx(639.0)  # clipped to width - 1
    np.testing.assert_allclose(rec["center"], (x + w / 2, y + h / 2), rtol=1e-6)
    # the same kernel for GT-box evaluation
    assert len(CocoKeypoints(p, IMAGES, train=False)) == 10


def test_train_augmentation_ranges_and_target_consistency():
    ds = CocoKeypoints(ANN, IMAGES, train=True, half_body_prob=0.0)
    torch.manual_seed(0)
    rots, ratios, flips = [], [], 0
    for k in range(60):
        i = k % len(ds)
        image, target, weight, meta = ds[i]
        rec = ds.records[i]
        ratios.append(float(meta["scale"][0] / rec["scale"][0]))
        rots.append(float(meta["rotation"]))
        flips += bool(meta["flipped"])
        # the target peaks where the (augmented) joints are
        j = meta["joints"].numpy()
        for jj in np.nonzero(weight[:, 0].numpy() > 0)[0]:
            x, y = j[jj, :2] / 4.0
            if 1 <= x < 47 and 1 <= y < 63:
                py, px = np.unravel_index(int(target[jj].argmax()), (64, 48))
                assert abs(px - int(x + 0.5)) <= 1 and abs(py - int(y + 0.5)) <= 1
    ratios, rots = np.array(ratios), np.array(rots)
    assert ratios.min() >= 0.65 - 1e-6 and ratios.max() <= 1.35 + 1e-6 and ratios.std() > 0.1
    assert np.abs(rots).max() <= 90.0 and (rots == 0).mean() > 0.2 and np.abs(rots).max() > 10
    assert 10 < flips < 50
    # determinism under torch.manual_seed (the per-sample RNG is drawn from torch's generator)
    torch.manual_seed(3)
    a = ds[2]
    torch.manual_seed(3)
    b = ds[2]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_train_flip_mirrors_crop_and_swaps_joints():
    ds = CocoKeypoints(ANN, IMAGES, train=True, rot_factor=0.0, scale_range=(1.0, 1.0), half_body_prob=0.0)
    ref = _val()
    i = 0
    img0, _, w0, m0 = ref[i]
    torch.manual_seed(0)
    for _ in range(20):
        img, t, w, m = ds[i]
        if m["flipped"]:
            break
    assert m["flipped"]
    j0, j1 = m0["joints"].numpy(), m["joints"].numpy()
    perm = kp.flip_permutation()
    lab = j0[perm, 2] > 0
    # mirrored about the crop centre: x' = in_w - x (HRNet flips the image, then crops)
    np.testing.assert_allclose(j1[lab, 0], 192 - j0[perm][lab, 0], atol=1e-3)
    np.testing.assert_allclose(j1[lab, 1], j0[perm][lab, 1], atol=1e-3)
    np.testing.assert_array_equal(w.numpy(), w0.numpy()[perm])
    # the crop is the mirrored crop, up to that one-pixel offset and interpolation
    diff = (img[:, :, 1:] - torch.flip(img0, [2])[:, :, :-1]).abs().mean()
    assert diff < 0.1


def test_half_body():
    ds = CocoKeypoints(ANN, IMAGES, train=True, half_body_prob=1.0, rot_factor=0.0, scale_range=(1.0, 1.0),
                       flip=False)
    torch.manual_seed(0)
    smaller = 0
    for i in range(len(ds)):
        _, _, w, m = ds[i]
        rec = ds.records[i]
        if (rec["joints"][:, 2] > 0).sum() > 8:
            smaller += float(m["scale"][1]) < float(rec["scale"][1])
    assert smaller >= 8


# ----------------------------------------------------------------------------- detector boxes

def test_detector_boxes():
    dets = json.loads(DET.read_text())
    ds = _val(det_file=DET)
    assert not ds.use_gt_boxes and len(ds) == len(dets) == 118
    _, target, weight, meta = ds[0]
    assert weight.sum() == 0 and target.sum() == 0  # no GT is attached to a detector box
    scores = sorted((d["score"] for d in dets if d["image_id"] == int(meta["image_id"])), reverse=True)
    assert float(meta["score"]) == pytest.approx(scores[0], rel=1e-6)
    thr = _val(det_file=DET, det_score_thresh=0.5)
    assert len(thr) == sum(d["score"] >= 0.5 for d in dets)
    # an explicit GT request wins over det_file
    assert len(_val(det_file=DET, use_gt_boxes=True)) == 12
    with pytest.raises(ValueError):
        CocoKeypoints(ANN, IMAGES, train=True, use_gt_boxes=False)


def test_detector_file_for_unknown_images_and_degenerate_boxes(tmp_path):
    dets = json.loads(DET.read_text())[:5]
    dets.append({"image_id": 123456789, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.9})
    dets.append({"image_id": 785, "category_id": 1, "bbox": [1, 2, 0, 4], "score": 0.9})
    dets.append({"image_id": 785, "category_id": 3, "bbox": [1, 2, 30, 40], "score": 0.9})  # not a person
    ds = _val(det_file=_write(tmp_path, dets, "dets.json"))
    assert len(ds) == 5


# ----------------------------------------------------------------------------- file validation

@pytest.mark.parametrize("where,field", [
    ("annotations", "keypoints"), ("annotations", "bbox"), ("annotations", "iscrowd"),
    ("annotations", "num_keypoints"), ("images", "file_name"), ("images", "height"), ("top", "annotations"),
])
def test_missing_field_is_a_clear_error(tmp_path, ann_data, where, field):
    data = copy.deepcopy(ann_data)
    if where == "top":
        del data[field]
    else:
        del data[where][1][field]
    p = _write(tmp_path, data, "broken_ann.json")
    with pytest.raises(CocoFormatError) as e:
        CocoKeypoints(p, IMAGES, train=True)
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    assert str(p) in msg and f"'{field}'" in msg
    if where != "top":
        assert f"{where}[1]" in msg


def test_malformed_fields_are_clear_errors(tmp_path, ann_data):
    data = copy.deepcopy(ann_data)
    data["annotations"][0]["keypoints"] = data["annotations"][0]["keypoints"][:-3]
    with pytest.raises(CocoFormatError, match="'keypoints' must be a list of 51"):
        CocoKeypoints(_write(tmp_path, data), IMAGES, train=False)
    data = copy.deepcopy(ann_data)
    data["annotations"][0]["image_id"] = 42
    with pytest.raises(CocoFormatError, match="'image_id' = 42 is not in 'images'"):
        CocoKeypoints(_write(tmp_path, data), IMAGES, train=False)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(CocoFormatError, match="bad.json: not valid JSON"):
        CocoKeypoints(bad, IMAGES, train=False)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoKeypoints(tmp_path / "nope.json", IMAGES, train=False)


@pytest.mark.parametrize("field", ["bbox", "score", "image_id", "category_id"])
def test_detection_missing_field_is_a_clear_error(tmp_path, field):
    dets = json.loads(DET.read_text())
    del dets[7][field]
    p = _write(tmp_path, dets, "dets_broken.json")
    with pytest.raises(CocoFormatError) as e:
        _val(det_file=p)
    assert str(p) in str(e.value) and f"'{field}'" in str(e.value) and "detections[7]" in str(e.value)
    with pytest.raises(CocoFormatError, match="must be a JSON list"):
        _val(det_file=_write(tmp_path, {"a": 1}, "dets_obj.json"))


# ----------------------------------------------------------------------------- bad images

@pytest.fixture()
def image_copy(tmp_path):
    d = tmp_path / "images"
    shutil.copytree(IMAGES, d)
    return d


def test_missing_image_is_a_clear_error_or_skipped(image_copy):
    gone = image_copy / "000000040083.jpg"
    gone.unlink()
    with pytest.raises(FileNotFoundError) as e:
        CocoKeypoints(ANN, image_copy, train=True, skip_bad_images=False)
    assert str(gone) in str(e.value)
    ds = CocoKeypoints(ANN, image_copy, train=True, skip_bad_images=True)
    assert ds.skipped_images == [str(gone)] and len(ds) == 10  # its two labelled people are gone
    assert all(r["image_id"] != 40083 for r in ds.records)
    with pytest.raises(FileNotFoundError, match="image directory not found"):
        CocoKeypoints(ANN, image_copy / "nope", train=True)


def test_corrupt_image_is_a_clear_error_or_skipped(image_copy):
    bad = image_copy / "000000000785.jpg"
    bad.write_bytes(b"this is not a jpeg" * 10)
    ds = CocoKeypoints(ANN, image_copy, train=False, skip_bad_images=False)
    with pytest.raises(CocoImageError) as e:
        ds[0]
    assert str(bad) in str(e.value)
    ev = CocoKeypoints(ANN, image_copy, train=False, skip_bad_images=True)
    image, _, _, meta = ev[0]  # evaluation keeps the slot, marked invalid (KeypointEvaluator drops it)
    assert not meta["valid"] and ev.num_bad_reads == 1
    assert bool(ev[1][3]["valid"])
    tr = CocoKeypoints(ANN, image_copy, train=True, skip_bad_images=True)
    torch.manual_seed(0)
    _, _, _, meta = tr[0]  # training substitutes another sample
    assert int(meta["image_id"]) != 785 and bool(meta["valid"]) and tr.num_bad_reads == 1


# ----------------------------------------------------------------------------- builders

def _standard_root(tmp_path):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (root / "annotations" / f"person_keypoints_{split}2017.json").symlink_to(ANN)
        (root / f"{split}2017").symlink_to(IMAGES)
    return root


def test_build_coco_datasets_from_root_and_overrides(tmp_path):
    root = _standard_root(tmp_path)
    train, val = build_coco_datasets(root=root)
    assert train.train and not val.train and len(train) == len(val) == 12
    assert train.input_size == (256, 192) and val.heatmap_size == (64, 48)
    _, val = build_coco_datasets(root=root, det_file=DET, det_score_thresh=0.3, rot_factor=30,
                                 input_size=(128, 96), heatmap_size=(32, 24), sigma=1.5)
    assert not val.use_gt_boxes and len(val) == sum(d["score"] >= 0.3 for d in json.loads(DET.read_text()))
    assert val[0][1].shape == (17, 32, 24)
    # explicit paths; relative ones are resolved under root
    shutil.copy(DET, root / "dets.json")
    _, val = build_coco_datasets(root=root, val_ann=ANN, val_images=IMAGES, det_file="dets.json")
    assert len(val) == 118
    train, val = build_coco_datasets(train_ann=ANN, train_images=IMAGES, val_ann=ANN, val_images=IMAGES)
    assert len(train) == 12
    with pytest.raises(TypeError, match="unknown option"):
        build_coco_datasets(root=root, bogus=1)


def test_build_coco_datasets_missing_paths_name_the_layout(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        build_coco_datasets(root=tmp_path / "empty")
    msg = str(e.value)
    assert "person_keypoints_train2017.json" in msg and "expected layout" in msg and "data.train_ann" in msg
    with pytest.raises(FileNotFoundError, match="data.root"):
        build_coco_datasets()
    root = _standard_root(tmp_path)
    with pytest.raises(FileNotFoundError, match="detection file not found"):
        build_coco_datasets(root=root, det_file="missing.json")
    (root / "val2017").unlink()
    with pytest.raises(FileNotFoundError, match=r"val image directory not found: .*val2017"):
        build_coco_datasets(root=root)


# ----------------------------------------------------------------------------- codec check

def test_codec_check_gt_boxes_function():
    m = codec_check(_val(), flip=True)
    assert m["ap"] >= 95.0 and m["num_poses"] == 12
    m_noflip = codec_check(_val(), flip=False, read_images=False)
    assert m_noflip["ap"] >= 95.0


def test_flip_test_with_shift_reduces_codec_error():
    """The flip path is exercised for real: on the sample, averaging with the target rendered
    from the mirrored crop and shifted one pixel lowers the decode error; without the shift it
    is worse than no flip test at all (the known half-pixel misalignment HRNet's shift fixes)."""
    ds = _val()
    errs = {"none": [], "shift": [], "noshift": []}
    for rec in ds.records:
        vis = rec["joints"][:, 2]
        lab = vis > 0
        jc = np.zeros((17, 2), np.float32)
        jc[lab] = kp.affine_transform(rec["joints"][lab, :2], ds.crop_transform(rec["center"], rec["scale"]))
        t, w = ds.render_target(jc, vis)
        jf, vf = kp.fliplr_joints(jc, vis, 192)
        tf, _ = ds.render_target(jf, vf)
        px = rec["scale"][0] * 200 / 48
        for name, h in (("none", t[None]), ("shift", kp.flip_average(t[None], tf[None])),
                        ("noshift", kp.flip_average(t[None], tf[None], shift=False))):
            c, _ = kp.decode_heatmaps(h, rec["center"][None], rec["scale"][None])
            ok = w[:, 0] > 0
            errs[name] += list(np.linalg.norm(c[0][ok] - rec["joints"][ok, :2], axis=1) / px)
    mean = {k: float(np.mean(v)) for k, v in errs.items()}
    assert mean["shift"] < mean["none"] < mean["noshift"], mean


def _run_codec_check(*args):
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "codec_check.py"), *args], capture_output=True,
                       text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), r


def test_codec_check_script_gt_boxes_ap_at_least_95():
    out, _ = _run_codec_check("--sample")
    assert out["AP"] >= 95.0 and out["boxes"] == "gt" and out["flip"] is True and out["num_samples"] == 12
    for k in ("AP50", "AP75", "APm", "APl", "AR"):
        assert 0.0 <= out[k] <= 100.0


def test_codec_check_script_detector_boxes(tmp_path, capsys):
    mod = _script_module()  # in-process (the subprocess path is covered above)
    assert mod.main(["--sample", "--boxes", "det", "--out-json", str(tmp_path / "res.json")]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["boxes"] == "det" and out["num_samples"] == 118 and out["num_matched"] == 52
    assert out["AP"] >= 90.0  # every labelled person has a well-overlapping detector box (measured: 100)
    assert (tmp_path / "res.json").is_file()


def _script_module():
    return load_script("codec_check")


def test_codec_check_takes_train_overrides(capsys):
    mod = _script_module()
    a = mod.parse_args([f"data.val_ann={ANN}", f"data.val_images={IMAGES}", f"data.det_file={DET}", "--no-flip",
                        "data.input_size=[128,96]", "data.heatmap_size=[32,24]"])
    d = mod.data_config(a)
    assert a.boxes == "det" and a.flip is False and d.name == "coco_demo"  # task=kpt's default data
    assert list(d.input_size) == [128, 96] and d.det_file == str(DET)
    a = mod.parse_args(["--sample", "--boxes", "det"])
    assert mod.data_config(a).det_file == "person_detections_sample.json"
    a = mod.parse_args(["data=coco", "data.root=/x", "data.train_ann=a.json"])  # any key train.py takes
    d = mod.data_config(a)
    assert d.root == "/x" and d.train_ann == "a.json" and a.boxes == "gt"
    from engine.config import OverrideError

    for bad in (["data.bogus=1"], ["data=nope"]):
        with pytest.raises(OverrideError):
            mod.data_config(mod.parse_args(bad))
    with pytest.raises(SystemExit):
        mod.parse_args(["--boxes", "maybe"])
    with pytest.raises(SystemExit) as e:
        mod.main(["data.bogus=1"])
    assert e.value.code == 2 and "data has no key bogus" in capsys.readouterr().err
    # in-process run with explicit paths, no flip, no image reads: the last stdout line is the JSON
    assert mod.main([f"data.val_ann={ANN}", f"data.val_images={IMAGES}", "data.input_size=[256,192]",
                     "data.heatmap_size=[64,48]", "--no-flip", "--no-images"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["AP"] >= 95.0 and out["flip"] is False and out["boxes"] == "gt"


# ----------------------------------------------------------------------------- coco_demo

def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


DEMO_KW = dict(num_train=6, num_val=4, image_size=160, seed=3)


def test_coco_demo_deterministic_and_cached(tmp_path):
    from data.coco_demo import ensure_coco_demo, read_manifest

    a = ensure_coco_demo(tmp_path / "a", **DEMO_KW)
    b = ensure_coco_demo(tmp_path / "b", **DEMO_KW)
    assert _tree_digest(a) == _tree_digest(b)
    stamp = (a / "manifest.json").stat().st_mtime_ns
    assert ensure_coco_demo(a, **DEMO_KW) == a and (a / "manifest.json").stat().st_mtime_ns == stamp
    c = ensure_coco_demo(tmp_path / "a", **{**DEMO_KW, "seed": 4})  # other parameters: regenerated
    assert read_manifest(c)["params"]["seed"] == 4
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        ensure_coco_demo(tmp_path / "foreign", **DEMO_KW)


def test_coco_demo_default_root_under_cache(tmp_path, monkeypatch):
    from data.coco_demo import default_root

    monkeypatch.setenv("DYRELU_CACHE", str(tmp_path))
    assert default_root() == tmp_path / "coco_demo_v1"
    assert default_root(num_train=5) != default_root()


def _ensure_in_child(root):
    from data.coco_demo import ensure_coco_demo

    return str(ensure_coco_demo(root, **DEMO_KW))


def test_coco_demo_concurrent_callers(tmp_path):
    root = tmp_path / "shared"
    with mp.get_context("fork").Pool(2) as pool:
        outs = pool.map(_ensure_in_child, [root, root, root])
    assert set(outs) == {str(root)}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".shared.tmp")]
    ref = _ensure_in_child(tmp_path / "ref")
    assert _tree_digest(root) == _tree_digest(Path(ref))


def test_coco_demo_format_and_loading(tmp_path):
    from data.coco_demo import ensure_coco_demo

    root = ensure_coco_demo(tmp_path / "demo", **DEMO_KW)
    data = json.loads((root / "annotations" / "person_keypoints_val2017.json").read_text())
    assert {"info", "licenses", "categories", "images", "annotations"} <= set(data)
    cat = data["categories"][0]
    assert cat["name"] == "person" and cat["keypoints"] == list(kp.JOINT_NAMES) and len(cat["skeleton"]) == 19
    sizes = {(im["height"], im["width"]) for im in data["images"]}
    assert len(sizes) > 1
    for a in data["annotations"]:
        assert {"bbox", "area", "num_keypoints", "iscrowd", "keypoints", "segmentation", "image_id", "id"} <= set(a)
        k = np.asarray(a["keypoints"]).reshape(17, 3)
        assert a["num_keypoints"] == int((k[:, 2] > 0).sum()) and set(np.unique(k[:, 2])) <= {0, 1, 2}
        assert a["area"] > 0 and a["bbox"][2] > 0
    train, val = build_coco_datasets(root=root, input_size=(128, 96), heatmap_size=(32, 24), sigma=1.5)
    assert len(train) > 0 and len(val) > 0
    img, t, w, m = train[0]
    assert img.shape == (3, 128, 96) and t.shape == (17, 32, 24)
    _, dval = build_coco_datasets(root=root, det_file="person_detections_val2017.json")
    assert len(dval) >= len(val)
    m = codec_check(val, flip=True)
    assert m["ap"] >= 90.0

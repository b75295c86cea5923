"""The keypoint codec (data/keypoints.py): constants, flip, affine, targets, decode, OKS-NMS, COCOeval."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data import keypoints as kp

SAMPLE = Path(__file__).resolve().parent / "data" / "coco_sample"
SAMPLE_ANN = SAMPLE / "person_keypoints_sample.json"


# ----------------------------------------------------------------------------- constants

def test_constants_match_coco():
    from pycocotools.cocoeval import Params

    assert len(kp.JOINT_NAMES) == kp.NUM_JOINTS == 17
    np.testing.assert_allclose(kp.OKS_SIGMAS, Params(iouType="keypoints").kpt_oks_sigmas)
    cats = json.loads(SAMPLE_ANN.read_text())["categories"][0]
    assert tuple(cats["keypoints"]) == kp.JOINT_NAMES
    assert [tuple(s) for s in cats["skeleton"]] == list(kp.SKELETON)
    for a, b in kp.FLIP_PAIRS:  # every pair is (left_x, right_x)
        assert kp.JOINT_NAMES[a].replace("left_", "") == kp.JOINT_NAMES[b].replace("right_", "")
        assert kp.JOINT_NAMES[a].startswith("left_") and kp.JOINT_NAMES[b].startswith("right_")
    assert sorted(kp.UPPER_BODY_IDS + kp.LOWER_BODY_IDS) == list(range(17))
    assert kp.LOWER_BODY_IDS == tuple(range(11, 17))
    perm = kp.flip_permutation()
    assert perm[0] == 0 and perm[1] == 2 and perm[2] == 1 and perm[15] == 16
    assert (perm[perm] == np.arange(17)).all()


# ----------------------------------------------------------------------------- flip

def test_flip_back_reverses_width_and_swaps_pairs():
    rng = np.random.default_rng(0)
    h = rng.random((2, 17, 8, 6)).astype(np.float32)
    out = kp.flip_back(h)
    assert out.shape == h.shape
    perm = kp.flip_permutation()
    for j in range(17):
        np.testing.assert_array_equal(out[:, j], h[:, perm[j], :, ::-1])
    np.testing.assert_array_equal(out[:, 0], h[:, 0, :, ::-1])  # nose stays nose
    np.testing.assert_array_equal(out[:, 9], h[:, 10, :, ::-1])  # left wrist <- right wrist
    np.testing.assert_array_equal(kp.flip_back(out), h)  # an involution
    t = kp.flip_back(torch.from_numpy(h))
    assert isinstance(t, torch.Tensor)
    np.testing.assert_array_equal(t.numpy(), out)
    with pytest.raises(ValueError):
        kp.flip_back(h[0])


def test_flip_back_moves_a_peak_to_the_mirrored_joint():
    h = np.zeros((1, 17, 64, 48), np.float32)
    h[0, 9, 20, 10] = 1.0  # left wrist at x=10 in the mirrored crop
    out = kp.flip_back(h)
    assert out[0, 10, 20, 47 - 10] == 1.0 and out.sum() == 1.0  # right wrist at W-1-x


def test_shift_right_and_flip_test_average():
    h = np.arange(2 * 17 * 4 * 5, dtype=np.float32).reshape(2, 17, 4, 5)
    s = kp.shift_right(h)
    np.testing.assert_array_equal(s[..., 1:], h[..., :-1])
    np.testing.assert_array_equal(s[..., 0], h[..., 0])  # column 0 kept, as HRNet
    w = torch.randn(17, 3)

    def model_fn(x):  # any per-pixel model: heatmaps = linear map of the (downsampled) image
        return torch.einsum("kc,nchw->nkhw", w, x[:, :, ::4, ::4])

    x = torch.randn(2, 3, 16, 12)
    got = kp.flip_test_average(model_fn, x)
    ref = 0.5 * (model_fn(x).numpy() + kp.shift_right(kp.flip_back(model_fn(torch.flip(x, [3])).numpy())))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-6)
    got_list = kp.flip_test_average(lambda z: [None, model_fn(z)], x)  # multi-stage output: last one
    np.testing.assert_allclose(got_list.numpy(), ref, rtol=1e-6, atol=1e-6)
    no_shift = kp.flip_test_average(model_fn, x, shift=False)
    ref2 = 0.5 * (model_fn(x).numpy() + kp.flip_back(model_fn(torch.flip(x, [3])).numpy()))
    np.testing.assert_allclose(no_shift.numpy(), ref2, rtol=1e-6, atol=1e-6)


def test_fliplr_joints():
    j = np.zeros((17, 2), np.float32)
    v = np.zeros(17, np.float32)
    j[5], v[5] = (10.0, 20.0), 1
    j[6], v[6] = (30.0, 21.0), 1
    j[9] = (99.0, 99.0)  # unlabelled: zeroed by the flip
    fj, fv = kp.fliplr_joints(j, v, width=100)
    np.testing.assert_allclose(fj[6], (89.0, 20.0))  # left shoulder becomes the right one at W-1-x
    np.testing.assert_allclose(fj[5], (69.0, 21.0))
    assert fv[5] == fv[6] == 1 and (fj[10] == 0).all()
    fj3, fv3 = kp.fliplr_joints(j, np.stack([v] * 3, 1), width=100)  # (K, 3) vis as HRNet's
    np.testing.assert_allclose(fj3, fj)


# ----------------------------------------------------------------------------- geometry

def test_box_to_center_scale_hrnet_convention():
    c, s = kp.box_to_center_scale([10, 20, 100, 100], aspect_ratio=0.75)
    np.testing.assert_allclose(c, (60, 70))
    np.testing.assert_allclose(s, np.array([100, 100 / 0.75]) / 200 * 1.25, rtol=1e-6)  # widened to 3:4
    c, s = kp.box_to_center_scale([0, 0, 30, 100], aspect_ratio=0.75)
    np.testing.assert_allclose(s, np.array([75, 100]) / 200 * 1.25, rtol=1e-6)


@pytest.mark.parametrize("rot", [0.0, 30.0, -80.0])
def test_affine_round_trip(rot):
    center, scale = np.array([321.5, 200.25]), np.array([1.3, 1.3 / 0.75])
    t = kp.get_affine_transform(center, scale, rot, (192, 256))
    ti = kp.get_affine_transform(center, scale, rot, (192, 256), inv=True)
    pts = np.random.default_rng(1).uniform(0, 600, (50, 2))
    back = kp.affine_transform(kp.affine_transform(pts, t), ti)
    np.testing.assert_allclose(back, pts, atol=1e-3)
    np.testing.assert_allclose(kp.affine_transform(center, t), (96, 128), atol=1e-4)  # centre -> crop centre
    # the crop is scale*200 px wide: a point half a crop width right of the centre (unrotated) hits the edge
    if rot == 0:
        np.testing.assert_allclose(kp.affine_transform(center + [scale[0] * 100, scale[1] * 100], t), (192, 256),
                                   atol=1e-3)
    else:  # rotation keeps distances (uniform scale)
        d = kp.affine_transform(pts[:2], t)
        ratio = np.linalg.norm(d[0] - d[1]) / np.linalg.norm(pts[0] - pts[1])
        np.testing.assert_allclose(ratio, 192 / (scale[0] * 200), rtol=1e-4)


def test_affine_rotation_direction_matches_opencv():
    import cv2

    center, scale = np.array([50.0, 50.0]), np.array([0.5, 0.5])
    t = kp.get_affine_transform(center, scale, 30.0, (100, 100))
    m = cv2.getRotationMatrix2D((50.0, 50.0), 30.0, 1.0)  # positive = counter-clockwise on screen
    np.testing.assert_allclose(t, m, atol=1e-4)


# ----------------------------------------------------------------------------- targets

def test_generate_target_peaks_and_weights():
    j = np.zeros((17, 2), np.float32)
    v = np.ones(17, np.float32)
    j[0] = (40.0, 60.0)  # -> heatmap (10, 15)
    j[1] = (41.9, 62.1)  # int(x/4 + .5): (10, 16)
    j[2] = (-100.0, 10.0)  # far outside: weight 0
    j[3] = (-10.0, 10.0)  # 2.5 px outside: the 3-sigma window still touches the map
    v[4] = 0  # unlabelled
    t, w = kp.generate_target(j, v, (256, 192), (64, 48), sigma=2.0)
    assert t.shape == (17, 64, 48) and w.shape == (17, 1) and t.dtype == np.float32
    assert t[0, 15, 10] == 1.0 and t[0].argmax() == 15 * 48 + 10
    assert t[1, 16, 10] == 1.0
    assert w[2, 0] == 0 and t[2].sum() == 0
    assert w[3, 0] == 1 and t[3].max() > 0
    assert w[4, 0] == 0 and t[4].sum() == 0
    np.testing.assert_allclose(t[0, 15, 12], np.exp(-4 / 8), rtol=1e-6)  # exp(-d^2 / 2 sigma^2)
    assert t[0, 15, 17] == 0  # outside the 3-sigma window


# ----------------------------------------------------------------------------- decode

def _identity_like(n=1):
    # heatmap 48x64 -> image: x_img = 100 + (x_hm - 24) * 2, y_img = 100 + (y_hm - 32) * 2
    return np.tile([[100.0, 100.0]], (n, 1)), np.tile([[48 * 2 / 200, 64 * 2 / 200]], (n, 1))


def test_decode_quarter_offset_toward_higher_neighbour():
    h = np.zeros((1, 17, 64, 48), np.float32)
    h[0, 0, 20, 10] = 1.0
    h[0, 0, 20, 11] = 0.5  # right neighbour higher -> +0.25 in x
    h[0, 0, 19, 10] = 0.3  # upper neighbour higher -> -0.25 in y
    h[0, 1, 30, 30] = 0.8  # flat neighbourhood -> no offset
    h[0, 2, 1, 5] = 0.9  # py = 1 is outside the reference's (1, h-1) bounds -> no offset
    h[0, 2, 2, 5] = 0.5
    h[0, 3] = -1.0  # no positive maximum -> (0, 0) with maxval <= 0
    c, s = _identity_like()
    coords, maxvals = kp.decode_heatmaps(h, c, s)
    assert coords.shape == (1, 17, 2) and maxvals.shape == (1, 17, 1)
    to_img = lambda x, y: (100 + (x - 24) * 2, 100 + (y - 32) * 2)  # noqa: E731
    np.testing.assert_allclose(coords[0, 0], to_img(10.25, 19.75), atol=1e-4)
    np.testing.assert_allclose(coords[0, 1], to_img(30, 30), atol=1e-4)
    np.testing.assert_allclose(coords[0, 2], to_img(5, 1), atol=1e-4)
    np.testing.assert_allclose(maxvals[0, :3, 0], (1.0, 0.8, 0.9))
    raw, _ = kp.decode_heatmaps(h, c, s, post_process=False)
    np.testing.assert_allclose(raw[0, 0], to_img(10, 20), atol=1e-4)
    np.testing.assert_allclose(coords[0, 3], to_img(0, 0), atol=1e-4)
    # torch input and a batch
    t_coords, _ = kp.decode_heatmaps(torch.from_numpy(np.concatenate([h, h])), *_identity_like(2))
    np.testing.assert_allclose(t_coords[1], coords[0], atol=1e-5)


def test_encode_decode_round_trip_sub_pixel():
    """Render a Gaussian target for random joints, decode: error below half a heatmap pixel."""
    rng = np.random.default_rng(0)
    center, scale = np.array([300.0, 250.0]), np.array([1.2, 1.6])
    t = kp.get_affine_transform(center, scale, 0, (192, 256))
    img_pts = rng.uniform([200, 120], [400, 380], (17, 2))
    crop = kp.affine_transform(img_pts, t)
    target, w = kp.generate_target(crop, np.ones(17), (256, 192), (64, 48), 2.0)
    coords, maxvals = kp.decode_heatmaps(target[None], center[None], scale[None])
    px = scale[0] * 200 / 48  # image pixels per heatmap pixel
    err = np.linalg.norm(coords[0] - img_pts, axis=1) / px
    assert err.max() < 0.75 and err.mean() < 0.5
    assert (maxvals == 1).all()


# ----------------------------------------------------------------------------- rescoring, NMS

def test_rescore():
    assert kp.rescore(0.5, [0.1, 0.3, 0.5, 0.2]) == pytest.approx(0.5 * 0.4)  # only > 0.2 count
    assert kp.rescore(0.9, [0.1, 0.2]) == 0.0


def _pose(x0, y0, score, area=10000.0):
    k = np.zeros((17, 3))
    k[:, 0] = x0 + np.arange(17) * 5
    k[:, 1] = y0 + np.arange(17) * 7
    k[:, 2] = 0.9
    return {"keypoints": k, "score": score, "area": area}


def test_oks_nms_behaviour():
    assert kp.oks_nms([]) == []
    a, b, c = _pose(0, 0, 0.9), _pose(0.5, 0.5, 0.95), _pose(300, 300, 0.5)
    keep = kp.oks_nms([a, b, c], thresh=0.9)
    assert keep == [1, 2]  # a duplicates the better b; c is another person
    assert kp.oks_iou(a["keypoints"], b["keypoints"][None].reshape(1, -1), 1e4, np.array([1e4]))[0] > 0.99
    # a pose far enough to have OKS below 0.9 but above 0.5 survives at 0.9, not at 0.5
    d = _pose(6, 6, 0.8)
    ovr = kp.oks_iou(b["keypoints"], d["keypoints"].reshape(1, -1), 1e4, np.array([1e4]))[0]
    assert 0.5 < ovr < 0.9
    assert kp.oks_nms([b, d], 0.9) == [0, 1]
    assert kp.oks_nms([b, d], 0.5) == [0]
    # joints ignored below in_vis_thresh: only confident joints count
    e = _pose(0.5, 0.5, 0.7)
    e["keypoints"][:, 2] = 0.1
    ovr = kp.oks_iou(b["keypoints"], e["keypoints"].reshape(1, -1), 1e4, np.array([1e4]), in_vis_thresh=0.2)
    assert ovr[0] == 0.0


# ----------------------------------------------------------------------------- evaluation

def _gt_as_predictions(score=1.0):
    data = json.loads(SAMPLE_ANN.read_text())
    return [{"image_id": a["image_id"], "category_id": 1, "keypoints": a["keypoints"], "score": score}
            for a in data["annotations"] if a["num_keypoints"] > 0]


def test_evaluate_coco_perfect_and_empty(tmp_path):
    m = kp.evaluate_coco(_gt_as_predictions(), SAMPLE_ANN, out_json=tmp_path / "res.json")
    assert set(kp.METRIC_NAMES) <= set(m)
    assert m["ap"] == pytest.approx(100.0) and m["ar"] == pytest.approx(100.0)
    assert len(json.loads((tmp_path / "res.json").read_text())) == 12
    z = kp.evaluate_coco([], SAMPLE_ANN)
    assert z["ap"] == 0.0


def test_evaluate_coco_penalises_wrong_keypoints():
    preds = _gt_as_predictions()
    for p in preds[::2]:
        k = np.asarray(p["keypoints"], float).reshape(17, 3)
        k[:, :2] += 40.0
        p["keypoints"] = k.reshape(-1).tolist()
    m = kp.evaluate_coco(preds, SAMPLE_ANN)
    assert m["ap"] < 70.0


def test_evaluate_predictions_rescoring_and_nms():
    data = json.loads(SAMPLE_ANN.read_text())
    anns = [a for a in data["annotations"] if a["num_keypoints"] > 0]
    preds, boxes, ids = [], [], []
    for a in anns:
        k = np.asarray(a["keypoints"], float).reshape(17, 3)
        k[:, 2] = 0.9
        for dup in range(2):  # every person twice: OKS-NMS must remove the copies
            preds.append(k + [[dup * 0.1, 0, 0]])
            boxes.append([0, 0, 1, 1, a["area"], 1.0 - 0.1 * dup])
            ids.append(a["image_id"])
    m = kp.evaluate_predictions(np.stack(preds), np.array(boxes), np.array(ids), SAMPLE_ANN)
    assert m["num_poses"] == len(anns)
    assert m["ap"] == pytest.approx(100.0)
    valid = np.ones(len(ids), bool)
    valid[:4] = False  # the first two people's rows dropped
    m2 = kp.evaluate_predictions(np.stack(preds), np.array(boxes), np.array(ids), SAMPLE_ANN, valid=valid)
    assert m2["num_poses"] == len(anns) - 2 and m2["ar"] < 100.0


def test_keypoint_evaluator_gathers_and_dedups():
    ev = kp.KeypointEvaluator(SAMPLE_ANN)
    h = np.zeros((2, 17, 64, 48), np.float32)
    h[:, :, 30, 20] = 1.0
    meta = {"center": torch.tensor([[300.0, 200.0]] * 2), "scale": torch.tensor([[1.0, 1.33]] * 2),
            "score": torch.ones(2), "image_id": torch.tensor([785, 785]), "index": torch.tensor([0, 1])}
    ev.update(h, meta)
    st = ev.state()
    assert st["preds"].shape == (2, 17, 3) and st["boxes"].shape == (2, 6)
    np.testing.assert_allclose(st["boxes"][0, 4], 200 * 1.0 * 200 * 1.33, rtol=1e-5)  # area = prod(scale*200)
    ev.load_state([st, st])  # e.g. a DistributedSampler padded the second rank with the same indices
    assert ev.state()["preds"].shape[0] == 2
    m = ev.compute()
    assert 0.0 <= m["ap"] <= 100.0

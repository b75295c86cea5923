"""The uint8 and GPU-decode input pipelines (data/feeding.py) against the classic transforms, on the
real COCO photos of tests/data and on copies re-encoded at ImageNet's typical size."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from data.feeding import (DeviceFeed, EncodedReader, TrainParams, Uint8TrainReader, Uint8ValReader, collate_encoded,
                          resolve_pipeline)
from data.imagenet import load_image
from data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_train_transform, build_val_transform
from dyrelu.errors import BadValueError

PHOTOS = sorted((Path(__file__).parent / "data" / "coco_sample" / "images").glob("*.jpg"))
MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)
# torchvision's decoders warn that TorchCodec supersedes them (0.29); they are what this path uses
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
DRAWS = 2000          # per side of the two-sample KS test: a shift of ~5% of a spread is found
KS_P_MIN = 1e-3       # fixed seeds: the p-values are deterministic


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The COCO photos and the same photos re-encoded at ImageNet's typical size (longer side 500, q90)."""
    d = tmp_path_factory.mktemp("imagenet_sized")
    small = []
    for p in PHOTOS:
        img = Image.open(p).convert("RGB")
        w, h = img.size
        k = 500 / max(w, h)
        out = d / p.name
        img.resize((round(w * k), round(h * k)), Image.BICUBIC).save(out, quality=90)
        small.append(out)
    return [str(p) for p in PHOTOS] + [str(p) for p in small]


def _unnormalise(x: torch.Tensor) -> torch.Tensor:
    return (x * STD + MEAN) * 255.0


def test_resolve_pipeline():
    assert resolve_pipeline("auto", "cpu", "cpu") == "classic"   # CPU runs keep today's pixels
    assert resolve_pipeline("auto", "cpu", "cuda") == "uint8"
    assert resolve_pipeline("uint8", "cpu", "cpu") == "uint8"
    assert resolve_pipeline("auto", "gpu", "cpu") == "gpu_decode"
    for bad in (("fast", "cpu"), ("auto", "nvjpeg"), ("classic", "gpu")):
        with pytest.raises(BadValueError):
            resolve_pipeline(*bad, "cuda")


@pytest.mark.parametrize("crop,resize", [(224, 256), (48, 56)])
def test_eval_pixels_match_classic(photos, crop, resize):
    classic = build_val_transform(crop, resize=resize)
    uint8 = Uint8ValReader(crop, resize=resize)
    feed = DeviceFeed("gpu_decode", crop, resize=resize)
    enc = EncodedReader(None)
    for p in photos:
        ref = _unnormalise(classic(load_image(p)))
        img, row = uint8(p)
        assert img.dtype == torch.uint8 and img.shape == (3, crop, crop) and row.numel() == 0
        new = img.float()
        assert (new - ref).abs().mean() <= 1.0, p
        x, _ = feed(collate_encoded([(enc(p), 0)]), "cpu")
        assert (_unnormalise(x[0]) - ref).abs().mean() <= 1.0, p


def test_train_crop_is_classic_crop_for_the_same_seed(photos):
    """Same seed, no jitter, full decode: the uint8 crop and flip are today's pixels (torch's
    uint8 antialiased resize in place of PIL's: the same filter, rounding apart)."""
    classic = build_train_transform(64, color_jitter=0.0)
    reader = Uint8TrainReader(TrainParams(64), draft=False)
    for k, p in enumerate(photos[:4]):
        torch.manual_seed(k)
        ref = classic(load_image(p))
        torch.manual_seed(k)
        img, row = reader(p)
        diff = (img.float() - _unnormalise(ref)).abs()
        assert diff.mean() < 0.05 and diff.max() <= 2.5, p


def _scale_logratio(rows, area):
    h, w = rows[:, 2], rows[:, 3]
    return (h * w / area).numpy(), torch.log(w / h).numpy()


def test_crop_distribution_matches_random_resized_crop(tmp_path):
    """Crops of the readers that run (uint8, and the GPU-decode rows) against torchvision's own
    RandomResizedCrop draws: two-sample KS tests on scale and log aspect ratio."""
    from scipy.stats import ks_2samp
    from torchvision import transforms as T

    path = tmp_path / "fixed.jpg"  # small: the readers decode it 4,000 times
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
    img = Image.open(path)
    torch.manual_seed(1)
    ref = torch.tensor([T.RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(DRAWS)],
                       dtype=torch.float32)
    ref_scale, ref_logr = _scale_logratio(ref, 48 * 64)
    reader = Uint8TrainReader(TrainParams(8, color_jitter=0.4))
    enc = EncodedReader(TrainParams(8, color_jitter=0.4))
    torch.manual_seed(2)
    rows_u8 = torch.stack([reader(str(path))[1] for _ in range(DRAWS)])
    torch.manual_seed(3)
    rows_enc = torch.stack([enc(str(path))[1] for _ in range(DRAWS)])
    for rows in (rows_u8, rows_enc):
        scale, logr = _scale_logratio(rows, 48 * 64)
        assert ks_2samp(scale, ref_scale).pvalue > KS_P_MIN
        assert ks_2samp(logr, ref_logr).pvalue > KS_P_MIN
        assert abs(rows[:, 4].mean().item() - 0.5) < 4 * math.sqrt(0.25 / DRAWS)  # the flip


def test_normalised_batches_match_classic(photos):
    """Mean and std of normalised training batches (paper recipe: jitter 0.4) per channel: the
    uint8 path (jitter on the 'device', here the CPU) and the GPU-decode path against today's."""
    n, crop = 96, 48
    classic = build_train_transform(crop, color_jitter=0.4)
    params = TrainParams(crop, color_jitter=0.4)
    u8, enc = Uint8TrainReader(params), EncodedReader(params)
    feed_u8, feed_gpu = DeviceFeed("uint8", crop, color_jitter=0.4), DeviceFeed("gpu_decode", crop, color_jitter=0.4)
    ref, a, b = [], [], []
    for k in range(n):
        p = photos[k % len(photos)]
        torch.manual_seed(k)
        ref.append(classic(load_image(p)))
        torch.manual_seed(k)
        a.append((u8(p), k))
        torch.manual_seed(k)
        b.append((enc(p), k))
    ref = torch.stack(ref)
    xa, ta = feed_u8(default_collate(a), "cpu", channels_last=True)
    xb, tb = feed_gpu(collate_encoded(b), "cpu")
    assert xa.dtype == xb.dtype == torch.float32 and xa.shape == xb.shape == ref.shape
    assert xa.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ta, torch.arange(n)) and torch.equal(tb, torch.arange(n))
    for x in (xa, xb):
        assert torch.allclose(x.mean(dim=(0, 2, 3)), ref.mean(dim=(0, 2, 3)), atol=0.03)
        assert torch.allclose(x.std(dim=(0, 2, 3)), ref.std(dim=(0, 2, 3)), rtol=0.03)


def test_gpu_decode_skips_a_corrupt_jpeg_by_name(photos, tmp_path, caplog):
    data = Path(photos[0]).read_bytes()
    broken = tmp_path / "broken.JPEG"
    broken.write_bytes(data[: len(data) // 3])           # header fine, data cut short
    png = tmp_path / "really_a_png.JPEG"
    Image.open(photos[1]).convert("RGB").save(png, format="PNG")
    enc = EncodedReader(TrainParams(32))
    feed = DeviceFeed("gpu_decode", 32)
    batch = collate_encoded([(enc(photos[0]), 0), (enc(str(broken)), 1), (enc(str(png)), 2)])
    with caplog.at_level(logging.WARNING):
        x, t = feed(batch, "cpu")
    assert x.shape == (2, 3, 32, 32) and t.tolist() == [0, 2]
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and str(broken) in lines[0]
    assert feed.bad_files == [str(broken)]


def test_draft_applies_only_when_the_crop_allows(photos):
    """A reduced decode happens only for crops at least twice the output on each side; the crop's
    pixels then still match a full decode closely."""
    reader = Uint8TrainReader(TrainParams(32, scale=(0.5, 1.0)))
    full = Uint8TrainReader(TrainParams(32, scale=(0.5, 1.0)), draft=False)
    for k in range(8):
        torch.manual_seed(k)
        a, row = reader(photos[0])
        torch.manual_seed(k)
        b, _ = full(photos[0])
        assert (a.float() - b.float()).abs().mean() < 4.0
    assert reader.stats["reduced"] == reader.stats["images"] == 8  # 640x425 photo, crops >= 200 px -> 1/4 or 1/8


def test_task_uint8_and_gpu_decode_to_device():
    """The classification task builds the readers and finishes batches in to_device."""
    from omegaconf import OmegaConf

    from engine.tasks.cls import ClassificationTask
    from runs import compose

    for over, collate in ((["data.pipeline=uint8"], None), (["data.decode=gpu"], collate_encoded)):
        cfg = compose(["trainer.device=cpu", "data.train_per_class=4", "data.val_per_class=2", "data.image_size=40",
                       "data.crop_size=32", "data.val_resize=32", "aug.color_jitter=0.4", *over])
        task = ClassificationTask(cfg)
        train, val = task.build_datasets()
        assert task.collate_fn() is collate
        coll = task.collate_fn() or default_collate
        for ds in (train, val):
            x, t = task.to_device(coll([ds[i] for i in range(4)]), torch.device("cpu"), True)
            assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and t.shape == (4,)
    cfg = compose(["trainer.device=cpu"])
    assert OmegaConf.select(cfg, "data.pipeline") == "auto"
    task = ClassificationTask(cfg)
    assert task._pipeline() == "classic" and task.feed is None


def test_device_jitter_is_torchvisions_per_image():
    """The batched jitter equals torchvision's adjust_brightness / contrast / saturation applied
    image by image in each image's order, with its factors."""
    from torchvision.transforms.v2 import functional as F

    from data.feeding import PARAM_COLUMNS, _jitter

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 10, generator=g)
    rows = torch.zeros(6, len(PARAM_COLUMNS))
    rows[:, 5:8] = 0.6 + 0.8 * torch.rand(6, 3, generator=g)
    rows[:, 8:11] = torch.stack([torch.randperm(3, generator=g) for _ in range(6)]).float()
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    ref = []
    for img, row in zip(x, rows):
        for op in row[8:11].long().tolist():
            img = ops[op](img, float(row[5 + op]))
        ref.append(img)
    for per_image in (True, False):  # the CPU's loop and the accelerators' batched maps
        flat = x.permute(0, 2, 3, 1).reshape(6, 80, 3).clone()
        got = _jitter(flat, rows, 1.0, per_image=per_image).view(6, 8, 10, 3).permute(0, 3, 1, 2)
        assert torch.allclose(got, torch.stack(ref), atol=1e-5), per_image


def test_gpu_data_check_runs_on_the_cpu():
    """gpu_check's input-pipeline section (scripts/_gpu_data_check.py), its code path at tiny sizes."""
    from runs import load_script

    out = load_script("_gpu_data_check").check("cpu", quick=True)
    assert out["failures"] == [] and set(out["img_s"]) == {"decode", "gpu_decode_train", "gpu_decode_eval", "uint8_device_step"}


def test_uint8_reader_skips_bad_files_like_today(photos, tmp_path, caplog):
    """A truncated JPEG read by the uint8 worker is a BadImageError: skipped and named once."""
    from data.imagenet import RobustImageFolder

    for split in ("train", "val"):
        d = tmp_path / split / "n0"
        d.mkdir(parents=True)
        (d / "a.JPEG").write_bytes(Path(photos[0]).read_bytes())
        (d / "b.JPEG").write_bytes(Path(photos[1]).read_bytes()[:5000])
    ds = RobustImageFolder(tmp_path, "train", reader=Uint8TrainReader(TrainParams(32)), scan_bad_images=False)
    with caplog.at_level(logging.WARNING):
        img, target = ds[1]  # b.JPEG is bad: the next sample (a.JPEG) comes back
    assert img[0].shape == (3, 32, 32) and target == 0
    assert ds.bad_files == [str(tmp_path / "train" / "n0" / "b.JPEG")]

"""Classification data: the demo dataset, the robust ImageFolder reader, transforms, the registry."""
from __future__ import annotations

import hashlib
import io
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import BadImageError, DatasetLayoutError, RobustImageFolder, build_cls_datasets, check_imagenet_root
from data import demo as demo_mod
from data.imagenet import LAYOUT, load_image, read_bad_files_log

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(num_classes=4, train_per_class=3, val_per_class=2, image_size=32, seed=0)


def _tree_digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------
# demo dataset
# ------------------------------------------------------------------------------------------

def test_demo_layout_is_imagenet(tmp_path):
    root = demo_mod.ensure_demo_dataset(tmp_path / "demo", **SMALL)
    assert root == tmp_path / "demo"
    for split, per in (("train", 3), ("val", 2)):
        classes = sorted(p.name for p in (root / split).iterdir())
        assert classes == demo_mod.class_wnids(4)
        assert all(c.startswith("n") and len(c) == 9 and c[1:].isdigit() for c in classes)
        for c in classes:
            files = sorted((root / split / c).iterdir())
            assert len(files) == per and all(f.suffix == ".JPEG" for f in files)
            with Image.open(files[0]) as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (32, 32)
    assert check_imagenet_root(root) == demo_mod.class_wnids(4)
    assert demo_mod.read_manifest(root)["params"] == SMALL
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_demo_deterministic_and_idempotent(tmp_path):
    a = demo_mod.ensure_demo_dataset(tmp_path / "a", **SMALL)
    b = demo_mod.ensure_demo_dataset(tmp_path / "b", **SMALL)
    assert _tree_digest(a) == _tree_digest(b)
    # a second call reuses the folder: nothing is rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in a.rglob("*")}
    assert demo_mod.ensure_demo_dataset(tmp_path / "a", **SMALL) == a
    assert {p: p.stat().st_mtime_ns for p in a.rglob("*")} == mtimes
    # another seed gives other images; more images per class keep the first ones unchanged
    c = demo_mod.ensure_demo_dataset(tmp_path / "c", **{**SMALL, "seed": 1})
    assert _tree_digest(c)["train/n09000000/n09000000_train_00000.JPEG"] != \
        _tree_digest(a)["train/n09000000/n09000000_train_00000.JPEG"]
    d = demo_mod.ensure_demo_dataset(tmp_path / "d", **{**SMALL, "train_per_class": 5})
    da, dd = _tree_digest(a), _tree_digest(d)
    assert all(dd[k] == v for k, v in da.items() if k.startswith("train/"))


def test_demo_regenerates_on_param_change_and_refuses_foreign_folder(tmp_path):
    root = demo_mod.ensure_demo_dataset(tmp_path / "demo", **SMALL)
    root = demo_mod.ensure_demo_dataset(tmp_path / "demo", **{**SMALL, "num_classes": 3})
    assert len(list((root / "train").iterdir())) == 3
    assert demo_mod.read_manifest(root)["params"]["num_classes"] == 3
    # a dataset drawn by an older recipe (same parameters) is regenerated too
    m = demo_mod.read_manifest(root)
    m["revision"] = demo_mod.REVISION - 1
    (root / "manifest.json").write_text(__import__("json").dumps(m))
    assert demo_mod.ensure_demo_dataset(root, **{**SMALL, "num_classes": 3}) == root
    assert demo_mod.read_manifest(root)["revision"] == demo_mod.REVISION
    foreign = tmp_path / "mine"
    (foreign / "x").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="mine"):
        demo_mod.ensure_demo_dataset(foreign, **SMALL)
    assert (foreign / "x").is_dir()


def test_demo_default_root_uses_cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DYRELU_CACHE", str(tmp_path / "cache"))
    assert demo_mod.default_root() == tmp_path / "cache" / "demo_imagenet_v1"
    assert demo_mod.default_root(**demo_mod.DEFAULTS) == tmp_path / "cache" / "demo_imagenet_v1"
    other = demo_mod.default_root(num_classes=12)
    assert other.parent == tmp_path / "cache" and other != demo_mod.default_root()
    root = demo_mod.ensure_demo_dataset(None, **SMALL)
    assert root.parent == tmp_path / "cache" and (root / "manifest.json").is_file()


def test_demo_concurrent_processes(tmp_path):
    target = tmp_path / "shared" / "demo"
    # load data/demo.py on its own (numpy + PIL only) so the processes start fast and overlap
    code = ("import sys, importlib.util as u; s = u.spec_from_file_location('demo', sys.argv[2]); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); "
            "print(m.ensure_demo_dataset(sys.argv[1], num_classes=5, train_per_class=12, val_per_class=4, "
            "image_size=32, seed=3))")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(target), demo_mod.__file__], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.strip() == str(target)
    ref = demo_mod.ensure_demo_dataset(tmp_path / "ref", num_classes=5, train_per_class=12, val_per_class=4,
                                       image_size=32, seed=3)
    assert _tree_digest(target) == _tree_digest(ref)
    leftovers = [p.name for p in target.parent.iterdir() if p.name != "demo" and not p.name.endswith(".lock")]
    assert leftovers == []


def test_demo_lost_rename_race_uses_winner(tmp_path, monkeypatch):
    """Without a working lock (no fcntl, odd filesystem) the loser of the final rename uses the
    winner's complete folder and cleans up its own temp folder."""
    target = tmp_path / "demo"
    real = demo_mod.generate_demo_dataset

    def generate_while_another_process_wins(out, **params):
        real(target, **params)  # the "other process" finishes first
        return real(out, **params)

    import data.cache

    monkeypatch.setattr(data.cache, "fcntl", None)
    monkeypatch.setattr(demo_mod, "generate_demo_dataset", generate_while_another_process_wins)
    assert demo_mod.ensure_demo_dataset(target, **SMALL) == target
    assert demo_mod.read_manifest(target)["params"] == SMALL
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_demo_class_specs():
    assert demo_mod.class_names(10)[:4] == ["circle_solid", "circle_stripes", "square_solid", "square_stripes"]
    assert len(set(demo_mod.class_specs(10))) == 10
    assert len(set(demo_mod.class_specs(demo_mod.MAX_CLASSES))) == demo_mod.MAX_CLASSES
    with pytest.raises(ValueError):
        demo_mod.class_specs(demo_mod.MAX_CLASSES + 1)
    # classes sharing a hue family differ in shape and in pattern: colour alone is not enough
    specs = demo_mod.class_specs(10)
    for a in specs:
        for b in specs:
            if a != b and demo_mod.hue_family(*a) == demo_mod.hue_family(*b):
                assert a[0] != b[0] and a[1] != b[1]


# ------------------------------------------------------------------------------------------
# RobustImageFolder with odd and bad files
# ------------------------------------------------------------------------------------------

def _rgb(seed=0, size=(20, 16)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture
def messy_root(tmp_path):
    """train/ and val/ with two classes; train/n001 holds every odd and bad kind of file."""
    root = tmp_path / "imnet"
    for split in ("train", "val"):
        for c in ("n001", "n002"):
            (root / split / c).mkdir(parents=True)
            _rgb(hash((split, c)) % 1000).save(root / split / c / "ok.JPEG", "JPEG")
    d = root / "train" / "n001"
    _rgb(1).convert("L").save(d / "gray.JPEG", "JPEG")
    _rgb(2).convert("CMYK").save(d / "cmyk.JPEG", "JPEG")
    _rgb(3).save(d / "png_named.JPEG", "PNG")
    _rgb(4).convert("P").save(d / "palette.png", "PNG")
    (d / "empty.JPEG").write_bytes(b"")
    buf = io.BytesIO()
    _rgb(5, size=(64, 64)).save(buf, "JPEG", quality=95)
    (d / "truncated.JPEG").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "text.JPEG").write_text("this is not an image\n")
    (d / "notes.txt").write_text("ignored: not an image extension")
    good = {"ok.JPEG", "gray.JPEG", "cmyk.JPEG", "png_named.JPEG", "palette.png"}
    bad = {"empty.JPEG", "truncated.JPEG", "text.JPEG"}
    return root, good, bad


def _to_tensor(img):
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def test_odd_formats_decode_to_rgb(messy_root):
    root, good, _ = messy_root
    for name in good:
        img = load_image(root / "train" / "n001" / name)
        assert img.mode == "RGB" and img.size == (20, 16)
    with Image.open(root / "train" / "n001" / "cmyk.JPEG") as im:
        assert im.mode == "CMYK"
    with Image.open(root / "train" / "n001" / "png_named.JPEG") as im:
        assert im.format == "PNG"


@pytest.mark.parametrize("scan", [True, False])
def test_bad_images_skipped_counted_logged(messy_root, caplog, scan):
    root, good, bad = messy_root
    caplog.set_level(logging.WARNING, logger="data.imagenet")
    ds = RobustImageFolder(root, "train", transform=_to_tensor, scan_bad_images=scan)
    assert ds.classes == ["n001", "n002"] and ds.class_to_idx == {"n001": 0, "n002": 1}
    names = {Path(p).name for p, _ in ds.samples}
    assert "notes.txt" not in names
    got = [ds[i] for i in range(len(ds))]
    for x, y in got:
        assert x.shape[0] == 3 and x.dtype == torch.uint8 and y in (0, 1)
    if scan:  # bad files were removed up front: exact length and count
        assert len(ds) == len(good) + 1 and names == good | {"ok.JPEG"}
    else:  # lazy: every index still yields a good sample (the next one), bad files counted on the way
        assert len(ds) == len(good) + len(bad) + 1
    assert sorted(Path(p).name for p in ds.bad_files) == sorted(bad)
    assert ds.num_bad_files == 3
    for p in ds.bad_files:
        assert p in caplog.text
    assert "empty file" in ds.bad_file_reasons[str(root / "train" / "n001" / "empty.JPEG")]


def test_lazy_skip_returns_next_sample_and_logs_once(messy_root, caplog):
    root, _, _ = messy_root
    caplog.set_level(logging.WARNING, logger="data.imagenet")
    ds = RobustImageFolder(root, "train", scan_bad_images=False)
    i = [Path(p).name for p, _ in ds.samples].index("empty.JPEG")
    img, target = ds[i]
    assert img.mode == "RGB" and target == 0
    ds[i]
    assert caplog.text.count("empty.JPEG") == 1


def test_bad_files_log_collects_from_dataloader_workers(messy_root, tmp_path):
    root, _, bad = messy_root
    log_file = tmp_path / "bad_images.tsv"
    ds = RobustImageFolder(root, "train", transform=_to_tensor, scan_bad_images=False, bad_files_log=log_file)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2)
    assert sum(1 for _ in loader) == len(ds)
    assert ds.bad_files == []  # the workers found them, not this process
    found = read_bad_files_log(log_file)
    assert sorted(Path(p).name for p in found) == sorted(bad)


def test_no_skip_raises_bad_image_error_naming_file(messy_root):
    root, _, _ = messy_root
    with pytest.raises(BadImageError, match=r"empty\.JPEG|truncated\.JPEG|text\.JPEG") as ei:
        RobustImageFolder(root, "train", skip_bad_images=False, scan_bad_images=True)
    assert "2 more bad file" in str(ei.value)
    ds = RobustImageFolder(root, "train", skip_bad_images=False, scan_bad_images=False)
    for name in ("empty.JPEG", "truncated.JPEG", "text.JPEG"):
        i = [Path(p).name for p, _ in ds.samples].index(name)
        with pytest.raises(BadImageError) as ei:
            ds[i]
        assert ei.value.path.endswith(name) and name in str(ei.value)
        # no chained PIL traceback: the error itself says what is wrong
        assert ei.value.__cause__ is None and (ei.value.__context__ is None or ei.value.__suppress_context__)


def test_no_skip_error_crosses_dataloader_worker(messy_root):
    root, _, _ = messy_root
    ds = RobustImageFolder(root, "train", transform=_to_tensor, skip_bad_images=False, scan_bad_images=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=1)
    with pytest.raises(BadImageError, match=r"bad image file .*\.JPEG"):
        for _ in loader:
            pass


def test_val_uses_train_mapping(messy_root):
    root, _, _ = messy_root
    (root / "train" / "n000").mkdir()
    _rgb(9).save(root / "train" / "n000" / "a.JPEG")
    val = RobustImageFolder(root, "val")
    assert val.class_to_idx == {"n000": 0, "n001": 1, "n002": 2}
    assert sorted(set(val.targets)) == [1, 2]
    (root / "val" / "n999").mkdir()
    _rgb(9).save(root / "val" / "n999" / "a.JPEG")
    with pytest.raises(DatasetLayoutError, match="n999"):
        RobustImageFolder(root, "val")
    with pytest.raises(ValueError, match="n999"):
        check_imagenet_root(root)


# ------------------------------------------------------------------------------------------
# layout errors
# ------------------------------------------------------------------------------------------

def _layout_cases(tmp_path):
    missing = tmp_path / "does_not_exist"
    empty = tmp_path / "empty"
    empty.mkdir()
    no_val = tmp_path / "no_val"
    (no_val / "train" / "n1").mkdir(parents=True)
    _rgb().save(no_val / "train" / "n1" / "a.JPEG")
    no_classes = tmp_path / "no_classes"
    (no_classes / "train").mkdir(parents=True)
    (no_classes / "val").mkdir()
    no_images = tmp_path / "no_images"
    for s in ("train", "val"):
        (no_images / s / "n1").mkdir(parents=True)
        (no_images / s / "n1" / "readme.txt").write_text("x")
    flat_val = tmp_path / "flat_val"
    (flat_val / "train" / "n1").mkdir(parents=True)
    _rgb().save(flat_val / "train" / "n1" / "a.JPEG")
    (flat_val / "val").mkdir()
    _rgb().save(flat_val / "val" / "ILSVRC2012_val_00000001.JPEG")
    return [(missing, "does not exist"), (empty, "is empty"), (no_val, "no 'val' folder"),
            (no_classes, "no class folders"), (no_images, "no images"), (flat_val, "valprep")]


def test_layout_errors_name_path_and_layout(tmp_path):
    for root, what in _layout_cases(tmp_path):
        for exc in (FileNotFoundError, ValueError):
            with pytest.raises(exc) as ei:
                check_imagenet_root(root)
            msg = str(ei.value)
            assert isinstance(ei.value, DatasetLayoutError)
            assert str(root) in msg and what in msg and LAYOUT in msg, msg
        with pytest.raises(DatasetLayoutError, match="root/train/<wnid>"):
            build_cls_datasets("imagenet", root, crop_size=32)
    for root in (None, ""):
        with pytest.raises(DatasetLayoutError, match="not set"):
            build_cls_datasets("imagenet", root, crop_size=32)


# ------------------------------------------------------------------------------------------
# registry, builders, transforms
# ------------------------------------------------------------------------------------------

def test_registry():
    assert {"demo", "imagenet"} <= set(data.list_datasets("cls"))
    with pytest.raises(ValueError, match="demo.*imagenet|imagenet.*demo"):
        build_cls_datasets("imagenet21k", None)

    @data.register_dataset("unit_test_kpt", task="kpt")
    def _kpt(**kw):
        return "built", kw

    try:
        assert "unit_test_kpt" in data.list_datasets("kpt") and "unit_test_kpt" not in data.list_datasets("cls")
        assert data.build_dataset("unit_test_kpt", a=1) == ("built", {"a": 1})
        with pytest.raises(ValueError, match="unknown cls dataset"):
            build_cls_datasets("unit_test_kpt", None)
        with pytest.raises(ValueError, match="already registered"):
            data.register_dataset("unit_test_kpt", lambda: None)
    finally:
        data._REGISTRY.pop("unit_test_kpt", None)


def test_build_demo_datasets(tmp_path):
    train, val, nc, names = build_cls_datasets("demo", tmp_path / "demo", crop_size=24, **SMALL)
    assert nc == 4 and names == demo_mod.class_names(4)
    assert len(train) == 12 and len(val) == 8 and train.scanned and val.scanned
    x, y = train[0]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and 0 <= y < 4
    xv, _ = val[0]
    assert xv.shape == (3, 24, 24)
    assert val.class_to_idx == train.class_to_idx
    # val is deterministic, train augmented
    assert torch.equal(val[0][0], val[0][0])


def test_build_imagenet_datasets(messy_root):
    root, good, _ = messy_root
    train, val, nc, names = build_cls_datasets("imagenet", root, crop_size=16, color_jitter=0.0,
                                               crop_scale=[0.5, 1.0])
    assert nc == 2 and names == ["n001", "n002"] and len(train) == len(good) + 1 and len(val) == 2
    assert train[0][0].shape == (3, 16, 16) and val[0][0].shape == (3, 16, 16)
    (root / "LOC_synset_mapping.txt").write_text("n001 tench, Tinca tinca\nn002 goldfish\n")
    assert build_cls_datasets("imagenet", root, crop_size=16)[3] == ["tench, Tinca tinca", "goldfish"]


def test_transforms():
    from data.transforms import build_train_transform, build_val_transform, val_resize_for

    assert val_resize_for(224) == 256 and val_resize_for(56) == 64
    img = _rgb(0, size=(80, 60))
    tf = build_train_transform(48, color_jitter=0.4)
    assert any(type(t).__name__ == "ColorJitter" for t in tf.transforms)
    assert not any(type(t).__name__ == "ColorJitter" for t in build_train_transform(48, color_jitter=0).transforms)
    assert tf(img).shape == (3, 48, 48)
    vt = build_val_transform(48)
    assert vt.transforms[0].size == 54 and vt(img).shape == (3, 48, 48)
    assert torch.equal(vt(img), vt(img))
    with pytest.raises(ValueError):
        build_val_transform(48, resize=40)

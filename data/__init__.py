"""Datasets: a small registry plus the classification builders (no Hydra imports here).

    from data import build_cls_datasets
    train_ds, val_ds, num_classes, class_names = build_cls_datasets("demo", None, crop_size=64)

Registered names: ``demo`` (procedural images, generated once into a cache; see data/demo.py) and
``imagenet`` (ImageNet folder layout; see data/imagenet.py). Other tasks add their own with
:func:`register_dataset` (e.g. ``register_dataset("coco", build_coco, task="kpt")``) and are built
with :func:`build_dataset`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple
from dyrelu.errors import BadNameError

from .demo import ensure_demo_dataset
from .imagenet import (BadImageError, DatasetLayoutError, DatasetRootError, RobustImageFolder, check_imagenet_root,
                       read_bad_files_log)
from .transforms import build_train_transform, build_val_transform

__all__ = [
    "register_dataset", "list_datasets", "get_dataset", "build_dataset", "build_cls_datasets",
    "ensure_demo_dataset", "RobustImageFolder", "check_imagenet_root", "BadImageError",
    "DatasetRootError", "DatasetLayoutError", "read_bad_files_log", "build_train_transform", "build_val_transform",
]


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    builder: Callable
    task: str  # "cls", "kpt", ...


_REGISTRY: Dict[str, DatasetEntry] = {}


def register_dataset(name: str, builder: Optional[Callable] = None, *, task: str = "cls", overwrite: bool = False):
    """Register ``builder`` under ``name`` (usable as a decorator: ``@register_dataset("x", task="kpt")``).

    A "cls" builder has the signature of :func:`build_cls_datasets` minus ``name`` and returns
    ``(train_ds, val_ds, num_classes, class_names)``; other tasks define their own contract.
    """
    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY and not overwrite and _REGISTRY[name].builder is not fn:
            raise ValueError(f"dataset {name!r} is already registered")
        _REGISTRY[name] = DatasetEntry(name, fn, task)
        return fn

    return deco(builder) if builder is not None else deco


def list_datasets(task: Optional[str] = None) -> List[str]:
    return sorted(n for n, e in _REGISTRY.items() if task is None or e.task == task)


def get_dataset(name: str, task: Optional[str] = None) -> DatasetEntry:
    entry = _REGISTRY.get(name)
    if entry is None or (task is not None and entry.task != task):
        what = f"{task} dataset" if task else "dataset"
        raise BadNameError(f"unknown {what} {name!r}; valid: {', '.join(list_datasets(task))}")
    return entry


def build_dataset(name: str, *args, **kwargs):
    """Call the registered builder of ``name`` (any task)."""
    return get_dataset(name).builder(*args, **kwargs)


def build_cls_datasets(name: str, root=None, crop_size: Optional[int] = None, val_resize: Optional[int] = None,
                       color_jitter: float = 0.4, skip_bad_images: bool = True, **kw
                       ) -> Tuple[RobustImageFolder, RobustImageFolder, int, List[str]]:
    """Build (train_ds, val_ds, num_classes, class_names) for a classification dataset.

    ``crop_size`` None = the dataset's default (224 for imagenet, 64 for demo); ``val_resize`` None =
    int(crop_size / 0.875). Common kwargs: ``crop_scale`` (RandomResizedCrop scale), ``hflip``, ``interpolation``,
    ``scan_bad_images`` (None = auto), ``bad_files_log``, ``mean``, ``std``, ``pipeline`` ("classic", the
    default: float tensors; "uint8" or "gpu_decode": see data/feeding.py, whose ``DeviceFeed`` finishes
    the batch on the device), ``draft`` (uint8: reduced-size JPEG decode when the crop allows it). ``demo`` also takes
    ``num_classes``, ``train_per_class``, ``val_per_class``, ``image_size``, ``seed`` (its root
    None = the default cache, generated if needed).
    """
    if crop_size is not None:
        kw["crop_size"] = int(crop_size)
    return get_dataset(name, task="cls").builder(
        root=root, val_resize=val_resize, color_jitter=color_jitter,
        skip_bad_images=skip_bad_images, **kw)


def _image_folder_pair(root, crop_size, val_resize, color_jitter, skip_bad_images, crop_scale=(0.08, 1.0),
                       hflip=0.5, interpolation="bilinear", scan_bad_images=None, bad_files_log=None,
                       mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                       pipeline: str = "classic", draft: bool = True):
    crop_scale = (0.08, 1.0) if crop_scale is None else tuple(float(v) for v in crop_scale)
    check_imagenet_root(root)
    common = dict(skip_bad_images=skip_bad_images, scan_bad_images=scan_bad_images, bad_files_log=bad_files_log)
    if pipeline == "classic":
        norm = {k: tuple(v) for k, v in (("mean", mean), ("std", std)) if v is not None}
        train_tf = build_train_transform(crop_size, scale=crop_scale, color_jitter=color_jitter, hflip=hflip,
                                         interpolation=interpolation, **norm)
        val_tf = build_val_transform(crop_size, resize=val_resize, interpolation=interpolation, **norm)
        train_kw, val_kw = dict(transform=train_tf), dict(transform=val_tf)
    else:  # uint8 / gpu_decode: the samples are uint8 or bytes; data.feeding.DeviceFeed normalises on the device
        from .feeding import build_readers

        train_rd, val_rd = build_readers(pipeline, crop_size, scale=crop_scale, hflip=hflip, color_jitter=color_jitter,
                                         val_resize=val_resize, interpolation=interpolation, draft=draft)
        train_kw, val_kw = dict(reader=train_rd), dict(reader=val_rd)
    train_ds = RobustImageFolder(root, "train", **train_kw, **common)
    val_ds = RobustImageFolder(root, "val", class_to_idx=train_ds.class_to_idx, **val_kw, **common)
    return train_ds, val_ds, len(train_ds.classes), list(train_ds.class_names)


@register_dataset("imagenet", task="cls")
def build_imagenet(root=None, crop_size: int = 224, val_resize: Optional[int] = None, color_jitter: float = 0.4,
                   skip_bad_images: bool = True, **kw):
    """ImageNet (or any folder in its layout): root/train/<wnid>/*.JPEG, root/val/<wnid>/*.JPEG."""
    return _image_folder_pair(root, crop_size, val_resize, color_jitter, skip_bad_images, **kw)


DEMO_CROP_SCALE = (0.35, 1.0)  # the shapes fill about half the image: keep most of it in the crop


@register_dataset("demo", task="cls")
def build_demo(root=None, crop_size: int = 64, val_resize: Optional[int] = None, color_jitter: float = 0.4,
               skip_bad_images: bool = True, num_classes: int = 10, train_per_class: int = 160,
               val_per_class: int = 40, image_size: int = 72, seed: int = 0, crop_scale=DEMO_CROP_SCALE, **kw):
    """The procedural demo dataset (data/demo.py), generated into the cache on first use."""
    if root is not None and str(root).strip() == "":
        root = None
    if crop_scale is None:
        crop_scale = DEMO_CROP_SCALE
    root = ensure_demo_dataset(root, num_classes=num_classes, train_per_class=train_per_class,
                               val_per_class=val_per_class, image_size=image_size, seed=seed)
    kw.setdefault("scan_bad_images", True)
    return _image_folder_pair(root, crop_size, val_resize, color_jitter, skip_bad_images, crop_scale=crop_scale, **kw)

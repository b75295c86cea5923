"""Standard ImageNet classification transforms (torchvision), parameterised by crop size.

train: RandomResizedCrop(crop, scale) -> RandomHorizontalFlip -> ColorJitter(s, s, s) (optional,
       the paper trains with colour jitter) -> ToTensor -> Normalize
val:   Resize(int(crop / 0.875)) -> CenterCrop(crop) -> ToTensor -> Normalize
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875

_INTERP = {
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
    "nearest": InterpolationMode.NEAREST,
}


def _interp(name: str) -> InterpolationMode:
    try:
        return _INTERP[name]
    except KeyError:
        raise ValueError(f"unknown interpolation {name!r}; valid: {sorted(_INTERP)}") from None


def val_resize_for(crop_size: int, crop_pct: float = DEFAULT_CROP_PCT) -> int:
    """The resize before the center crop: int(crop / 0.875), e.g. 224 -> 256, 56 -> 64."""
    return int(crop_size / crop_pct)


def build_train_transform(crop_size: int = 224, scale: Tuple[float, float] = (0.08, 1.0),
                          color_jitter: Optional[float] = 0.4, hflip: float = 0.5,
                          interpolation: str = "bilinear", mean: Sequence[float] = IMAGENET_MEAN,
                          std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    """RandomResizedCrop + flip + optional colour jitter (brightness = contrast = saturation =
    ``color_jitter``; 0 or None disables it) + ToTensor + Normalize."""
    ops = [T.RandomResizedCrop(int(crop_size), scale=tuple(scale), interpolation=_interp(interpolation))]
    if hflip and hflip > 0:
        ops.append(T.RandomHorizontalFlip(p=float(hflip)))
    if color_jitter:
        s = float(color_jitter)
        ops.append(T.ColorJitter(brightness=s, contrast=s, saturation=s))
    ops += [T.ToTensor(), T.Normalize(mean=tuple(mean), std=tuple(std))]
    return T.Compose(ops)


def build_val_transform(crop_size: int = 224, resize: Optional[int] = None, interpolation: str = "bilinear",
                        mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    """Resize(resize or int(crop / 0.875)) (shorter side) + CenterCrop(crop) + ToTensor + Normalize."""
    resize = int(resize) if resize else val_resize_for(int(crop_size))
    if resize < crop_size:
        raise ValueError(f"val resize ({resize}) must be >= crop_size ({crop_size})")
    return T.Compose([
        T.Resize(resize, interpolation=_interp(interpolation)),
        T.CenterCrop(int(crop_size)),
        T.ToTensor(),
        T.Normalize(mean=tuple(mean), std=tuple(std)),
    ])

"""Feeding a GPU: the classification input pipelines other than today's (``classic``).

``data.pipeline`` / ``data.decode`` pick one (:func:`resolve_pipeline`):

* ``classic`` -- today's: each worker decodes, crops, flips, colour-jitters, converts to float and
  normalises every image (data/transforms.py). Bit-for-bit what every earlier run used.
* ``uint8`` -- the worker decodes (at a reduced JPEG scale when the sampled crop allows it), crops,
  resizes and flips on uint8 images and hands over uint8 CHW tensors; the batch crosses to the
  device as uint8 (a quarter of float's bytes, pinned, non-blocking) and :class:`DeviceFeed`
  converts to float, applies the colour jitter and normalises it there, batched.
* ``gpu_decode`` (``data.decode=gpu``) -- the worker only reads the file's bytes and its header
  (the image size, which the random crop needs); :class:`DeviceFeed` decodes the batch with
  torchvision's ``decode_jpeg`` on the device, then crops, resizes, flips, jitters and normalises
  there. The same code runs with device=cpu.

The random draws are torchvision's own (``RandomResizedCrop.get_params``, the flip's
``torch.rand``, ``ColorJitter.get_params``), made in the worker in the same order as the classic
transform makes them, so a worker seeded per sample (engine/loaders.py) draws the same crop, flip
and jitter factors for a sample on every path: only where the arithmetic runs differs. The worker
sends them along as one float row per image (:data:`PARAM_COLUMNS`).
"""
from __future__ import annotations

import io
import logging
import os
import warnings
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms import functional as TF1
from torchvision.transforms.v2 import functional as F

from dyrelu.errors import BadValueError

from .imagenet import BadImageError, load_image, read_bytes
from .transforms import IMAGENET_MEAN, IMAGENET_STD, _interp, val_resize_for

log = logging.getLogger(__name__)

PIPELINES = ("auto", "classic", "uint8")
DECODES = ("cpu", "gpu")
#: one float row per image: the crop box (top, left, height, width in full-size pixels), the flip
#: (0/1), the jitter factors (brightness, contrast, saturation; 1 = none) and the jitter order (the
#: three op indices 0, 1, 2 in the order ColorJitter applies them). Validation rows are empty.
PARAM_COLUMNS = ("top", "left", "height", "width", "flip", "brightness", "contrast", "saturation",
                 "op0", "op1", "op2")
DRAFT_SCALES = (8, 4, 2)  # the reductions libjpeg decodes at directly (DCT scaling), largest first


def resolve_pipeline(pipeline: str = "auto", decode: str = "cpu", device_type: str = "cpu") -> str:
    """``classic``, ``uint8`` or ``gpu_decode`` for ``data.pipeline`` / ``data.decode`` on a device.

    ``auto`` is ``uint8`` on CUDA and ``classic`` elsewhere: on a CPU the model shares the cores
    with the workers, so the device-side float work saves nothing, and runs on the CPU keep
    today's exact pixels (their results stay comparable with every earlier CPU run).
    ``decode=gpu`` is its own path whatever ``pipeline`` says, except ``classic`` (a contradiction).
    """
    if pipeline not in PIPELINES:
        raise BadValueError(f"data.pipeline={pipeline!r} is not one of {', '.join(PIPELINES)}")
    if decode not in DECODES:
        raise BadValueError(f"data.decode={decode!r} is not one of {', '.join(DECODES)}")
    if decode == "gpu":
        if pipeline == "classic":
            raise BadValueError("data.decode=gpu decodes on the device, which data.pipeline=classic does not; "
                                "use data.pipeline=auto or uint8 with it")
        return "gpu_decode"
    if pipeline == "auto":
        return "uint8" if device_type == "cuda" else "classic"
    return pipeline


def _pil_resample(interpolation: str) -> int:
    return TF1.pil_modes_mapping[_interp(interpolation)]


def _short_side_size(w: int, h: int, size: int) -> Tuple[int, int]:
    """(width, height) after resizing the shorter side to ``size`` the way torchvision's
    Resize(int) does (the longer side truncated), so the uint8 and classic paths agree on it."""
    if w <= h:
        return size, int(size * h / w)
    return int(size * w / h), size


def _draft_scale(w: float, h: float, need: int) -> int:
    """The largest JPEG reduction that leaves a ``w`` x ``h`` region at least ``need`` pixels on
    each side (1 = decode at full size)."""
    for s in DRAFT_SCALES:
        if min(w, h) / s >= need:
            return s
    return 1


def _apply_draft(img: Image.Image, scale: int) -> int:
    """Ask libjpeg (through PIL's ``draft``) to decode at 1/``scale``; the scale it will use."""
    if scale <= 1 or img.format != "JPEG":
        return 1
    w, h = img.size
    # draft picks the largest DCT scale s with w // s' >= asked (PIL's rule): ask w // scale, then
    # read back the scale it chose
    img.draft("RGB", (w // scale, h // scale))
    return max(1, round(w / img.size[0]))


def _to_chw(img: Image.Image) -> torch.Tensor:
    return _as_tensor(img).permute(2, 0, 1).contiguous()


def _as_tensor(img: Image.Image) -> torch.Tensor:
    """A uint8 HWC tensor over the image's bytes without a second copy. numpy marks them read-only
    (PIL hands out a bytes object) and torch warns about that; nothing writes to them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.asarray(img))


class TrainParams:
    """The classic training transform's random draws, made from an image's size alone (no
    decode): RandomResizedCrop's box, the flip and ColorJitter's factors and order."""

    def __init__(self, crop_size: int, scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5, color_jitter: float = 0.0):
        self.crop_size = int(crop_size)
        self.scale, self.ratio = tuple(float(v) for v in scale), tuple(float(v) for v in ratio)
        self.hflip = float(hflip or 0.0)
        s = float(color_jitter or 0.0)
        self.jitter = T.ColorJitter(brightness=s, contrast=s, saturation=s) if s > 0 else None

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """One row of PARAM_COLUMNS for ``img`` (a PIL image, opened but not necessarily decoded)."""
        i, j, h, w = T.RandomResizedCrop.get_params(img, self.scale, self.ratio)
        flip = float(self.hflip > 0 and torch.rand(1).item() < self.hflip)
        factors, order = [1.0, 1.0, 1.0], [0, 1, 2]
        if self.jitter is not None:
            cj = self.jitter
            fn_idx, b, c, s, _ = cj.get_params(cj.brightness, cj.contrast, cj.saturation, cj.hue)
            factors = [float(b), float(c), float(s)]
            order = [int(k) for k in fn_idx if int(k) < 3]  # 3 = hue, which the recipe does not jitter
        return torch.tensor([i, j, h, w, flip, *factors, *order], dtype=torch.float32)


class Uint8TrainReader:
    """path -> (uint8 CHW crop, PARAM_COLUMNS row): the classic training crop, flip and draws
    with no float in the worker; the jitter is left to :class:`DeviceFeed` (its factors ride in
    the row). The JPEG is decoded at the largest reduction that keeps the crop at least
    ``crop_size`` on each side; ``stats`` counts how often that was below full size."""

    def __init__(self, params: TrainParams, interpolation: str = "bilinear", draft: bool = True):
        self.params, self.draft = params, bool(draft)
        self.interpolation, self.interp_mode = interpolation, _interp(interpolation)
        self.resample = _pil_resample(interpolation)
        self.stats = {"images": 0, "reduced": 0}

    def __call__(self, path: str):
        path, out = str(path), self.params.crop_size
        data = read_bytes(path)
        try:
            with Image.open(io.BytesIO(data)) as head:  # the header: size and format, no decode
                row = self.params(head)
                is_jpeg = head.format == "JPEG"
        except Exception as e:  # UnidentifiedImageError, OSError, ...: as load_image reports them
            raise BadImageError(path, f"{type(e).__name__}: {e}") from None
        i, j, h, w = (int(v) for v in row[:4].tolist())
        s = _draft_scale(w, h, out) if self.draft and is_jpeg else 1
        self.stats["images"] += 1
        if s == 1 and is_jpeg and self.interpolation == "bilinear":
            # libjpeg-turbo through torchvision straight into a tensor (the same pixels as PIL's
            # decode; no copy out of PIL), the crop a view of it; then torch's uint8 antialiased
            # bilinear resize on a channels-last copy of the crop (interpolate, the kernel
            # torchvision's resize calls, without its dispatch): PIL's filter (measured 0.001 grey
            # levels apart) at ~1.6x its speed. A file it refuses (CMYK, broken) goes to PIL below.
            try:
                img = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            except RuntimeError:
                img = None
            if img is not None:
                crop = img[:, i:i + h, j:j + w][None].contiguous(memory_format=torch.channels_last)
                crop = torch.nn.functional.interpolate(crop, size=(out, out), mode="bilinear", align_corners=False,
                                                       antialias=True)[0]
                return (crop.flip(-1) if row[4] > 0 else crop), row
        scale = []
        img = load_image(path, before_load=lambda im: scale.append(_apply_draft(im, s) if s > 1 else 1), data=data)
        s = scale[0]
        self.stats["reduced"] += int(s > 1)
        # a 1/s decode maps full-size pixel x to x / s: a fractional box, which PIL's resize takes
        img = img.resize((out, out), resample=self.resample, box=(j / s, i / s, (j + w) / s, (i + h) / s))
        if row[4] > 0:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return _to_chw(img), row


class Uint8ValReader:
    """path -> (uint8 CHW, empty row): Resize(short side) + CenterCrop on the uint8 PIL image, the
    classic evaluation transform's pixels before ToTensor. Always a full decode: a reduced JPEG
    decode moves the pixels by a few grey levels (measured: 3 on average at 1/4 scale), and
    evaluation must give today's pixels."""

    def __init__(self, crop_size: int, resize: Optional[int] = None, interpolation: str = "bilinear"):
        self.crop_size = int(crop_size)
        self.resize = int(resize) if resize else val_resize_for(self.crop_size)
        self.resample = _pil_resample(interpolation)

    def __call__(self, path: str):
        img = load_image(path, before_load=lambda im: None)  # no RGB copy
        tw, th = _short_side_size(*img.size, self.resize)
        img = img.resize((tw, th), resample=self.resample)
        img = TF1.center_crop(img, [self.crop_size, self.crop_size])
        return _to_chw(img), torch.empty(0)


class EncodedReader:
    """path -> (file bytes as a uint8 tensor, PARAM_COLUMNS row or empty, path): for
    ``data.decode=gpu``, the worker reads and parses the header only. A file whose header PIL
    cannot read is a :class:`BadImageError` here (skipped by the dataset like any bad file); one
    whose data is broken is found by the device decode (:class:`DeviceFeed`)."""

    def __init__(self, params: Optional[TrainParams] = None):
        self.params = params

    def __call__(self, path: str):
        path = str(path)
        data = read_bytes(path)
        try:
            row = torch.empty(0)
            if self.params is not None:
                with Image.open(io.BytesIO(data)) as img:  # the header only: no decode
                    row = self.params(img)
        except Exception as e:  # UnidentifiedImageError, OSError, ...
            raise BadImageError(path, f"{type(e).__name__}: {e}") from None
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), row, path


def collate_encoded(samples):
    """((list of byte tensors, rows, paths), targets): the byte strings differ in length."""
    items, targets = zip(*samples)
    datas, rows, paths = zip(*items)
    return (list(datas), torch.stack(rows), list(paths)), torch.as_tensor(targets)


GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights, which ColorJitter blends towards


def _jitter_matrices(x: torch.Tensor, factor: torch.Tensor, op: torch.Tensor):
    """One ColorJitter step for every image as an affine map of its RGB rows, ``x @ M + t``.

    ``x`` is (N, pixels, 3). Each op is torchvision's blend ``f * x + (1 - f) * target``:
    brightness (target 0): M = f I; contrast (target the mean grey level m): M = f I, t = (1 - f) m;
    saturation (target each pixel's grey w.x): M = f I + (1 - f) w 1^T. Picking the map per image
    by arithmetic (no indexing by a mask) keeps it one batched op with no device sync."""
    n = x.shape[0]
    w = torch.tensor(GRAY, dtype=x.dtype, device=x.device)
    f = factor.view(n, 1, 1)
    eye = torch.eye(3, dtype=x.dtype, device=x.device).expand(n, 3, 3)
    is_c, is_s = (op == 1).to(x.dtype).view(n, 1, 1), (op == 2).to(x.dtype).view(n, 1, 1)
    m = x.mean(dim=1) @ w                                       # (N,) mean grey level
    matrix = f * eye + is_s * (1 - f) * (w.view(1, 3, 1) * torch.ones(1, 1, 3, dtype=x.dtype, device=x.device))
    offset = is_c * (1 - f) * m.view(n, 1, 1).expand(n, 1, 3)
    return matrix, offset


def _jitter(x: torch.Tensor, rows: torch.Tensor, high: float, per_image: Optional[bool] = None) -> torch.Tensor:
    """ColorJitter's brightness / contrast / saturation on (N, pixels, 3) floats in [0, ``high``],
    each image with its own factors and order (rows[:, 5:8], rows[:, 8:11]), clamped after each
    step as torchvision does.

    On an accelerator: all images at once, one batched affine map per step (_jitter_matrices),
    no device sync. On the CPU (``per_image``, the default there): image by image, each op
    in place, which is about 3x fewer passes over the pixels than the batched maps (a CPU has no
    queue to keep full, so branching on the values costs nothing)."""
    factors = rows[:, 5:8].to(x.dtype)
    order = rows[:, 8:11].long()
    if per_image is None:
        per_image = x.device.type == "cpu"
    if not per_image:
        for k in range(3):
            op = order[:, k]
            matrix, offset = _jitter_matrices(x, factors.gather(1, op[:, None]).squeeze(1), op)
            x = torch.baddbmm(offset, x, matrix).clamp_(0.0, high)
        return x
    w = torch.tensor(GRAY, dtype=x.dtype)
    for xi, f3, ops in zip(x, factors.tolist(), order.tolist()):
        for op in ops:
            f = f3[op]
            if op == 0:    # brightness: f x
                xi.mul_(f)
            elif op == 1:  # contrast: f x + (1 - f) mean grey (of the image before this step)
                mean = float(xi.mean(0) @ w)
                xi.mul_(f).add_((1.0 - f) * mean)
            else:          # saturation: f x + (1 - f) grey(x)
                grey = (xi @ w).unsqueeze(1)
                xi.mul_(f).add_(grey, alpha=1.0 - f)
            xi.clamp_(0.0, high)
    return x


class DeviceFeed:
    """The device side of the ``uint8`` and ``gpu_decode`` pipelines, called where the task moves
    a batch to the device (engine/tasks ``to_device``): so training, evaluation, precise BN and
    inspect_dynamic all run it. Returns (normalised float32 images, targets) on ``device``."""

    def __init__(self, mode: str, crop_size: int, color_jitter: float = 0.0, resize: Optional[int] = None,
                 interpolation: str = "bilinear", mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        if mode not in ("uint8", "gpu_decode"):
            raise ValueError(f"DeviceFeed mode {mode!r}")
        self.mode, self.crop_size = mode, int(crop_size)
        self.resize = int(resize) if resize else val_resize_for(self.crop_size)
        self.jitter = bool(color_jitter and color_jitter > 0)
        self.interpolation = _interp(interpolation)
        self.mean, self.std = [float(v) for v in mean], [float(v) for v in std]
        self.bad_files: List[str] = []

    # -- gpu_decode ----------------------------------------------------------------------------
    def decode(self, datas: List[torch.Tensor], paths: List[str], device) -> Tuple[List[torch.Tensor], List[int]]:
        """Decode a batch on ``device``: one batched call, and image by image only when it fails
        (to find the bad file). A file decode_jpeg refuses is tried with decode_image on the CPU
        (a PNG named .JPEG); one that neither reads is logged by name and left out. Returns the
        CHW uint8 images and the indices kept."""
        try:
            return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)), list(range(len(datas)))
        except RuntimeError:
            pass
        images, kept = [], []
        for k, (data, path) in enumerate(zip(datas, paths)):
            try:
                img = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            except RuntimeError:
                try:
                    img = decode_image(data.cpu(), mode=ImageReadMode.RGB).to(device)
                except RuntimeError as e:
                    reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                    log.warning("skipping bad image %s (%s)", path, reason)
                    self.bad_files.append(path)
                    continue
            images.append(img)
            kept.append(k)
        return images, kept

    def _crop_train(self, img: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
        i, j, h, w, flip = (int(v) for v in row[:5].tolist())
        out = F.resized_crop(img, i, j, h, w, [self.crop_size, self.crop_size],
                             interpolation=self.interpolation, antialias=True)
        return out.flip(-1) if flip else out

    def _crop_val(self, img: torch.Tensor) -> torch.Tensor:
        tw, th = _short_side_size(img.shape[-1], img.shape[-2], self.resize)
        out = F.resize(img, [th, tw], interpolation=self.interpolation, antialias=True)
        return F.center_crop(out, [self.crop_size, self.crop_size])

    # -- both ----------------------------------------------------------------------------------
    def normalise(self, images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) (any strides) -> float32, jittered when rows carry factors, then
        normalised; returned channels_last (an NHWC buffer). Works on 0..255 floats, so the
        division by 255 folds into the normalisation."""
        n, c, h, w = images.shape
        # NHWC rows of pixels: a uint8 copy when the batch is NCHW (a quarter of the float bytes)
        nhwc = images.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        x = nhwc.reshape(n, h * w, c).float()
        if self.jitter and rows.numel() and rows.shape[1] == len(PARAM_COLUMNS):
            x = _jitter(x, rows.to(x.device), 255.0)
        scale = torch.tensor([1.0 / (255.0 * s) for s in self.std], device=x.device)
        shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)], device=x.device)
        x = torch.addcmul(shift, x, scale)       # (x / 255 - mean) / std in one pass
        return x.view(n, h, w, c).permute(0, 3, 1, 2)

    def __call__(self, batch, device, channels_last: bool = False):
        inputs, targets = batch
        if self.mode == "uint8":
            images, rows = inputs
            # uint8 NCHW pinned by the loader: one non-blocking copy of a quarter of float's bytes
            images = images.to(device, non_blocking=True)
            rows = rows.to(device, non_blocking=True)
        else:
            datas, rows, paths = inputs
            decoded, kept = self.decode(datas, paths, device)
            if len(kept) < len(datas):
                keep = torch.as_tensor(kept, dtype=torch.long)
                targets = targets[keep]
                rows = rows[keep] if rows.numel() else rows
            train = rows.numel() > 0 and rows.shape[1] == len(PARAM_COLUMNS)
            crops = [self._crop_train(img, row) for img, row in zip(decoded, rows)] if train \
                else [self._crop_val(img) for img in decoded]
            c = self.crop_size
            images = torch.stack(crops) if crops else torch.empty(0, 3, c, c, dtype=torch.uint8, device=device)
            rows = rows.to(device, non_blocking=True)
        x = self.normalise(images, rows)
        x = x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        return x, targets.to(device, non_blocking=True)


def build_readers(mode: str, crop_size: int, scale=(0.08, 1.0), hflip: float = 0.5, color_jitter: float = 0.0,
                  val_resize: Optional[int] = None, interpolation: str = "bilinear", draft: bool = True):
    """(train reader, val reader) for a pipeline other than classic."""
    params = TrainParams(crop_size, scale=scale, hflip=hflip, color_jitter=color_jitter)
    if mode == "uint8":
        return (Uint8TrainReader(params, interpolation=interpolation, draft=draft),
                Uint8ValReader(crop_size, resize=val_resize, interpolation=interpolation))
    if mode == "gpu_decode":
        return EncodedReader(params), EncodedReader(None)
    raise ValueError(f"no readers for pipeline {mode!r}")

"""ImageNet-style classification: label smoothing or mixup, top-1 and top-5 in percent."""
from __future__ import annotations

import logging

import torch
from torch import nn

from data import build_cls_datasets

from ..distributed import all_reduce_sum
from .base import Task

log = logging.getLogger("dyrelu.train")


class ClassificationTask(Task):
    name = "cls"
    primary_metric = "top1"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.num_classes = None
        self.mixup = None
        self.feed = None  # data.feeding.DeviceFeed when data.pipeline is not classic
        aug = cfg.aug
        if aug.mixup_alpha > 0 or aug.cutmix_alpha > 0:
            from timm.loss import SoftTargetCrossEntropy

            self._mixup_args = dict(mixup_alpha=aug.mixup_alpha, cutmix_alpha=aug.cutmix_alpha, label_smoothing=aug.label_smoothing)
            self.criterion = SoftTargetCrossEntropy()
        else:
            self._mixup_args = None
            self.criterion = nn.CrossEntropyLoss(label_smoothing=float(aug.label_smoothing))
        self.eval_criterion = nn.CrossEntropyLoss()

    def build_datasets(self):
        d = self.cfg.data
        extra = {k: d[k] for k in ("num_classes", "train_per_class", "val_per_class", "image_size", "seed") if d.name == "demo" and k in d}
        pipeline = self._pipeline()
        if pipeline != "classic":  # only then: the classic call stays exactly what it was
            extra["pipeline"] = pipeline
        train, val, num_classes, _ = build_cls_datasets(
            d.name, d.root, crop_size=int(d.crop_size), val_resize=d.get("val_resize"),
            color_jitter=float(self.cfg.aug.color_jitter), skip_bad_images=bool(d.skip_bad_images), **extra,
        )
        if not d.get("train_augment", True):
            # no random crops or flips: reproducible across process counts
            train.transform, train.reader = val.transform, val.reader
        if pipeline != "classic":
            from data.feeding import DeviceFeed

            log.info("input pipeline: %s (data.pipeline=%s, data.decode=%s): %s", pipeline, d.get("pipeline", "auto"),
                     d.get("decode", "cpu"), "workers read bytes, the device decodes" if pipeline == "gpu_decode"
                     else "uint8 crops from the workers, float / jitter / normalisation on the device")

            self.feed = DeviceFeed(pipeline, int(d.crop_size), color_jitter=float(self.cfg.aug.color_jitter),
                                   resize=d.get("val_resize"))
        self.num_classes = num_classes
        if self._mixup_args is not None:
            from timm.data import Mixup

            self.mixup = Mixup(num_classes=num_classes, **self._mixup_args)
        return train, val

    def model_kwargs(self) -> dict:
        return {"num_classes": self.num_classes}

    def _pipeline(self) -> str:
        """data.pipeline / data.decode resolved for the run's device (data/feeding.py): auto is
        uint8 on CUDA, classic (today's, unchanged) on the CPU."""
        from data.feeding import resolve_pipeline

        from ..runtime import resolve_device

        d = self.cfg.data
        device = resolve_device(str(self.cfg.trainer.device)) if "trainer" in self.cfg else torch.device("cpu")
        return resolve_pipeline(str(d.get("pipeline", "auto")), str(d.get("decode", "cpu")), device.type)

    def collate_fn(self):
        if self.feed is not None and self.feed.mode == "gpu_decode":
            from data.feeding import collate_encoded

            return collate_encoded  # the byte strings differ in length
        return None

    def to_device(self, batch, device, channels_last):
        if self.feed is not None:  # uint8 or bytes: float conversion, jitter and normalisation on the device
            return self.feed(batch, device, channels_last)
        images, targets = batch
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets.to(device, non_blocking=True)

    def loss(self, model, batch):
        images, targets = batch
        if self.mixup is not None and images.shape[0] % 2 == 0:
            images, targets = self.mixup(images, targets)
        return self.criterion(model(images), targets), images.shape[0]

    @torch.no_grad()
    def evaluate(self, model, loader, device, autocast, channels_last):
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
        k5 = min(5, self.num_classes)
        for batch in loader:
            images, targets = self.to_device(batch, device, channels_last)
            with autocast():
                logits = model(images)
            logits = logits.float()
            top = logits.topk(k5, dim=1).indices
            hit = top.eq(targets[:, None])
            sums += torch.stack([
                self.eval_criterion(logits, targets).double() * targets.numel(),
                hit[:, 0].sum().double(), hit.any(1).sum().double(), torch.tensor(float(targets.numel()), device=device, dtype=torch.float64),
            ])
        loss, top1, top5, n = all_reduce_sum(sums).tolist()
        n = max(n, 1.0)
        return {"val_loss": loss / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "val_samples": int(n)}

    def results(self, metrics, best):
        return {"top1": metrics["top1"], "top5": metrics["top5"], "best_top1": best, "num_classes": self.num_classes}

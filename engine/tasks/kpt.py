"""COCO top-down keypoints (Sec. 5.4): heatmap MSE with target weights; flip test, decode,
OKS-NMS and COCOeval for AP (the procedure of Simple Baselines / HRNet)."""
from __future__ import annotations

import torch
from torch import nn
from dyrelu.errors import BadNameError

from ..distributed import all_gather_objects
from .base import Task

KPT_DATASETS = ("coco", "coco_demo")


class JointsMSELoss(nn.Module):
    """Mean over joints of 0.5 * MSE(heatmap), each joint weighted by its target weight."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        n, k = pred.shape[:2]
        pred, target = pred.float().reshape(n, k, -1), target.float().reshape(n, k, -1)
        w = weight.float().reshape(n, k, 1)
        return 0.5 * ((pred * w - target * w) ** 2).mean()


class KeypointTask(Task):
    name = "kpt"
    primary_metric = "ap"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.criterion = JointsMSELoss()
        self.val_ann = None

    def build_datasets(self):
        from data.coco import build_coco_datasets

        d = self.cfg.data
        if d.name not in KPT_DATASETS:
            raise BadNameError(f"task=kpt needs a keypoint dataset: data={d.name!r} is not one of {list(KPT_DATASETS)}")
        root = d.root
        if d.name == "coco_demo" and root is None:
            from data.coco_demo import ensure_coco_demo

            root = ensure_coco_demo()
        train, val = build_coco_datasets(
            root=root, train_ann=d.train_ann, train_images=d.train_images, val_ann=d.val_ann, val_images=d.val_images,
            det_file=d.det_file, det_score_thresh=float(d.det_score_thresh), input_size=tuple(d.input_size),
            heatmap_size=tuple(d.heatmap_size), sigma=float(d.sigma), skip_bad_images=bool(d.skip_bad_images),
        )
        self.val_ann = val.ann_file
        return train, val

    def model_kwargs(self) -> dict:
        return {"num_joints": 17}

    def to_device(self, batch, device, channels_last):
        images, target, weight, meta = batch
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, target.to(device, non_blocking=True), weight.to(device, non_blocking=True), meta

    def loss(self, model, batch):
        images, target, weight, _ = batch
        return self.criterion(model(images), target, weight), images.shape[0]

    @torch.no_grad()
    def evaluate(self, model, loader, device, autocast, channels_last):
        from data.keypoints import KeypointEvaluator, flip_average

        t = self.cfg.task
        evaluator = KeypointEvaluator(self.val_ann, oks_thresh=float(t.oks_thresh), in_vis_thresh=float(t.in_vis_thresh))
        loss_sum, count = 0.0, 0
        for batch in loader:
            images, target, weight, meta = self.to_device(batch, device, channels_last)
            with autocast():
                heat = model(images)
                loss_sum += float(self.criterion(heat, target, weight)) * images.shape[0]
                count += images.shape[0]
                if t.flip_test:
                    heat = flip_average(heat, model(torch.flip(images, dims=[3])), shift=bool(t.shift_heatmap))
            evaluator.update(heat.float().cpu(), meta)
        # Every rank decodes its share; the union is scored once, identically on every rank.
        states = all_gather_objects((evaluator.state(), loss_sum, count))
        evaluator.load_state([s for s, _, _ in states])
        metrics = evaluator.compute()
        total = sum(c for _, _, c in states)
        metrics["val_loss"] = sum(l for _, l, _ in states) / max(total, 1)
        metrics["val_samples"] = total
        return metrics

    def results(self, metrics, best):
        keys = ("ap", "ap50", "ap75", "apm", "apl", "ar")
        return {**{k: metrics.get(k) for k in keys}, "best_ap": best, "num_classes": 17}

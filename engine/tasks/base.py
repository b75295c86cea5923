"""The task interface the loop talks to."""
from __future__ import annotations

from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn


class Task:
    """One kind of problem: its datasets, model, loss and evaluation.

    The loop calls, in order: ``build_datasets()``, ``build_model()``, then per step
    ``loss(model, batch)`` and per epoch ``evaluate(model, loader)``.
    """

    name: str = ""
    primary_metric: str = ""  # the metric that picks best.pt (higher is better)

    def __init__(self, cfg):
        self.cfg = cfg

    def build_datasets(self) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        """The same for every task: instantiate the model group (its ``_target_`` is what builds
        the network; a task config sets its own) with the activation group (and head_act when the
        task has one) and the task's ``model_kwargs()``."""
        extra = {}
        if "head_act" in self.cfg and self.cfg.head_act is not None:
            extra["head_act"] = OmegaConf.to_container(self.cfg.head_act, resolve=True)
        return instantiate(self.cfg.model, act=OmegaConf.to_container(self.cfg.act, resolve=True), **extra,
                           **self.model_kwargs(), _convert_="all")

    def model_kwargs(self) -> dict:
        """Arguments the task adds to the model group's (known once the datasets are built)."""
        return {}

    def input_size(self) -> tuple[int, int, int]:
        h, w = self.cfg.data.input_size
        return (3, int(h), int(w))

    def to_device(self, batch, device: torch.device, channels_last: bool) -> Any:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        """Returns the mean loss of the batch and its number of samples."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, device: torch.device, autocast, channels_last: bool) -> dict:
        """Metrics over the whole validation set (all ranks take part; every rank gets the result)."""
        raise NotImplementedError

    def results(self, metrics: dict, best: float) -> dict:
        """The task's keys of results.json."""
        raise NotImplementedError

    def collate_fn(self):
        return None

"""Optimizers (timm) and per-iteration schedules (timm) from the optim/ and sched/ configs."""
from __future__ import annotations

import logging

from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler

log = logging.getLogger(__name__)

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step")


def effective_lr(optim_cfg, global_batch: int) -> float:
    lr = float(optim_cfg.lr)
    if optim_cfg.scale_lr:
        lr *= global_batch / float(optim_cfg.base_batch_size)
    return lr


def build_optimizer(model, optim_cfg, global_batch: int):
    name = str(optim_cfg.name)
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={name!r} is not one of {list(OPTIMIZERS)}")
    lr = effective_lr(optim_cfg, global_batch)
    kwargs = {}
    if name == "sgd":
        # timm's "sgd" means Nesterov; "momentum" is plain heavy-ball SGD as in the paper.
        name = "sgd" if optim_cfg.nesterov else "momentum"
        kwargs["momentum"] = float(optim_cfg.momentum)
    log.info("optimizer %s lr %.5g (base %.5g at batch %d, global batch %d) weight decay %.3g",
             name, lr, optim_cfg.lr, optim_cfg.base_batch_size, global_batch, optim_cfg.weight_decay)
    return create_optimizer_v2(
        model, opt=name, lr=lr, weight_decay=float(optim_cfg.weight_decay),
        filter_bias_and_bn=not optim_cfg.decay_norm_and_bias, **kwargs,
    )


def build_scheduler(optimizer, sched_cfg, epochs: int, steps_per_epoch: int):
    """Stepped with `scheduler.step_update(global_step)` after every optimizer step."""
    name = str(sched_cfg.name)
    warmup = int(round(float(sched_cfg.warmup_epochs) * steps_per_epoch))
    common = dict(warmup_t=warmup, warmup_lr_init=float(sched_cfg.warmup_lr), t_in_epochs=False)
    if name == "cosine":
        return CosineLRScheduler(optimizer, t_initial=max(1, epochs * steps_per_epoch), lr_min=float(sched_cfg.min_lr), **common)
    if name == "step":
        decay_t = [int(m) * steps_per_epoch for m in sched_cfg.milestones]
        return MultiStepLRScheduler(optimizer, decay_t=decay_t, decay_rate=float(sched_cfg.gamma), **common)
    raise ValueError(f"sched.name={name!r} is not one of {list(SCHEDULES)}")

"""Optimizers (timm) and per-iteration schedules (timm) from the optim/ and sched/ configs."""
from __future__ import annotations

import logging

from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler
from torch import nn

log = logging.getLogger(__name__)

# The one list of allowed names (engine/validate.py checks configs against these).
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("cosine", "step")


def effective_lr(optim_cfg, global_batch: int) -> float:
    lr = float(optim_cfg.lr)
    if optim_cfg.scale_lr:
        lr *= global_batch / float(optim_cfg.base_batch_size)
    return lr


def _hyper_lr_scale(optim_cfg) -> float:
    return float(optim_cfg.get("hyper_lr_scale", 1.0))


def _spatial_lr_scale(optim_cfg) -> float:
    """DY-ReLU-C's spatial convs: their own lr scale, or the hyper functions' when unset."""
    scale = optim_cfg.get("spatial_lr_scale", None)
    return _hyper_lr_scale(optim_cfg) if scale is None else float(scale)


def _hyper_weight_decay(optim_cfg):
    wd = optim_cfg.get("hyper_weight_decay", None)
    return None if wd is None else float(wd)


def param_groups(model: nn.Module, optim_cfg) -> list[dict]:
    """Parameter groups with DY-ReLU's hyper functions (fc1, fc2, spatial of every dyrelu.DyReLU)
    apart: their lr is scaled by ``optim.hyper_lr_scale`` (through timm's per-group ``lr_scale``,
    which timm's schedulers multiply into every value they set) and their weight decay is
    ``optim.hyper_weight_decay`` (null: the same as the rest). DY-ReLU-C's spatial convs (and
    their logit BN) form a third group whose lr is scaled by ``optim.spatial_lr_scale`` (null: the
    hyper functions' scale). Biases and norm weights (1-d parameters) get no decay when
    ``decay_norm_and_bias`` is false, in every group, as timm does.
    """
    from dyrelu import DyReLU

    kinds = {}
    for m in model.modules():
        if isinstance(m, DyReLU):
            kinds.update({id(p): "hyper" for p in m.parameters()})
            for branch in (m.spatial, m.spatial_bn):
                if branch is not None:
                    kinds.update({id(p): "spatial" for p in branch.parameters()})
    wd = float(optim_cfg.weight_decay)
    hyper_wd = _hyper_weight_decay(optim_cfg)
    hyper_wd = wd if hyper_wd is None else hyper_wd
    scales = {"base": 1.0, "hyper": _hyper_lr_scale(optim_cfg), "spatial": _spatial_lr_scale(optim_cfg)}
    order = ("base", "hyper", "spatial")  # the rest first: param_groups[0]["lr"] (what the logs show) is the base lr
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        kind = kinds.get(id(p), "base")
        no_decay = not optim_cfg.decay_norm_and_bias and (p.ndim <= 1 or name.endswith(".bias"))
        key = (order.index(kind), no_decay)
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if no_decay else (wd if kind == "base" else hyper_wd),
                           "lr_scale": scales[kind], "name": kind + ("_no_decay" if no_decay else "")}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def _has_spatial_convs(model: nn.Module) -> bool:
    from dyrelu import DyReLU

    return any(isinstance(m, DyReLU) and m.spatial is not None for m in model.modules())


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
    hyper_scale, hyper_wd = _hyper_lr_scale(optim_cfg), _hyper_weight_decay(optim_cfg)
    spatial_scale = _spatial_lr_scale(optim_cfg) if _has_spatial_convs(model) else 1.0
    if hyper_scale == 1.0 and spatial_scale == 1.0 and hyper_wd is None:
        # Today's groups exactly (so checkpoints' optimizer states keep loading).
        params, filter_bias_and_bn = model, not optim_cfg.decay_norm_and_bias
    else:
        log.info("DY-ReLU hyper functions: lr x %.4g (spatial convs x %.4g), weight decay %s", hyper_scale,
                 spatial_scale, "as the rest" if hyper_wd is None else f"{hyper_wd:.3g}")
        params, filter_bias_and_bn = param_groups(model, optim_cfg), False
    # Every group starts at the base lr; build_scheduler applies each group's lr_scale from step 0.
    return create_optimizer_v2(params, opt=name, lr=lr, weight_decay=float(optim_cfg.weight_decay),
                               filter_bias_and_bn=filter_bias_and_bn, **kwargs)


def warn_undecayed(sched_cfg, epochs: int, lr: float) -> None:
    """One warning line when a step schedule's milestone is never reached. A cosine schedule is
    compressed into a shortened run, a step schedule is not: under ``trainer.max_epochs=2`` the
    keypoint recipe's milestones (16, 19) would keep the full learning rate without a word."""
    milestones = [int(m) for m in sched_cfg.milestones]
    missed = [m for m in milestones if m >= epochs]
    if not missed and milestones and float(sched_cfg.gamma) != 1.0:
        return
    fix = "set sched.milestones to epochs below trainer.max_epochs (or use sched=cosine)"
    if float(sched_cfg.gamma) == 1.0 and milestones and not missed:
        log.warning("sched.gamma=1: the step schedule never changes the learning rate (%.4g)", lr)
    elif len(missed) == len(milestones):
        log.warning("sched.milestones=%s with trainer.max_epochs=%d: no decay happens, the learning rate stays at "
                    "%.4g for the whole run; %s", milestones, epochs, lr, fix)
    else:
        log.warning("trainer.max_epochs=%d ends before sched.milestones %s, so %s never happens; %s", epochs,
                    missed, "that decay" if len(missed) == 1 else "those decays", fix)


def build_scheduler(optimizer, sched_cfg, epochs: int, steps_per_epoch: int):
    """Stepped with `scheduler.step_update(global_step)` after every optimizer step.

    timm's schedulers compute each group's value from its own initial lr and multiply it by
    the group's ``lr_scale``; so groups start at the base lr and the first update applies the scale.
    """
    name = str(sched_cfg.name)
    warmup = int(round(float(sched_cfg.warmup_epochs) * steps_per_epoch))
    common = dict(warmup_t=warmup, warmup_lr_init=float(sched_cfg.warmup_lr), t_in_epochs=False)
    if name == "cosine":
        sched = CosineLRScheduler(optimizer, t_initial=max(1, epochs * steps_per_epoch), lr_min=float(sched_cfg.min_lr), **common)
    elif name == "step":
        warn_undecayed(sched_cfg, epochs, optimizer.param_groups[0]["lr"])
        decay_t = [int(m) * steps_per_epoch for m in sched_cfg.milestones]
        sched = MultiStepLRScheduler(optimizer, decay_t=decay_t, decay_rate=float(sched_cfg.gamma), **common)
    else:
        raise ValueError(f"sched.name={name!r} is not one of {list(SCHEDULES)}")
    sched.step_update(0)  # step 0's values: today's lr for unscaled groups, the scaled lr for the rest
    return sched

"""Where a run executes, shared by training (loop.py) and evaluation (evaluate.py): the device,
mixed precision, memory layout, the process (group, determinism, first seed), and the model built
for that device (complexity counted, synced BN under DDP, compiled and DDP-wrapped for training)."""
from __future__ import annotations

import contextlib
import logging

import torch
from torch.nn.parallel import DistributedDataParallel

from dyrelu.errors import BadValueError

from . import checkpoint as ckpt_io
from .determinism import use_deterministic_algorithms, use_deterministic_pooling
from .distributed import DistInfo, broadcast_object, init_distributed
from .tasks.base import Task

log = logging.getLogger("dyrelu.train")


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise BadValueError("trainer.device=cuda but no CUDA device is available; use trainer.device=cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def use_channels_last(trainer_cfg, device: torch.device) -> bool:
    """trainer.channels_last: auto means on for CUDA (cuDNN's fast layout), off on CPUs."""
    if trainer_cfg.channels_last == "auto":
        return device.type == "cuda"
    return bool(trainer_cfg.channels_last)


def autocast_factory(amp: str, device: torch.device):
    """(a context-manager factory, a GradScaler or None) for trainer.amp."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp in ("off", False):
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def setup_process(cfg) -> tuple[torch.device, DistInfo]:
    """Device, process group, determinism settings and the first seed."""
    device = resolve_device(cfg.trainer.device)
    dist = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if not dist.is_main:  # rank 0 speaks for the run
        logging.getLogger().setLevel(logging.WARNING)
    if device.type == "cpu":
        # Tiny gradients (heatmap MSE) make Adam's second moments denormal, which is 10-100x
        # slower on x86 CPUs; flushing them to zero changes nothing measurable.
        torch.set_flush_denormal(True)
    if cfg.trainer.deterministic:
        use_deterministic_algorithms()
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ckpt_io.seed_everything(int(cfg.seed) + dist.rank)
    return device, dist


def count_complexity(model, input_size) -> dict:
    from dyrelu.flops import count_complexity as count

    c = count(model, input_size)
    # madds counts all of DY-ReLU's work; madds_paper is the paper's convention (its multiplies only).
    return {k: int(c[k]) for k in ("params", "params_no_classifier", "madds", "madds_paper")}


def build_model(cfg, task: Task, device: torch.device, dist: DistInfo, channels_last: bool):
    """The task's model on ``device`` (global-batch BN under DDP) and its complexity."""
    model = task.build_model()
    complexity = broadcast_object(count_complexity(model, task.input_size()) if dist.is_main else None)
    log.info("model %s act %s%s: %.3f M params, %.2f M MAdds at %s", cfg.model.name, cfg.act.name,
             f" head {cfg.head_act.name}" if "head_act" in cfg else "", complexity["params"] / 1e6,
             complexity["madds"] / 1e6, "x".join(map(str, task.input_size()[1:])))
    if cfg.trainer.deterministic:
        use_deterministic_pooling(model)
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if dist.enabled and cfg.trainer.sync_bn:
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            from .sync_bn import convert_global_batchnorm

            model = convert_global_batchnorm(model)
    return model, complexity


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")


def wrap_for_training(model, cfg, device: torch.device, dist: DistInfo):
    """torch.compile in place, then DDP: PyTorch's "Where to apply torch.compile?" page
    (docs.pytorch.org/docs/stable/compile/programming_model.where_to_apply_compile.html) says
    torch.compile does not handle wrappers like DDP well and shows ``model.compile()`` followed
    by ``DistributedDataParallel(model)``. Compiling in place keeps state_dict keys unchanged."""
    if cfg.trainer.compile:
        mode = cfg.trainer.get("compile_mode", "default") or "default"
        if mode not in COMPILE_MODES:
            raise BadValueError(f"trainer.compile_mode={mode!r} is not one of {COMPILE_MODES}")
        # reduce-overhead: CUDA graphs, so a launch-bound step (many small kernels) costs one replay;
        # each configuration's first launch happens in the warm-up steps Inductor runs before capture
        model.compile(mode=None if mode == "default" else mode)
    if dist.enabled:
        return DistributedDataParallel(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    return model

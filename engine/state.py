"""What one training epoch reads and advances (TrainState), how it is built around a model, and
how it goes into and comes out of a checkpoint (last.pt / best.pt, also when a stop signal
arrives: save_and_stop)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from . import checkpoint as ckpt_io
from .distributed import DistInfo, all_gather_objects, barrier
from .loaders import Data
from .optim import build_optimizer, build_scheduler
from .runtime import autocast_factory
from .signals import StopRequested, request_requeue
from .tasks.base import Task

log = logging.getLogger("dyrelu.train")


@dataclass
class TrainState:
    model: torch.nn.Module            # the module as built (weights, checkpoints, EMA, evaluation)
    train_model: torch.nn.Module      # what the steps call: `model`, DDP-wrapped under torchrun
    task: Task
    optimizer: torch.optim.Optimizer
    scheduler: Any
    autocast: Callable
    device: torch.device
    channels_last: bool
    dist: DistInfo
    scaler: Optional[torch.amp.GradScaler] = None
    ema: Optional[torch.nn.Module] = None
    grad_clip: Optional[float] = None
    log_every: int = 50
    epoch: int = 0                    # the epoch being trained (0-based)
    step_in_epoch: int = 0            # optimizer steps done in this epoch
    global_step: int = 0
    best: float = -math.inf
    metrics: dict = field(default_factory=dict)
    # This epoch's loss sum and sample count so far (saved mid-epoch, so a resumed epoch
    # reports the same train_loss as an uninterrupted one).
    epoch_loss_sum: float = 0.0
    epoch_seen: int = 0
    last_good: Optional[str] = None   # the newest checkpoint written, named if the loss blows up


def build_state(cfg, task: Task, model, data: Data, device: torch.device, dist: DistInfo, channels_last: bool) -> TrainState:
    """Optimizer, per-step schedule, mixed precision and the EMA around ``model``."""
    trainer = cfg.trainer
    optimizer = build_optimizer(model, cfg.optim, cfg.data.batch_size)
    scheduler = build_scheduler(optimizer, cfg.sched, int(trainer.max_epochs), data.num_steps)
    autocast, scaler = autocast_factory(trainer.amp, device)
    ema = None
    if trainer.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=float(trainer.ema_decay))  # before compile: a plain copy
    return TrainState(model=model, train_model=model, task=task, optimizer=optimizer, scheduler=scheduler,
                      autocast=autocast, device=device, channels_last=channels_last, dist=dist, scaler=scaler, ema=ema,
                      grad_clip=trainer.grad_clip, log_every=int(trainer.log_every))


def resume(state: TrainState, last_path: Path, init_ckpt) -> Optional[dict]:
    """Load last.pt into ``state`` (returns this rank's saved RNG state), or only the weights of
    ``init_ckpt`` (a fresh optimizer). The schedule is a function of the config and the step
    (its saved state is for inspection only), so a resumed run follows the config it runs with."""
    if not last_path.exists():
        if init_ckpt:
            state.model.load_state_dict(ckpt_io.load(init_ckpt)["model"])
            log.info("initialised weights from %s", init_ckpt)
        return None
    saved = ckpt_io.load(last_path)
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    if state.scaler is not None and saved.get("scaler"):
        state.scaler.load_state_dict(saved["scaler"])
    if state.ema is not None and saved.get("ema"):
        state.ema.load_state_dict(saved["ema"])
    state.epoch, state.step_in_epoch, state.global_step = saved["epoch"], saved.get("step_in_epoch", 0), saved["global_step"]
    state.best, state.metrics = saved.get("best_metric", -math.inf), dict(saved.get("metrics", {}))
    state.epoch_loss_sum, state.epoch_seen = saved.get("epoch_loss_sum", 0.0), saved.get("epoch_seen", 0)
    state.scheduler.step_update(state.global_step)
    if state.dist.is_main:
        log.info("Resuming from %s: epoch %d, step %d (global step %d), best %s %.4f", last_path, state.epoch + 1,
                 state.step_in_epoch, state.global_step, state.task.primary_metric, state.best)
    rngs = saved["rng"]
    return rngs[state.dist.rank] if isinstance(rngs, list) and state.dist.rank < len(rngs) else None


def checkpoint(state: TrainState, rngs: list, extra: dict) -> dict:
    """The contents of last.pt / best.pt; ``rngs`` is every rank's RNG state."""
    return {
        "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(), "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "ema": state.ema.state_dict() if state.ema is not None else None,
        "epoch": state.epoch, "step_in_epoch": state.step_in_epoch, "global_step": state.global_step,
        "epoch_loss_sum": state.epoch_loss_sum, "epoch_seen": state.epoch_seen,
        "best_metric": state.best, "metrics": state.metrics, "rng": rngs, **extra,
    }


def save_last(state: TrainState, last_path: Path, extra: dict) -> None:
    """Write last.pt where the run stands (mid-epoch too: the RNG streams and the epoch's loss so far)."""
    rngs = all_gather_objects(ckpt_io.rng_state())
    if state.dist.is_main:
        ckpt_io.atomic_save(checkpoint(state, rngs, extra), last_path)
        state.last_good = str(last_path)
    barrier()


def save_and_stop(state: TrainState, preempt, last_path: Path, extra: dict):
    """Write last.pt where the run stands, then unwind (handing the signal on, see signals.py)."""
    chain = preempt.chained_handler()
    save_last(state, last_path, extra)
    if state.dist.is_main:
        log.warning("saved %s at epoch %d step %d; stopping (run the same command to resume)", last_path,
                    state.epoch + 1, state.step_in_epoch)
        if chain is None:
            request_requeue()
    raise StopRequested(chain)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    return int(seed) * 1000 + epoch * 17 + rank


def seed_epoch(cfg, state: TrainState, resumed_rng, train_loader) -> None:
    """Each epoch's randomness depends only on (seed, epoch, rank), and mid-epoch on the saved
    stream, in one order that the uninterrupted and the resumed run both follow:

    1. the global generators (dropout, augmentation in the main process): seeded, or, in an
       epoch resumed mid-way, the stream saved with the checkpoint;
    2. the training loader's own generator, seeded. Starting its iterator draws a base seed (and,
       when the workers start, their seeds) from it, never from the global generators, so it does
       not matter whether this process starts the workers now (resumed) or started them epochs ago
       (uninterrupted). Workers reseed per sample anyway (loaders.SeededSamples).
    """
    s = epoch_seed(cfg.seed, state.epoch, state.dist.rank)
    if state.step_in_epoch > 0 and resumed_rng is not None:
        ckpt_io.set_rng_state(resumed_rng)
    else:
        ckpt_io.seed_everything(s)
    train_loader.generator.manual_seed((s * 1_000_003 + 1) % 2**63)

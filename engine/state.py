"""What one training epoch reads and advances (TrainState), how it is built around a model, and
how it goes into and comes out of a checkpoint (last.pt / best.pt, also when a stop signal
arrives: save_and_stop)."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

import dyrelu
from dyrelu.errors import BadValueError

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
    # Called with global_step before each step's forward (engine/residual_warmup.py); None: no warmup.
    residual_warmup: Optional[Callable[[int], None]] = None
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


#: what resume reads from last.pt
RESUME_KEYS = ("model", "optimizer", "epoch", "global_step", "rng")


@dataclass
class Start:
    """What a run starts from, read before anything is built (a damaged file costs seconds): its
    own last checkpoint (``resume``), the weights of ``ckpt=`` (``init``), or nothing."""
    kind: str = "scratch"            # scratch | resume | init
    path: Optional[Path] = None
    saved: Optional[dict] = None


def read_start(last_path: Path, init_ckpt, is_main: bool = True) -> Start:
    """last.pt; when it is damaged, last.prev.pt (one warning line: one checkpoint interval is
    redone, and the damaged file is kept aside as last.damaged.pt so the next save cannot rotate it
    over the good one); else ``init_ckpt``'s weights; else nothing."""
    prev = ckpt_io.previous(last_path)
    if is_main and last_path.parent.is_dir():  # before this run writes anything
        ckpt_io.remove_unfinished(last_path.parent)
    redo = "move the run's checkpoints folder away to start it from scratch"
    if last_path.exists():
        try:
            return Start("resume", last_path, ckpt_io.load(last_path, RESUME_KEYS, f"replace it with an intact copy, or {redo}"))
        except ckpt_io.DamagedCheckpointError as damaged:
            if not prev.exists():
                raise
            saved = ckpt_io.load(prev, RESUME_KEYS, f"and so is {last_path.name}: replace one with an intact copy, or {redo}")
            aside = last_path.with_name(f"{last_path.stem}.damaged{last_path.suffix}")
            barrier()  # every rank has read last.prev.pt before rank 0 moves last.pt
            if is_main:
                os.replace(last_path, aside)
                log.warning("%s; resuming from the previous checkpoint %s (epoch %d, step %d) instead, the damaged "
                            "file kept as %s", str(damaged).split("; ")[0], prev, saved["epoch"] + 1,
                            saved.get("step_in_epoch", 0), aside.name)
            return Start("resume", prev, saved)
    if prev.exists():  # a kill between the two renames of a save: the previous one is the newest
        return Start("resume", prev, ckpt_io.load(prev, RESUME_KEYS, f"replace it with an intact copy, or {redo}"))
    if init_ckpt:
        return Start("init", Path(str(init_ckpt)), ckpt_io.load(
            str(init_ckpt), ("model",), "point ckpt= at an intact checkpoint (<run>/checkpoints/best.pt or last.pt)"))
    return Start()


def resume(state: TrainState, start: Start, cfg=None) -> Optional[dict]:
    """Load ``start`` into ``state`` (returns this rank's saved RNG state): all of a last
    checkpoint, or only the weights of ``ckpt=`` (a fresh optimizer). The schedule is a function of
    the config and the step (its saved state is for inspection only), so a resumed run follows the
    config it runs with."""
    if start.kind == "init":
        load_init_weights(state.model, start, cfg)
        return None
    if start.kind != "resume":
        return None
    saved = start.saved
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    if state.scaler is not None and saved.get("scaler"):
        state.scaler.load_state_dict(saved["scaler"])
    if state.ema is not None and saved.get("ema"):
        state.ema.load_state_dict(saved["ema"])
    state.epoch, state.step_in_epoch, state.global_step = saved["epoch"], saved.get("step_in_epoch", 0), saved["global_step"]
    state.best, state.metrics = saved.get("best_metric", -math.inf), dict(saved.get("metrics", {}))
    state.epoch_loss_sum, state.epoch_seen = saved.get("epoch_loss_sum", 0.0), saved.get("epoch_seen", 0)
    state.last_good = str(start.path)
    state.scheduler.step_update(state.global_step)
    if state.dist.is_main:
        log.info("Resuming from %s: epoch %d, step %d (global step %d), best %s %.4f", start.path, state.epoch + 1,
                 state.step_in_epoch, state.global_step, state.task.primary_metric, state.best)
    rngs = saved["rng"]
    return rngs[state.dist.rank] if isinstance(rngs, list) and state.dist.rank < len(rngs) else None


#: DY-ReLU's constants, stored with the weights: loading a checkpoint sets them
DYRELU_CONSTANTS = ("tau", "lambda_a", "lambda_b", "init_a", "init_b")


def _fmt(t: torch.Tensor):
    v = t.tolist()
    return [round(x, 6) for x in v] if isinstance(v, list) else round(v, 6)


def load_init_weights(model: torch.nn.Module, start: Start, cfg=None) -> None:
    """``ckpt=``'s weights into a freshly built model. A checkpoint of another network is one line;
    DY-ReLU constants that differ from the config's ``act.*`` / ``head_act.*`` are one log line
    (the checkpoint's values are what runs: they are buffers, loaded with the weights)."""
    stored = start.saved["model"]
    mine = model.state_dict()
    missing = [k for k in mine if k not in stored]
    unexpected = [k for k in stored if k not in mine]
    shapes = [k for k in mine if k in stored and hasattr(stored[k], "shape") and stored[k].shape != mine[k].shape]
    if missing or unexpected or shapes:
        run_cfg = start.saved.get("config") or {}
        was = "/".join(str((run_cfg.get(g) or {}).get("name")) for g in ("model", "act") if isinstance(run_cfg.get(g), dict))
        now = "/".join(str(cfg[g].name) for g in ("model", "act")) if cfg is not None else "this config"
        example = (missing or unexpected or shapes)[0]
        counts = ", ".join(f"{len(keys)} {what}" for keys, what in (
            (missing, "weights missing"), (unexpected, "unexpected"), (shapes, "of another shape")) if keys)
        raise BadValueError(
            f"ckpt={start.path} holds another network ({was or 'unknown model'}) than this run builds ({now}): "
            f"{counts} (e.g. {example}); pick the checkpoint's model= and act=, or another ckpt=")
    overridden = {}
    for name, module in model.named_modules():
        if not isinstance(module, dyrelu.DyReLU):
            continue
        group = "head_act" if name.startswith("head.") and cfg is not None and "head_act" in cfg else "act"
        for buf in DYRELU_CONSTANTS:
            key = f"{name}.{buf}"
            given, saved = getattr(module, buf), stored.get(key)
            if saved is not None and saved.shape == given.shape and not torch.equal(saved.to(given.dtype), given):
                overridden.setdefault(f"{group}.{buf}", (_fmt(saved), _fmt(given)))
    model.load_state_dict(stored)
    log.info("initialised weights from %s", start.path)
    if overridden:
        log.warning("ckpt=%s sets its stored DY-ReLU constants over the config's: %s", start.path,
                    ", ".join(f"{k}={s} (given {g})" for k, (s, g) in sorted(overridden.items())))


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
        ckpt_io.atomic_save(checkpoint(state, rngs, extra), last_path, keep_previous=True)
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

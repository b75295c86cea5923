"""The one training loop: `run(cfg, run_dir)` trains any task and leaves a complete run folder.

Reads like torchvision's classification reference: `run` is the recipe (config, data, model,
optimizer, resume, epochs, results); `train_one_epoch` and `evaluate` are plain functions
that take a small `TrainState`.

Host syncs: a training step never waits for the GPU. The loss, a non-finite-loss flag and the
stop flag are summed on the device and read (one `.tolist()`, after one all-reduce under DDP)
every `trainer.log_every` steps and at the end of the epoch; a preemption signal therefore
stops the run within `log_every` steps.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

import dyrelu
from dyrelu.errors import USER_ERROR_EXIT_CODE, BadValueError, NonFiniteLossError  # user errors: one line, exit 2

from . import checkpoint as ckpt_io
from .determinism import use_deterministic_algorithms, use_deterministic_pooling
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, broadcast_object, cleanup, init_distributed
from .loaders import EpochBatchSampler, make_loader, make_train_loader, val_indices
from .loggers import RunLogger
from .optim import build_optimizer, build_scheduler
from .precise_bn import recalibrate_bn
from .signals import PreemptionHandler, StopRequested, request_requeue
from .tasks import build_task
from .tasks.base import Task
from .threads import CpuThreads
from .validate import validate

log = logging.getLogger("dyrelu.train")

__all__ = ["run", "train_one_epoch", "evaluate", "TrainState", "make_loader", "resolve_device", "autocast_factory",
           "use_channels_last", "NonFiniteLossError", "tau_at"]


# ---------------------------------------------------------------------------------------------
# settings shared with eval.py
# ---------------------------------------------------------------------------------------------
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


def tau_at(cfg, epoch: int, max_epochs: int) -> Optional[float]:
    """DY-ReLU-C's softmax temperature for ``epoch`` (trainer.tau_schedule), or None to leave each
    module at the ``tau`` it was built with (the default: no schedule, so ``act.tau`` holds).

    An unset ``start`` is ``act.tau``; an unset ``end`` is ``start`` (engine/validate.py rejects a
    ``start`` that contradicts ``act.tau``).
    """
    ts = cfg.trainer.tau_schedule
    if ts.start is None and ts.end is None:
        return None
    act_tau = cfg.act.get("tau") if "act" in cfg else None
    start = float(ts.start if ts.start is not None else (act_tau if act_tau is not None else 10.0))
    end_value = start if ts.end is None else float(ts.end)
    end = max(1.0, float(ts.end_epoch_frac) * max_epochs)
    frac = min(1.0, epoch / end)
    return start + frac * (end_value - start)


# ---------------------------------------------------------------------------------------------
# the state one epoch reads and advances
# ---------------------------------------------------------------------------------------------
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


class _Syncs:
    """The per-epoch device-side accumulators, read at sync points only."""

    def __init__(self, state: TrainState):
        zero = torch.zeros((), dtype=torch.float64, device=state.device)
        # The saved sums are over all ranks: rank 0 carries them, so the all-reduce counts them once.
        carried = state.dist.is_main
        self.epoch_loss = zero + (state.epoch_loss_sum if carried else 0.0)
        self.epoch_n = zero + (state.epoch_seen if carried else 0)
        self.window_loss, self.window_n, self.bad = zero.clone(), zero.clone(), zero.clone()

    def add(self, loss: torch.Tensor, n: int) -> None:
        loss = loss.detach().double()
        self.bad += (~torch.isfinite(loss)).double()
        self.window_loss += loss * n
        self.window_n += n
        self.epoch_loss += loss * n
        self.epoch_n += n

    def read(self, stop: bool) -> tuple[float, float, float, float, float]:
        """One all-reduce and one host sync: (bad, stop, window mean loss, epoch loss sum, epoch n)."""
        stop_t = torch.tensor(float(stop), dtype=torch.float64, device=self.bad.device)
        flat = all_reduce_sum(torch.stack([self.bad, stop_t, self.window_loss, self.window_n, self.epoch_loss, self.epoch_n]))
        bad, stop_count, wl, wn, el, en = flat.tolist()
        self.window_loss.zero_()
        self.window_n.zero_()
        return bad, stop_count, wl / max(wn, 1.0), el, en


def train_one_epoch(state: TrainState, loader, num_steps: int, *, preempt, on_stop, run_logger=None, progress: bool = False,
                    max_epochs: int = 0, save_every: int = 0, on_save=None, on_sync=None) -> tuple[float, int, float]:
    """Train ``state.epoch`` from ``state.step_in_epoch`` to ``num_steps``.

    Returns (mean loss over the whole epoch, samples trained by this call over all ranks, its
    seconds). Calls ``on_stop()`` (which saves and raises) when a sync point sees a stop signal,
    and ``on_save()`` (which writes last.pt) at the first sync point ``save_every`` or more steps
    after the previous save, unless the epoch ends there (its own checkpoint follows);
    ``on_sync()`` at every sync point.
    """
    model, opt, dist = state.train_model, state.optimizer, state.dist
    model.train()
    syncs = _Syncs(state)
    seen, t0 = 0, time.perf_counter()
    bar = None
    if dist.is_main and progress:
        from tqdm import tqdm

        bar = tqdm(total=num_steps, initial=state.step_in_epoch, desc=f"epoch {state.epoch + 1}/{max_epochs}",
                   mininterval=1.0, dynamic_ncols=True)
    first = window_start = state.step_in_epoch
    saved_at = state.global_step
    for step, batch in enumerate(loader, start=first):
        if step >= num_steps:
            break
        batch = state.task.to_device(batch, state.device, state.channels_last)
        with state.autocast():
            loss, n = state.task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        if state.scaler is not None:
            state.scaler.scale(loss).backward()
            if state.grad_clip:
                state.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), state.grad_clip)
            state.scaler.step(opt)
            state.scaler.update()
        else:
            loss.backward()
            if state.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), state.grad_clip)
            opt.step()
        state.global_step += 1
        state.step_in_epoch = step + 1
        state.scheduler.step_update(state.global_step)
        if state.ema is not None:
            state.ema.update(state.model, step=state.global_step)
        syncs.add(loss, n)
        seen += n
        if bar is not None:
            bar.update(1)
        if state.global_step % state.log_every and step + 1 < num_steps:
            continue
        # ---- the sync point --------------------------------------------------------------
        bad, stop, window_loss, state.epoch_loss_sum, epoch_seen = syncs.read(preempt.requested)
        state.epoch_seen = int(epoch_seen)
        if bad > 0:
            where = f"step {step + 1}" if window_start == step else f"steps {window_start + 1}-{step + 1}"
            raise NonFiniteLossError(
                f"loss became non-finite at epoch {state.epoch + 1} {where} (global step {state.global_step}); stopping. "
                f"Last good checkpoint: {state.last_good or 'none written yet'} (left intact)"
            )
        window_start = step + 1
        if on_sync is not None:
            on_sync()
        lr = opt.param_groups[0]["lr"]
        ips = seen * dist.world_size / max(time.perf_counter() - t0, 1e-9)
        if bar is not None:
            bar.set_postfix(loss=f"{window_loss:.4f}", img_s=f"{ips:.1f}", lr=f"{lr:.3g}", refresh=False)
        if dist.is_main:
            log.info("epoch %d step %d/%d loss %.4f lr %.4g %.1f img/s", state.epoch + 1, step + 1, num_steps, window_loss, lr, ips)
            if run_logger is not None:
                run_logger.log_step({"loss": window_loss, "lr": lr, "img_s": ips}, state.global_step)
        if stop > 0:
            on_stop()
        if save_every and state.global_step - saved_at >= save_every and step + 1 < num_steps:
            on_save()
            saved_at = state.global_step
    if bar is not None:
        bar.close()
    return state.epoch_loss_sum / max(state.epoch_seen, 1), seen * dist.world_size, time.perf_counter() - t0


def evaluate(model, task: Task, loader, *, device, autocast, channels_last, progress: bool = False, desc: str = "val") -> dict:
    model.eval()
    if progress:  # trainer.progress, on rank 0: a bar over the validation batches like training's
        from tqdm import tqdm

        loader = tqdm(loader, total=len(loader), desc=desc, leave=False, mininterval=1.0, dynamic_ncols=True)
    return task.evaluate(model, loader, device, autocast, channels_last)


class _StoppableBatches:
    """Yields a loader's batches; every ``every`` batches, all ranks agree on the stop flag and
    ``on_stop()`` runs when it is set (validation honours preemption too). Ranks may hold
    different numbers of validation batches, so they agree only within the first ``common``
    batches, which every rank has."""

    def __init__(self, loader, preempt, every: int, on_stop, common: int, device: torch.device):
        self.loader, self.preempt, self.every, self.on_stop = loader, preempt, every, on_stop
        self.common, self.device = common, device

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader, start=1):
            yield batch
            if i % self.every == 0 and i <= self.common and _agree(self.preempt.requested, self.device):
                self.on_stop()


def _agree(flag: bool, device: torch.device) -> bool:
    """True when any rank has ``flag`` set (no collective without DDP)."""
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        return bool(flag)
    return all_reduce_sum(torch.tensor([float(flag)], device=device)).item() > 0


# ---------------------------------------------------------------------------------------------
# the recipe's steps
# ---------------------------------------------------------------------------------------------
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


def wrap_for_training(model, cfg, device: torch.device, dist: DistInfo):
    """torch.compile in place, then DDP: PyTorch's "Where to apply torch.compile?" page
    (docs.pytorch.org/docs/stable/compile/programming_model.where_to_apply_compile.html) says
    torch.compile does not handle wrappers like DDP well and shows ``model.compile()`` followed
    by ``DistributedDataParallel(model)``. Compiling in place keeps state_dict keys unchanged."""
    if cfg.trainer.compile:
        model.compile()
    if dist.enabled:
        return DistributedDataParallel(model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
    return model


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


def recalibrate_bn_stats(state: TrainState, loader, sampler: EpochBatchSampler, num_batches: int) -> None:
    """Precise BN (trainer.precise_bn_batches): the first batches of this epoch's order."""
    sampler.set_epoch(state.epoch, 0, num_batches)
    for target in [state.model] + ([state.ema.module] if state.ema is not None else []):
        inputs = (state.task.to_device(b, state.device, state.channels_last)[0] for b in loader)
        with state.autocast():
            recalibrate_bn(target, inputs, num_batches, state.dist.world_size)


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


@dataclass
class Data:
    """The loaders of one run and the numbers the loop needs from them."""
    train_loader: torch.utils.data.DataLoader
    sampler: EpochBatchSampler          # tells the training loader each epoch's batches
    val_loader: torch.utils.data.DataLoader
    val_common: int                     # validation batches that every rank has
    steps_per_epoch: int                # full global batches in the training set
    num_steps: int                      # steps trained per epoch (trainer.limit_train_batches)


def build_data(cfg, task: Task, dist: DistInfo) -> Data:
    """The task's datasets and persistent loaders: training batches strided over ranks from one
    seeded order per epoch, validation samples strided over ranks."""
    d, trainer = cfg.data, cfg.trainer
    if d.batch_size % dist.world_size:
        raise BadValueError(f"data.batch_size={d.batch_size} (global) is not divisible by the {dist.world_size} ranks")
    per_rank_batch = d.batch_size // dist.world_size
    train_ds, val_ds = task.build_datasets()
    steps_per_epoch = len(train_ds) // d.batch_size
    if steps_per_epoch == 0:
        raise BadValueError(f"the training set has {len(train_ds)} samples, fewer than one global batch (data.batch_size={d.batch_size})")
    sampler = EpochBatchSampler(len(train_ds), int(cfg.seed), per_rank_batch, dist)
    val_share, val_common = val_indices(len(val_ds), dist, trainer.limit_val_batches, per_rank_batch)
    return Data(
        train_loader=make_train_loader(train_ds, sampler, int(d.num_workers), task.collate_fn()), sampler=sampler,
        val_loader=make_loader(val_ds, val_share, per_rank_batch, int(d.num_workers), int(cfg.seed), task.collate_fn()),
        val_common=val_common, steps_per_epoch=steps_per_epoch,
        num_steps=min(steps_per_epoch, trainer.limit_train_batches or steps_per_epoch),
    )


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


def begin_epoch(cfg, state: TrainState, epoch: int, data: Data, resumed_rng) -> tuple[dict, Iterator]:
    """Seeds, DY-ReLU-C's temperature and the sampler for ``epoch``; returns the row's extras and
    the epoch's batches."""
    if epoch != state.epoch:  # a new epoch, not the one resumed into
        state.epoch, state.step_in_epoch, state.epoch_loss_sum, state.epoch_seen = epoch, 0, 0.0, 0
    data.sampler.set_epoch(epoch, state.step_in_epoch, data.num_steps - state.step_in_epoch)
    seed_epoch(cfg, state, resumed_rng, data.train_loader)
    batches = iter(data.train_loader)  # draws from the loader's own generator only
    tau = tau_at(cfg, epoch, int(cfg.trainer.max_epochs))
    if tau is None:
        return {}, batches
    uses_tau = dyrelu.set_tau(state.model, tau)
    if state.ema is not None:
        dyrelu.set_tau(state.ema.module, tau)
    return ({"tau": tau} if uses_tau else {}), batches


def evaluate_epoch(cfg, state: TrainState, data: Data, val_batches) -> bool:
    """Precise BN if asked, then the metrics of the model (and of its EMA); True if best improved."""
    if cfg.trainer.precise_bn_batches:
        recalibrate_bn_stats(state, data.train_loader, data.sampler, min(int(cfg.trainer.precise_bn_batches), data.steps_per_epoch))
    kw = dict(device=state.device, autocast=state.autocast, channels_last=state.channels_last,
              progress=bool(cfg.trainer.progress) and state.dist.is_main)
    state.metrics = evaluate(state.model, state.task, val_batches, desc=f"val {state.epoch + 1}", **kw)
    if state.ema is not None:
        ema_metrics = evaluate(state.ema.module, state.task, val_batches, desc=f"val {state.epoch + 1} EMA", **kw)
        state.metrics.update({f"{k}_ema": v for k, v in ema_metrics.items()})
    bad = {k: v for k, v in state.metrics.items() if k.startswith("val_loss") and not math.isfinite(v)}
    if bad:
        raise NonFiniteLossError(
            f"validation loss became non-finite at epoch {state.epoch + 1} ({', '.join(f'{k} {v}' for k, v in bad.items())}); "
            f"stopping. Last good checkpoint: {state.last_good or 'none written yet'} (left intact)")
    value = state.metrics[state.task.primary_metric]
    improved = value > state.best
    state.best = max(state.best, value)
    return improved


def end_epoch(state: TrainState, row: dict, improved: bool, paths: tuple[Path, Path], extra: dict, run_logger,
              max_epochs: int) -> None:
    """The epoch is done: last.pt (and best.pt) resume at the next one; log the row."""
    last_path, best_path = paths
    state.epoch, state.step_in_epoch, state.epoch_loss_sum, state.epoch_seen = row["epoch"], 0, 0.0, 0
    rngs = all_gather_objects(ckpt_io.rng_state())
    if state.dist.is_main:
        # The row first: a kill before last.pt is written drops it on resume (metrics.csv keeps
        # the epochs of the checkpoint), a kill after keeps it, so no epoch's row is ever lost.
        run_logger.log_epoch(row, state.global_step)
        saved = checkpoint(state, rngs, extra)
        if improved:  # before last.pt: a kill in between redoes the epoch, which improves again
            ckpt_io.atomic_save(saved, best_path)
        ckpt_io.atomic_save(saved, last_path)
        state.last_good = str(last_path)
        log.info("epoch %d/%d: %s", row["epoch"], max_epochs,
                 ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "epoch"))
    barrier()


def write_results(run_dir: Path, results: dict) -> None:
    tmp = run_dir / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(run_dir / "results.json")
    log.info("results: %s", json.dumps(results))
    log.info("run folder: %s", run_dir)


# ---------------------------------------------------------------------------------------------
# the recipe
# ---------------------------------------------------------------------------------------------
def run(cfg, run_dir: str | Path) -> dict:
    """Train (or resume) the run in ``run_dir``; returns the results written to results.json."""
    validate(cfg)
    # This run's share of the CPU, taken before any work and given back at the end (threads.py).
    with CpuThreads(cfg.trainer.threads, adaptive=not cfg.trainer.deterministic) as threads:
        return _run(cfg, run_dir, threads)


def _run(cfg, run_dir: str | Path, threads: CpuThreads) -> dict:
    # ---- config and process ----------------------------------------------------------------
    t_start = time.time()
    device, dist = setup_process(cfg)
    # Every rank works in rank 0's folder, whatever each rank's Hydra resolved.
    run_dir = Path(broadcast_object(str(Path(run_dir).resolve())))
    run_dir.mkdir(parents=True, exist_ok=True)  # Hydra makes it; a caller of run() may not have
    paths = last_path, _ = run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt"
    channels_last = use_channels_last(cfg.trainer, device)
    max_epochs = int(cfg.trainer.max_epochs)

    # ---- data, model, optimizer ------------------------------------------------------------
    task = build_task(cfg)
    data = build_data(cfg, task, dist)
    model, complexity = build_model(cfg, task, device, dist, channels_last)
    state = build_state(cfg, task, model, data, device, dist, channels_last)

    # ---- resume ----------------------------------------------------------------------------
    resumed_rng = resume(state, last_path, cfg.ckpt)
    state.train_model = wrap_for_training(model, cfg, device, dist)
    state.last_good = str(last_path) if last_path.exists() else None
    resolved = OmegaConf.to_container(cfg, resolve=True)
    extra = {"config": resolved, "complexity": complexity, "primary_metric": task.primary_metric}
    run_logger = RunLogger(cfg, run_dir, state.epoch, dist.is_main, resolved)
    if dist.is_main:
        run_logger.summary(complexity)

    def describe(epochs: int) -> dict:
        """What ran, for results.json: ``epochs`` trained (or reached)."""
        return {"task": task.name, "model": cfg.model.name, "act": cfg.act.name,
                **({"head_act": cfg.head_act.name} if "head_act" in cfg else {}), "epochs": epochs,
                "seed": int(cfg.seed), "table": cfg.get("table"), "row": cfg.get("row"),
                "world_size": dist.world_size, "device": device.type, "threads": threads.threads}

    # ---- epochs ----------------------------------------------------------------------------
    try:
        with PreemptionHandler() as preempt:
            stop = lambda: save_and_stop(state, preempt, last_path, extra)  # noqa: E731
            val_batches = _StoppableBatches(data.val_loader, preempt, state.log_every, stop, data.val_common, device)
            for epoch in range(state.epoch, max_epochs):
                threads.rebalance()
                row, batches = begin_epoch(cfg, state, epoch, data, resumed_rng)
                train_loss, seen, secs = train_one_epoch(
                    state, batches, data.num_steps, preempt=preempt, on_stop=stop, run_logger=run_logger,
                    progress=cfg.trainer.progress, max_epochs=max_epochs, save_every=int(cfg.trainer.save_every or 0),
                    on_save=lambda: save_last(state, last_path, extra), on_sync=threads.poll)
                row = {"epoch": epoch + 1, "train_loss": train_loss, "lr": state.optimizer.param_groups[0]["lr"],
                       "train_img_s": seen / max(secs, 1e-9), "epoch_time_s": secs, **row}
                improved = False
                if (epoch + 1) % cfg.trainer.val_every == 0 or epoch + 1 == max_epochs:
                    improved = evaluate_epoch(cfg, state, data, val_batches)
                    row.update(state.metrics)
                    row[f"best_{task.primary_metric}"] = state.best
                end_epoch(state, row, improved, paths, extra, run_logger, max_epochs)
    except StopRequested as stopped:
        if dist.is_main:
            run_logger.finish(124)
        cleanup()
        if stopped.chain is not None:
            stopped.chain()  # submitit's handler: pickles the job, requeues it and exits
        raise
    except NonFiniteLossError as diverged:
        # The run is over and did not succeed: say so in results.json (no metrics: they are NaN),
        # so that nothing reading the folder mistakes it for a result.
        if dist.is_main:
            run_logger.finish(USER_ERROR_EXIT_CODE)
            write_results(run_dir, {"status": "failed", "reason": str(diverged), **describe(state.epoch),
                                    "wall_time_s": round(time.time() - t_start, 2)})
        cleanup()
        raise
    except BaseException:
        if dist.is_main:
            run_logger.finish(1)
        cleanup()
        raise
    if dist.is_main:
        run_logger.finish(0)

    # ---- results ---------------------------------------------------------------------------
    results = {
        "status": "completed", **describe(max_epochs), **task.results(state.metrics, state.best), **complexity,
        "wall_time_s": round(time.time() - t_start, 2),
    }
    if dist.is_main:
        write_results(run_dir, results)
    cleanup()
    return results

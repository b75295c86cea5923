"""The one training loop: `run(cfg, run_dir)` trains any task and leaves a complete run folder.

Reads like torchvision's classification reference: `run` is the recipe (config, data, model,
optimizer, resume, epochs, results); `train_one_epoch` and `evaluate` are plain functions
that take a small `TrainState`. What the recipe calls lives beside it: runtime.py (device,
precision, process, the model on the device), loaders.py (the run's loaders), state.py
(TrainState and its checkpoints).

Host syncs: a training step never waits for the GPU. The loss, a non-finite-loss flag and the
stop flag are summed on the device and read (one `.tolist()`, after one all-reduce under DDP)
every `trainer.log_every` steps and at the end of the epoch; a preemption signal therefore
stops the run within `log_every` steps.
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Iterator, Optional

import torch
from omegaconf import OmegaConf

import dyrelu
from dyrelu.errors import USER_ERROR_EXIT_CODE, NonFiniteLossError  # user errors: one line, exit 2

from . import checkpoint as ckpt_io
from .distributed import all_gather_objects, all_reduce_sum, barrier, broadcast_object, cleanup
from .loaders import Data, EpochBatchSampler, build_data
from .loggers import RunLogger
from .precise_bn import recalibrate_bn
from .residual_warmup import ResidualWarmup
from .runtime import build_model, setup_process, use_channels_last, wrap_for_training
from .signals import PreemptionHandler, StoppableBatches, StopRequested
from .state import TrainState, build_state, checkpoint, read_start, resume, save_and_stop, save_last, seed_epoch
from .tasks import build_task
from .tasks.base import Task
from .threads import CpuThreads
from .validate import validate

log = logging.getLogger("dyrelu.train")

__all__ = ["run", "train_one_epoch", "evaluate", "tau_at", "tau_parts", "set_scheduled_tau"]


# ---------------------------------------------------------------------------------------------
# one epoch of training, one evaluation
# ---------------------------------------------------------------------------------------------
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
        if state.residual_warmup is not None:
            state.residual_warmup(state.global_step)
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


# ---------------------------------------------------------------------------------------------
# the recipe's steps
# ---------------------------------------------------------------------------------------------
def recalibrate_bn_stats(state: TrainState, loader, sampler: EpochBatchSampler, num_batches: int) -> None:
    """Precise BN (trainer.precise_bn_batches): the first batches of this epoch's order."""
    sampler.set_epoch(state.epoch, 0, num_batches)
    for target in [state.model] + ([state.ema.module] if state.ema is not None else []):
        inputs = (state.task.to_device(b, state.device, state.channels_last)[0] for b in loader)
        with state.autocast():
            recalibrate_bn(target, inputs, num_batches, state.dist.world_size)


def tau_at(cfg, epoch: int, max_epochs: int, key: str = "act") -> Optional[float]:
    """DY-ReLU-C's softmax temperature for ``epoch`` (trainer.tau_schedule) in the modules built from
    config ``key`` (``act``: the backbone; ``head_act``: the pose head), or None to leave each module
    at the ``tau`` it was built with (the default: no schedule, so ``act.tau`` and ``head_act.tau`` hold).

    An unset ``start`` is ``<key>.tau``, so the backbone and the head each start from their own
    temperature; an unset ``end`` is that start (engine/validate.py rejects a ``start`` that
    contradicts ``act.tau`` or ``head_act.tau``).
    """
    ts = cfg.trainer.tau_schedule
    if ts.start is None and ts.end is None:
        return None
    own = cfg[key].get("tau") if cfg.get(key) is not None else None
    start = float(ts.start if ts.start is not None else (own if own is not None else 10.0))
    end_value = start if ts.end is None else float(ts.end)
    end = max(1.0, float(ts.end_epoch_frac) * max_epochs)
    frac = min(1.0, epoch / end)
    return start + frac * (end_value - start)


def tau_parts(cfg, model: torch.nn.Module) -> list:
    """[(config key, module)]: the parts of ``model`` whose DY-ReLU-Cs were built from ``act`` and
    from ``head_act``. A pose model (``backbone`` and ``head``, config with ``head_act``) has two;
    any other model is all ``act``."""
    head, backbone = getattr(model, "head", None), getattr(model, "backbone", None)
    if cfg.get("head_act") is not None and isinstance(head, torch.nn.Module) and isinstance(backbone, torch.nn.Module):
        return [("act", backbone), ("head_act", head)]
    return [("act", model)]


def set_scheduled_tau(cfg, model: torch.nn.Module, epoch: int, ema_model: Optional[torch.nn.Module] = None) -> dict:
    """Each part's scheduled tau into its DY-ReLU-Cs (and the EMA copy's); returns the row's extras:
    ``tau`` (backbone) and ``head_tau`` (pose head) for the parts that have a DY-ReLU-C."""
    extras = {}
    max_epochs = int(cfg.trainer.max_epochs)
    for key, part in tau_parts(cfg, model):
        tau = tau_at(cfg, epoch, max_epochs, key)
        if tau is None:
            return {}
        if dyrelu.set_tau(part, tau):
            extras["tau" if key == "act" else "head_tau"] = tau
    if ema_model is not None:
        for key, part in tau_parts(cfg, ema_model):
            dyrelu.set_tau(part, tau_at(cfg, epoch, max_epochs, key))
    return extras


def begin_epoch(cfg, state: TrainState, epoch: int, data: Data, resumed_rng) -> tuple[dict, Iterator]:
    """Seeds, DY-ReLU-C's temperature and the sampler for ``epoch``; returns the row's extras and
    the epoch's batches."""
    if epoch != state.epoch:  # a new epoch, not the one resumed into
        state.epoch, state.step_in_epoch, state.epoch_loss_sum, state.epoch_seen = epoch, 0, 0.0, 0
    data.sampler.set_epoch(epoch, state.step_in_epoch, data.num_steps - state.step_in_epoch)
    seed_epoch(cfg, state, resumed_rng, data.train_loader)
    batches = iter(data.train_loader)  # draws from the loader's own generator only
    ema = state.ema.module if state.ema is not None else None
    return set_scheduled_tau(cfg, state.model, epoch, ema), batches


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
        ckpt_io.atomic_save(saved, last_path, keep_previous=True)
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
    # Read before anything is built: a damaged checkpoint costs seconds, and leaves no run folder.
    start = read_start(last_path, cfg.ckpt, dist.is_main)

    # ---- data, model, optimizer ------------------------------------------------------------
    task = build_task(cfg)
    data = build_data(cfg, task, dist)
    model, complexity = build_model(cfg, task, device, dist, channels_last)
    state = build_state(cfg, task, model, data, device, dist, channels_last)
    state.residual_warmup = ResidualWarmup.from_config(cfg, model, data.num_steps)  # before a checkpoint loads

    # ---- resume ----------------------------------------------------------------------------
    resumed_rng = resume(state, start, cfg)
    del start  # the checkpoint's tensors: not held through training
    state.train_model = wrap_for_training(model, cfg, device, dist)
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
            val_batches = StoppableBatches(data.val_loader, preempt, state.log_every, stop, data.val_common, device)
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

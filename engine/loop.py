"""The one training loop: `run(cfg, run_dir)` trains any task and leaves a complete run folder.

Reads like torchvision's references: `train_one_epoch` and `evaluate` are plain functions;
`run` wires data, model, optimizer, checkpoints and loggers around them.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.nn.parallel import DistributedDataParallel

import dyrelu
from dyrelu.errors import BadValueError, NonFiniteLossError  # user errors: one line, exit 2

from . import checkpoint as ckpt_io
from .distributed import DistInfo, all_gather_objects, all_reduce_sum, barrier, broadcast_object, cleanup, init_distributed
from .loggers import RunLogger
from .optim import build_optimizer, build_scheduler
from .signals import PreemptionHandler, StopRequested, request_requeue
from .tasks import build_task
from .validate import validate

log = logging.getLogger("dyrelu.train")


# ---------------------------------------------------------------------------------------------
# small helpers
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
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" else "off"
    if amp in ("off", False):
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def unwrap(model):
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


def epoch_indices(n: int, seed: int, epoch: int, global_batch: int, dist: DistInfo, shuffle: bool = True) -> list[int]:
    """This rank's sample order for one epoch: a seeded permutation cut to full global batches,
    then strided over ranks, so the union of the ranks' batches is the 1-process batch."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)) if shuffle else torch.arange(n)
    order = order[: (n // global_batch) * global_batch]
    return order[dist.rank :: dist.world_size].tolist()


def make_loader(dataset, indices, batch_size, num_workers, seed, collate_fn=None, drop_last=False):
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        pin_memory=torch.cuda.is_available(), drop_last=drop_last, collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed), persistent_workers=False,
    )


def tau_at(cfg, epoch: int, max_epochs: int) -> float:
    ts = cfg.trainer.tau_schedule
    end = max(1.0, float(ts.end_epoch_frac) * max_epochs)
    frac = min(1.0, epoch / end)
    return float(ts.start) + frac * (float(ts.end) - float(ts.start))


# ---------------------------------------------------------------------------------------------
# one epoch of training, one evaluation
# ---------------------------------------------------------------------------------------------
def train_one_epoch(model, task, loader, optimizer, scheduler, *, device, autocast, scaler, cfg, epoch, start_step,
                    global_step, ema, run_logger, preempt, on_stop, last_good, dist: DistInfo, num_steps, channels_last):
    """Returns (mean loss, samples, seconds, global_step). Calls ``on_stop(step)`` when a stop signal arrives."""
    model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen, t0 = 0, time.perf_counter()
    it = enumerate(loader, start=start_step)
    bar = None
    if dist.is_main and cfg.trainer.progress:
        from tqdm import tqdm

        bar = tqdm(total=num_steps, initial=start_step, desc=f"epoch {epoch + 1}/{cfg.trainer.max_epochs}", mininterval=1.0, dynamic_ncols=True)
    for step, batch in it:
        if step >= num_steps:
            break
        batch = task.to_device(batch, device, channels_last)
        with autocast():
            loss, n = task.loss(model, batch)
        # One tiny all-reduce per step: every rank agrees on a bad loss or a stop signal,
        # so all ranks stop together.
        flags = all_reduce_sum(torch.stack([(~torch.isfinite(loss.detach())).float(),
                                            torch.tensor(float(preempt.requested), device=device)]))
        bad, stop = flags.tolist()
        if bad > 0:
            raise NonFiniteLossError(
                f"loss became {loss.item()} at epoch {epoch + 1} step {step + 1} (global step {global_step + 1}); "
                f"stopping. Last good checkpoint: {last_good or 'none written yet'} (left intact)"
            )
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if cfg.trainer.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if cfg.trainer.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
            optimizer.step()
        global_step += 1
        scheduler.step_update(global_step)
        if ema is not None:
            ema.update(unwrap(model), step=global_step)
        loss_sum += loss.detach().double() * n
        seen += n
        lr = optimizer.param_groups[0]["lr"]
        if bar is not None:
            elapsed = time.perf_counter() - t0
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{seen * dist.world_size / max(elapsed, 1e-9):.1f}", lr=f"{lr:.3g}", refresh=False)
            bar.update(1)
        if dist.is_main and global_step % cfg.trainer.log_every == 0:
            elapsed = time.perf_counter() - t0
            ips = seen * dist.world_size / max(elapsed, 1e-9)
            log.info("epoch %d step %d/%d loss %.4f lr %.4g %.1f img/s", epoch + 1, step + 1, num_steps, loss.item(), lr, ips)
            run_logger.log_step({"loss": loss.item(), "lr": lr, "img_s": ips}, global_step)
        if stop > 0:
            on_stop(step + 1, global_step)
    if bar is not None:
        bar.close()
    totals = all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(seen), dtype=torch.float64, device=device)]))
    return (totals[0] / totals[1].clamp(min=1)).item(), int(totals[1].item()), time.perf_counter() - t0, global_step


def evaluate(model, task, loader, *, device, autocast, channels_last):
    model.eval()
    return task.evaluate(model, loader, device, autocast, channels_last)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def count_complexity(model, input_size) -> dict:
    from dyrelu.flops import count_complexity as count

    c = count(model, input_size)
    # madds counts all of DY-ReLU's work; madds_paper is the paper's convention (its multiplies only).
    return {k: int(c[k]) for k in ("params", "params_no_classifier", "madds", "madds_paper")}


def run(cfg, run_dir: str | Path) -> dict:
    """Train (or resume) the run in ``run_dir``; returns the results written to results.json."""
    validate(cfg)
    t_start = time.time()
    device = resolve_device(cfg.trainer.device)
    dist = init_distributed(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    if not dist.is_main:  # rank 0 speaks for the run
        logging.getLogger().setLevel(logging.WARNING)
    # Every rank works in rank 0's folder, whatever each rank's Hydra resolved.
    run_dir = Path(broadcast_object(str(Path(run_dir).resolve())))
    ckpt_dir = run_dir / "checkpoints"
    last_path, best_path = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    channels_last = use_channels_last(cfg.trainer, device)
    if device.type == "cpu":
        # Tiny gradients (heatmap MSE) make Adam's second moments denormal, which is 10-100x
        # slower on x86 CPUs; flushing them to zero changes nothing measurable.
        torch.set_flush_denormal(True)
    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ckpt_io.seed_everything(int(cfg.seed) + dist.rank)

    data_cfg = cfg.data
    if data_cfg.batch_size % dist.world_size:
        raise BadValueError(f"data.batch_size={data_cfg.batch_size} (global) is not divisible by the {dist.world_size} ranks")
    per_rank_batch = data_cfg.batch_size // dist.world_size

    task = build_task(cfg)
    train_ds, val_ds = task.build_datasets()
    model = task.build_model()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    complexity = count_complexity(model, task.input_size()) if dist.is_main else None
    complexity = broadcast_object(complexity)
    log.info("model %s act %s%s: %.3f M params, %.2f M MAdds at %s", cfg.model.name, cfg.act.name,
             f" head {cfg.head_act.name}" if "head_act" in cfg else "", complexity["params"] / 1e6,
             complexity["madds"] / 1e6, "x".join(map(str, task.input_size()[1:])))

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if dist.enabled and cfg.trainer.sync_bn:
        if device.type == "cuda":
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            from .sync_bn import convert_global_batchnorm

            model = convert_global_batchnorm(model)
    global_batch = per_rank_batch * dist.world_size
    steps_per_epoch = len(train_ds) // global_batch
    if steps_per_epoch == 0:
        raise BadValueError(f"the training set has {len(train_ds)} samples, fewer than one global batch (data.batch_size={global_batch})")
    num_steps = min(steps_per_epoch, cfg.trainer.limit_train_batches or steps_per_epoch)
    max_epochs = int(cfg.trainer.max_epochs)
    optimizer = build_optimizer(model, cfg.optim, global_batch)
    scheduler = build_scheduler(optimizer, cfg.sched, max_epochs, num_steps)
    autocast, scaler = autocast_factory(cfg.trainer.amp, device)
    ema = None
    if cfg.trainer.ema_decay:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=float(cfg.trainer.ema_decay))

    # ---- resume ---------------------------------------------------------------------------
    start_epoch, start_step, global_step, best, last_metrics = 0, 0, 0, -math.inf, {}
    resumed_rng = None
    if last_path.exists():
        state = ckpt_io.load(last_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        # The schedule is a function of the config and the step (scheduler state is saved for
        # inspection only), so a resumed run follows the config it is resumed with.
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        start_epoch, start_step, global_step = state["epoch"], state.get("step_in_epoch", 0), state["global_step"]
        best, last_metrics = state.get("best_metric", -math.inf), state.get("metrics", {})
        resumed_rng = state["rng"][dist.rank] if isinstance(state["rng"], list) and dist.rank < len(state["rng"]) else None
        if dist.is_main:
            log.info("Resuming from %s: epoch %d, step %d (global step %d), best %s %.4f",
                     last_path, start_epoch + 1, start_step, global_step, task.primary_metric, best)
        scheduler.step_update(global_step)
    elif cfg.ckpt:
        state = ckpt_io.load(cfg.ckpt)
        model.load_state_dict(state["model"])
        log.info("initialised weights from %s", cfg.ckpt)

    train_model = model
    if cfg.trainer.compile:
        train_model = torch.compile(model)
    if dist.enabled:
        train_model = DistributedDataParallel(train_model, device_ids=[dist.local_rank] if device.type == "cuda" else None)

    run_logger = RunLogger(cfg, run_dir, start_epoch, dist.is_main, resolved)
    if dist.is_main:
        run_logger.summary(complexity)

    val_indices = list(range(dist.rank, len(val_ds), dist.world_size))
    if cfg.trainer.limit_val_batches:
        val_indices = val_indices[: cfg.trainer.limit_val_batches * per_rank_batch]
    val_loader = make_loader(val_ds, val_indices, per_rank_batch, data_cfg.num_workers, cfg.seed, task.collate_fn())

    def state_dict(epoch, step_in_epoch, gstep, metrics, rngs):
        """The checkpoint; ``rngs`` is every rank's RNG state (all_gather_objects of rng_state())."""
        return {
            "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None, "ema": ema.state_dict() if ema is not None else None,
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": gstep, "best_metric": best, "metrics": metrics,
            "rng": rngs, "config": resolved, "complexity": complexity, "primary_metric": task.primary_metric,
        }

    last_good = str(last_path) if last_path.exists() else None
    exit_code = 0
    metrics = dict(last_metrics)
    try:
        with PreemptionHandler() as preempt:
            for epoch in range(start_epoch, max_epochs):
                mid_epoch = epoch == start_epoch and start_step > 0
                # Each epoch's randomness depends only on (seed, epoch, rank): a resumed run
                # repeats exactly what an uninterrupted one would have done.
                epoch_seed = int(cfg.seed) * 1000 + epoch * 17 + dist.rank
                if mid_epoch and resumed_rng is not None:
                    ckpt_io.set_rng_state(resumed_rng)  # stopped mid-epoch: continue its random stream
                else:
                    ckpt_io.seed_everything(epoch_seed)
                tau = tau_at(cfg, epoch, max_epochs)
                n_c = dyrelu.set_tau(unwrap(model), tau)
                first = start_step if mid_epoch else 0
                indices = epoch_indices(len(train_ds), int(cfg.seed), epoch, global_batch, dist)
                loader = make_loader(train_ds, indices[first * per_rank_batch:], per_rank_batch, data_cfg.num_workers,
                                     epoch_seed, task.collate_fn(), drop_last=True)

                def on_stop(step_done, gstep):
                    rngs = all_gather_objects(ckpt_io.rng_state())
                    if dist.is_main:
                        ckpt_io.atomic_save(state_dict(epoch, step_done, gstep, metrics, rngs), last_path)
                        log.warning("saved %s at epoch %d step %d; stopping (run the same command to resume)", last_path, epoch + 1, step_done)
                        request_requeue()
                    barrier()
                    raise StopRequested

                train_loss, seen, secs, global_step = train_one_epoch(
                    train_model, task, loader, optimizer, scheduler, device=device, autocast=autocast, scaler=scaler,
                    cfg=cfg, epoch=epoch, start_step=first, global_step=global_step, ema=ema, run_logger=run_logger,
                    preempt=preempt, on_stop=on_stop, last_good=last_good, dist=dist, num_steps=num_steps,
                    channels_last=channels_last,
                )
                row = {"epoch": epoch + 1, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
                       "train_img_s": seen / max(secs, 1e-9), "epoch_time_s": secs}
                if n_c:
                    row["tau"] = tau
                is_last = epoch + 1 == max_epochs
                if (epoch + 1) % cfg.trainer.val_every == 0 or is_last:
                    metrics = evaluate(train_model, task, val_loader, device=device, autocast=autocast, channels_last=channels_last)
                    if ema is not None:
                        ema_metrics = evaluate(ema.module, task, val_loader, device=device, autocast=autocast, channels_last=channels_last)
                        metrics.update({f"{k}_ema": v for k, v in ema_metrics.items()})
                    row.update(metrics)
                    improved = metrics[task.primary_metric] > best
                    if improved:
                        best = metrics[task.primary_metric]
                    row[f"best_{task.primary_metric}"] = best
                else:
                    improved = False
                rngs = all_gather_objects(ckpt_io.rng_state())
                if dist.is_main:
                    state = state_dict(epoch + 1, 0, global_step, metrics, rngs)
                    ckpt_io.atomic_save(state, last_path)
                    last_good = str(last_path)
                    if improved:
                        ckpt_io.atomic_save(state, best_path)
                    run_logger.log_epoch(row, global_step)
                    log.info("epoch %d/%d: %s", epoch + 1, max_epochs,
                             ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "epoch"))
                barrier()
    except StopRequested:
        exit_code = 124
        raise
    except BaseException:
        exit_code = 1
        raise
    finally:
        if dist.is_main:
            run_logger.finish(exit_code)
        if exit_code:
            cleanup()

    results = {
        "task": task.name, "model": cfg.model.name, "act": cfg.act.name,
        **({"head_act": cfg.head_act.name} if "head_act" in cfg else {}),
        **task.results(metrics, best),
        **complexity, "epochs": max_epochs,
        "wall_time_s": round(time.time() - t_start, 2), "seed": int(cfg.seed),
        "table": cfg.get("table"), "row": cfg.get("row"), "world_size": dist.world_size, "device": device.type,
    }
    if dist.is_main:
        tmp = run_dir / "results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(run_dir / "results.json")
        log.info("results: %s", json.dumps(results))
        log.info("run folder: %s", run_dir)
    cleanup()
    return results

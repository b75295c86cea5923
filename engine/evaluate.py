"""Rebuild a run's model from its checkpoint and evaluate it on the validation set."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from . import checkpoint as ckpt_io
from .loop import autocast_factory, make_loader, resolve_device
from .tasks import build_task

log = logging.getLogger("dyrelu.eval")


def evaluate_checkpoint(cfg) -> dict:
    path = Path(cfg.ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt={str(path)!r} does not exist (expected <run>/checkpoints/best.pt or last.pt)")
    state = ckpt_io.load(path)
    run_cfg = OmegaConf.create(state["config"])
    run_cfg = OmegaConf.merge(run_cfg, OmegaConf.create(OmegaConf.to_container(cfg.overrides, resolve=True)))
    for key, target in (("device", "trainer.device"), ("batch_size", "data.batch_size"),
                        ("num_workers", "data.num_workers"), ("limit_val_batches", "trainer.limit_val_batches")):
        if cfg[key] is not None:
            OmegaConf.update(run_cfg, target, cfg[key])
    device = resolve_device(run_cfg.trainer.device)
    channels_last = device.type == "cuda" if run_cfg.trainer.channels_last == "auto" else bool(run_cfg.trainer.channels_last)
    OmegaConf.update(run_cfg, "_channels_last", channels_last, force_add=True)

    task = build_task(run_cfg)
    _, val_ds = task.build_datasets()
    model = task.build_model()
    model.load_state_dict(state["model"])
    model.to(device).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    indices = list(range(len(val_ds)))
    if run_cfg.trainer.limit_val_batches:
        indices = indices[: run_cfg.trainer.limit_val_batches * run_cfg.data.batch_size]
    loader = make_loader(val_ds, indices, int(run_cfg.data.batch_size), int(run_cfg.data.num_workers), 0, task.collate_fn())
    autocast, _ = autocast_factory(run_cfg.trainer.amp, device)
    metrics = task.evaluate(model, loader, device, autocast, channels_last)
    out = {"ckpt": str(path.resolve()), "epoch": state["epoch"], "task": task.name, "model": run_cfg.model.name,
           "act": run_cfg.act.name, **metrics}
    run_dir = path.resolve().parent.parent
    (run_dir / "eval.json").write_text(json.dumps(out, indent=2))
    log.info("eval: %s", json.dumps(out))
    print(json.dumps(out))
    return out

"""Rebuild a run's model from its checkpoint and evaluate it on the validation set."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from . import checkpoint as ckpt_io
from .loop import autocast_factory, make_loader, resolve_device, use_channels_last
from .tasks import build_task
from .tasks.base import Task

log = logging.getLogger("dyrelu.eval")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@dataclass
class LoadedRun:
    cfg: DictConfig          # the run's resolved config with the overrides applied
    task: Task
    val_ds: torch.utils.data.Dataset
    model: torch.nn.Module   # weights loaded, on the CPU
    state: dict              # the checkpoint


def swap_data_group(cfg: DictConfig, name: str) -> None:
    """Replace ``cfg.data`` by the data group ``name``, as ``data=<name>`` would in train.py."""
    path = CONFIG_DIR / "data" / f"{name}.yaml"
    if not path.is_file():
        valid = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))
        raise ValueError(f"data={name!r} is not a data config; valid: {', '.join(valid)}")
    loaded = OmegaConf.load(path)
    cfg.data = loaded.data if path.read_text().lstrip().startswith("# @package _global_") else loaded


def load_run(ckpt: str | Path, overrides: Optional[Mapping[str, Any]] = None, data: Optional[str] = None) -> LoadedRun:
    """The model of a checkpoint and its validation set. ``overrides``: dotted keys of the stored config."""
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"ckpt={str(path)!r} does not exist (expected <run>/checkpoints/best.pt or last.pt)")
    state = ckpt_io.load(path)
    cfg = OmegaConf.create(state["config"])
    if data:
        swap_data_group(cfg, data)
    for key, value in (overrides or {}).items():
        OmegaConf.update(cfg, key, value, force_add=True)
    task = build_task(cfg)
    _, val_ds = task.build_datasets()
    model = task.build_model()
    model.load_state_dict(state["model"])
    return LoadedRun(cfg, task, val_ds, model, state)


def _flatten(d: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def evaluate_checkpoint(cfg) -> dict:
    overrides = _flatten(OmegaConf.to_container(cfg.overrides, resolve=True))
    for key, target in (("device", "trainer.device"), ("batch_size", "data.batch_size"),
                        ("num_workers", "data.num_workers"), ("limit_val_batches", "trainer.limit_val_batches")):
        if cfg[key] is not None:
            overrides[target] = cfg[key]
    run = load_run(cfg.ckpt, overrides)
    run_cfg = run.cfg
    device = resolve_device(run_cfg.trainer.device)
    channels_last = use_channels_last(run_cfg.trainer, device)
    model = run.model.to(device).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    indices = list(range(len(run.val_ds)))
    if run_cfg.trainer.limit_val_batches:
        indices = indices[: run_cfg.trainer.limit_val_batches * run_cfg.data.batch_size]
    loader = make_loader(run.val_ds, indices, int(run_cfg.data.batch_size), int(run_cfg.data.num_workers), 0, run.task.collate_fn())
    autocast, _ = autocast_factory(run_cfg.trainer.amp, device)
    metrics = run.task.evaluate(model, loader, device, autocast, channels_last)
    out = {"ckpt": str(Path(cfg.ckpt).resolve()), "epoch": run.state["epoch"], "task": run.task.name,
           "model": run_cfg.model.name, "act": run_cfg.act.name, **metrics}
    run_dir = Path(cfg.ckpt).resolve().parent.parent
    (run_dir / "eval.json").write_text(json.dumps(out, indent=2))
    log.info("eval: %s", json.dumps(out))
    print(json.dumps(out))
    return out

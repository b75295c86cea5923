"""Rebuild a run's model from its checkpoint and evaluate it on the validation set."""
from __future__ import annotations

import difflib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from dyrelu.errors import BadNameError, BadValueError, MissingPathError

from . import checkpoint as ckpt_io
from .errors import check_mandatory, one_line
from .tasks import build_task
from .tasks.base import Task

log = logging.getLogger("dyrelu.eval")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEMO_SETS = ("demo", "coco_demo")  # generated on first use when their root does not exist


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
        raise BadNameError(f"data={name} is not a data config; valid: {', '.join(valid)}")
    loaded = OmegaConf.load(path)
    cfg.data = loaded.data if path.read_text().lstrip().startswith("# @package _global_") else loaded


def upgrade_stored_config(cfg: DictConfig) -> DictConfig:
    """A checkpoint's config as today's configs would compose it. Until task=kpt's config named its
    network's builder, a keypoint run stored the model group's ``models.build_model`` and the code
    swapped in the pose builder; such a config now names ``models.build_pose_model`` itself."""
    if OmegaConf.select(cfg, "task.name") == "kpt" and OmegaConf.select(cfg, "model._target_") == "models.build_model":
        cfg.model._target_ = "models.build_pose_model"
    return cfg


def build_run(cfg: DictConfig, state: dict) -> LoadedRun:
    """The task, validation set and model (weights of ``state`` loaded, on the CPU) of a run config."""
    task = build_task(upgrade_stored_config(cfg))
    _, val_ds = task.build_datasets()
    model = task.build_model()
    model.load_state_dict(state["model"])
    return LoadedRun(cfg, task, val_ds, model, state)


def load_run(ckpt: str | Path, overrides: Sequence[str] = (),
             prepare: Optional[Callable[[DictConfig], None]] = None) -> LoadedRun:
    """The one way from a checkpoint to its run (eval.py and the scripts): the stored config,
    changed by train.py-style ``overrides`` (engine/config.py) and then by ``prepare(cfg)``,
    rebuilt with the checkpoint's weights."""
    path = Path(ckpt)
    if not path.is_file():
        raise MissingPathError(f"ckpt={ckpt} does not exist (expected <run>/checkpoints/best.pt or last.pt)")
    state = ckpt_io.load(path, ("model", "config", "epoch"),
                         "copy it again from its run, or use the run's other checkpoint (best.pt or last.pt)")
    cfg = OmegaConf.create(state["config"])
    if overrides:
        from .config import apply_overrides as apply_train_overrides

        apply_train_overrides(cfg, overrides)
    if prepare is not None:
        prepare(cfg)
    return build_run(cfg, state)


def what_was_scored(cfg: DictConfig, val_ds, indices: Sequence[int]) -> dict:
    """The model, ``act`` (and ``head_act``) and ``val_images`` of eval.py's record. A top-down
    keypoint set's samples are person boxes, several per image: counted apart, as ``val_instances``."""
    out = {"model": cfg.model.name, "act": cfg.act.name}
    if cfg.get("head_act") is not None:
        out["head_act"] = cfg.head_act.name
    records = getattr(val_ds, "records", None)
    if records is None:
        return {**out, "val_images": len(indices)}
    return {**out, "val_images": len({records[i]["image_id"] for i in indices}), "val_instances": len(indices)}


def result_path(ckpt: str | Path) -> Path:
    """Where eval.py writes the metrics of ``ckpt``: <run>/eval_<checkpoint name>.json
    (eval_best.json, eval_last.json), so evaluating another checkpoint keeps the first result."""
    path = Path(ckpt).resolve()
    return path.parent.parent / f"eval_{path.stem}.json"


USAGE = """usage: python eval.py ckpt=<run>/checkpoints/best.pt [key=value ...]

Rebuilds the model, activation and task from the config stored in the checkpoint and scores it on
the whole validation set. Each key=value changes that stored config, with the keys and the syntax
of train.py's command line:
  data.root=/path/to/imagenet        where the validation data is
  data=coco data.root=/path/to/coco  another data config (configs/data/), then its keys
  trainer.device=cpu  data.batch_size=64  data.num_workers=4
  trainer.limit_val_batches=10       score only the first 10 batches (default: all)
  +key=value                         add a key the stored config does not have
Prints the metrics as one JSON line and writes them to <run>/eval_<checkpoint>.json
(eval_best.json for best.pt, eval_last.json for last.pt)."""

# Groups a checkpoint's config may switch: the model, act and task are what was trained.
_SWAPPABLE_GROUPS = ("data",)


def parse_command_line(argv: Sequence[str]) -> tuple[str, Optional[str], dict]:
    """``(ckpt, data group or None, {dotted key: (value, add)})`` from eval.py's arguments."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    ckpt, parsed = None, []
    for arg in argv:
        if arg.startswith("ckpt="):
            ckpt = arg[len("ckpt="):]  # a path, taken as typed: sweep folders have '=' and ',' in their names
            continue
        try:
            parsed += parser.parse_overrides([arg])
        except OverrideParseException as exc:
            raise BadValueError(f"cannot parse {arg!r} ({one_line(exc)}); write key=value, quoting the value "
                                f"if it has special characters: key='value'") from None
    data, overrides = None, {}
    for o in parsed:
        key = o.key_or_group
        if o.is_sweep_override():
            raise BadValueError(f"{o.input_line}: eval.py evaluates one checkpoint; run it once per value")
        if o.is_delete():
            raise BadValueError(f"{o.input_line}: eval.py cannot delete keys (~); set them instead")
        if key.startswith("overrides."):
            bare = o.input_line.replace("overrides.", "", 1)
            raise BadNameError(f"{o.input_line}: eval.py takes the stored config's keys directly: {bare}")
        if key in _SWAPPABLE_GROUPS:
            data = o.value()
        elif key.startswith("hydra.") or key.startswith("hydra/"):
            # eval.py has no Hydra run folder; accepted (and ignored) for older command lines.
            log.warning("%s ignored: eval.py writes only <run>/eval_<checkpoint>.json", o.input_line)
        else:
            overrides[key] = (o.value(), o.is_add())
    if ckpt in (None, ""):
        raise BadValueError("ckpt is not set (???): run python eval.py ckpt=<run>/checkpoints/best.pt")
    return str(ckpt), data, overrides


def apply_overrides(cfg: DictConfig, overrides: Mapping[str, tuple]) -> None:
    """Set each dotted key of the stored config; a key it does not have is a typo unless added with +."""
    missing = object()
    for key, (value, add) in overrides.items():
        current = OmegaConf.select(cfg, key, default=missing)
        if current is missing and not add:
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if isinstance(node, DictConfig):
                close = difflib.get_close_matches(leaf, [str(k) for k in node.keys()], n=1)
                hint = f"; did you mean {(parent + '.' if parent else '') + close[0]}?" if close else ""
            else:
                hint = ""
            raise BadNameError(f"{key}={value} is not a key of the checkpoint's config{hint} "
                               f"(add a new key with +{key}=...)")
        if isinstance(current, DictConfig) and not isinstance(value, dict):
            raise BadValueError(f"{key}={value}: eval.py evaluates the checkpoint's own {key}; "
                                f"only data=<name> switches a config group")
        OmegaConf.update(cfg, key, value, force_add=True)


def evaluate_checkpoint(argv: Sequence[str]) -> dict:
    """eval.py: score a checkpoint on the whole validation set (unless trainer.limit_val_batches is
    given), print the metrics once as JSON on stdout and write them to <run>/eval_<checkpoint>.json."""
    ckpt, data, overrides = parse_command_line(argv)
    # The training run may have capped validation (trainer=smoke: 2 batches); an evaluation scores
    # everything unless this command asks otherwise.
    overrides.setdefault("trainer.limit_val_batches", (None, False))

    def prepare(cfg: DictConfig) -> None:
        if data:
            swap_data_group(cfg, data)
        apply_overrides(cfg, overrides)
        check_mandatory(cfg, f"python eval.py ckpt={ckpt}")  # e.g. data=imagenet without data.root
        root = overrides.get("data.root", (None,))[0]
        if cfg.data.name in DEMO_SETS and root is not None and not Path(str(root)).expanduser().is_dir():
            # The demo builders generate a missing set, which an evaluation must not do quietly.
            raise MissingPathError(f"data.root={root} does not exist; eval.py does not generate the "
                                   f"{cfg.data.name} set (train.py does): leave data.root out to use the cached one")

    run = load_run(ckpt, prepare=prepare)
    # The runtime pulls in timm and torchvision (seconds): only once the command is known good.
    from .loaders import make_loader
    from .runtime import autocast_factory, resolve_device, use_channels_last

    cfg, state, path = run.cfg, run.state, Path(ckpt)
    device = resolve_device(cfg.trainer.device)
    channels_last = use_channels_last(cfg.trainer, device)
    model = run.model.to(device).eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    indices = list(range(len(run.val_ds)))
    if cfg.trainer.limit_val_batches:
        indices = indices[: cfg.trainer.limit_val_batches * cfg.data.batch_size]
    loader = make_loader(run.val_ds, indices, int(cfg.data.batch_size), int(cfg.data.num_workers), 0, run.task.collate_fn())
    autocast, _ = autocast_factory(cfg.trainer.amp, device)
    if cfg.trainer.progress:
        from tqdm import tqdm

        loader = tqdm(loader, total=len(loader), desc="eval", leave=False, mininterval=1.0, dynamic_ncols=True)
    metrics = run.task.evaluate(model, loader, device, autocast, channels_last)
    out = {"ckpt": str(path.resolve()), "epoch": state["epoch"], "task": run.task.name,
           **what_was_scored(cfg, run.val_ds, indices), **metrics}
    dest = result_path(path)
    tmp = dest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(dest)
    print(json.dumps(out))
    log.info("wrote %s", dest)
    return out

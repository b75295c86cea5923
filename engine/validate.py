"""Check a composed config before anything is built: one clear line per bad value."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from dyrelu.errors import BadValueError

from .optim import OPTIMIZERS, SCHEDULES
from .runtime import COMPILE_MODES



class ConfigError(BadValueError):
    """A config value is wrong; the message names the key, the value and what is allowed."""


def _get(cfg: DictConfig, key: str):
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            raise ConfigError(f"missing config key {key!r}")
        node = node[part]
    return node


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# key, predicate, what is allowed
_RULES = [
    ("seed", _is_int, "an integer"),
    ("data.batch_size", lambda v: _is_int(v) and v > 0, "a positive integer (the global batch)"),
    ("data.num_workers", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("trainer.max_epochs", lambda v: _is_int(v) and v > 0, "a positive integer"),
    ("trainer.limit_train_batches", lambda v: v is None or (_is_int(v) and v > 0), "null or a positive integer"),
    ("trainer.limit_val_batches", lambda v: v is None or (_is_int(v) and v > 0), "null or a positive integer"),
    ("trainer.device", lambda v: v in ("auto", "cpu", "cuda"), "one of auto, cpu, cuda"),
    ("trainer.amp", lambda v: v in ("auto", "bf16", "fp16", "off", False), "one of auto, bf16, fp16, off"),
    ("trainer.channels_last", lambda v: v in ("auto", True, False), "one of auto, true, false"),
    ("trainer.deterministic", lambda v: isinstance(v, bool), "true or false"),
    ("trainer.compile", lambda v: isinstance(v, bool), "true or false"),
    ("trainer.compile_mode", lambda v: v is None or v in COMPILE_MODES, f"one of {', '.join(COMPILE_MODES)}"),
    ("trainer.ema_decay", lambda v: v is None or (_is_num(v) and 0 < v < 1), "null or a number in (0, 1)"),
    ("trainer.grad_clip", lambda v: v is None or (_is_num(v) and v > 0), "null or a positive number"),
    ("trainer.dyrelu_warmup_epochs", lambda v: v is None or (_is_num(v) and v >= 0), "a number >= 0 (0: no ramp)"),
    ("trainer.log_every", lambda v: _is_int(v) and v > 0, "a positive integer"),
    ("trainer.save_every", lambda v: v is None or (_is_int(v) and v > 0), "null or a positive integer (steps)"),
    ("trainer.threads", lambda v: v is None or (_is_int(v) and v > 0), "null (auto) or a positive integer"),
    ("trainer.val_every", lambda v: _is_int(v) and v > 0, "a positive integer"),
    ("trainer.precise_bn_batches", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: off)"),
    ("optim.name", lambda v: v in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}"),
    ("optim.lr", lambda v: _is_num(v) and v > 0, "a positive number"),
    ("optim.weight_decay", lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    ("optim.momentum", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("optim.hyper_lr_scale", lambda v: _is_num(v) and v > 0, "a positive number"),
    ("optim.spatial_lr_scale", lambda v: v is None or (_is_num(v) and v > 0), "null or a positive number"),
    ("optim.hyper_weight_decay", lambda v: v is None or (_is_num(v) and v >= 0), "null or a number >= 0"),
    ("sched.name", lambda v: v in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
    ("sched.warmup_epochs", lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    ("aug.label_smoothing", lambda v: _is_num(v) and 0 <= v < 1, "a number in [0, 1)"),
    ("aug.mixup_alpha", lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    ("aug.cutmix_alpha", lambda v: _is_num(v) and v >= 0, "a number >= 0"),
    ("aug.color_jitter", lambda v: _is_num(v) and v >= 0, "a number >= 0"),
]


def validate(cfg: DictConfig) -> None:
    for key, ok, allowed in _RULES:
        value = _get(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}={value!r} is not valid: expected {allowed}")
    _check_tau_schedule(cfg)
    from models import list_models
    import dyrelu

    name = cfg.model.name
    valid_models = list_models()
    if name not in valid_models:
        raise ConfigError(f"model.name={name!r} is not a known model; valid: {', '.join(valid_models)}")
    if OmegaConf.select(cfg, "task.name") == "kpt":
        from models import POSE_BACKBONES

        if name not in POSE_BACKBONES:
            raise ConfigError(f"model.name={name!r} is not a pose backbone (task=kpt); valid: {', '.join(POSE_BACKBONES)}")
    for key in ("act", "head_act"):
        if key in cfg and cfg[key] is not None:
            if cfg[key].name not in dyrelu.ACT_NAMES:
                raise ConfigError(f"{key}.name={cfg[key].name!r} is not a known activation; valid: {', '.join(dyrelu.ACT_NAMES)}")
            _check_act_values(key, cfg[key])
    import dyrelu.fused

    dyrelu.fused.forced_backend()  # the environment's kernel override, before anything is built


def _check_tau_schedule(cfg: DictConfig) -> None:
    """A schedule start that contradicts act.tau or head_act.tau is a mistake, not a silent override
    (an unset start is each part's own tau: engine/loop.py tau_at)."""
    schedule = OmegaConf.select(cfg, "trainer.tau_schedule")
    start = None if schedule is None else schedule.get("start")
    for key in ("act", "head_act"):
        own = cfg[key].get("tau") if cfg.get(key) is not None else None
        if start is not None and own is not None and float(start) != float(own):
            raise ConfigError(f"trainer.tau_schedule.start={start} contradicts {key}.tau={own}: set one of them "
                              f"(an unset start is act.tau for the backbone, head_act.tau for the pose head)")


def _check_act_values(key: str, node: DictConfig) -> None:
    """act.* values: a number where the library's default is a number, then the library's own range
    checks on a small dry build, reported under the config key (``act.k=0 must be >= 1``)."""
    import inspect
    import typing

    import dyrelu

    values = {str(k): v for k, v in OmegaConf.to_container(node, resolve=True).items() if k != "name"}
    if dyrelu.is_dynamic(node.name):
        hints = typing.get_type_hints(dyrelu.DyReLU.__init__)  # the module's annotations are strings
        for name, param in inspect.signature(dyrelu.DyReLU.__init__).parameters.items():
            default, value = param.default, values.get(name)
            integer = _is_int(default) or hints.get(name) in (int, typing.Optional[int])
            if name not in values or value is None or not (_is_num(default) or integer):
                continue
            if not _is_num(value) or (integer and not _is_int(value)):
                want = "an integer" if integer else "a number"
                raise ConfigError(f"{key}.{name}={value!r} is not valid: expected {want}")
    try:
        dyrelu.build_act(node.name, 8, **values)
    except BadValueError as err:
        msg = str(err)
        first = msg.split("=", 1)[0]
        raise ConfigError(f"{key}.{msg}" if first in values else f"{key} ({node.name}): {msg}") from None

"""One way to build a config: Hydra's compose API over ``configs/``, exactly as ``train.py`` composes it.

Scripts take the same ``key=value`` overrides as ``train.py`` (``model=mbv2_100 act=dyrelu_b act.k=3
data=coco data.root=...``) and fail with the same message for an unknown key or group, because
both go through Hydra's own override parser and config loader.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from omegaconf import DictConfig, OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


class OverrideError(ValueError):
    """A bad override: Hydra's own message (the text ``train.py`` prints for the same override)."""


def _message(exc: BaseException) -> str:
    # Hydra's entry point prints the exception and, below it, the OmegaConf error that caused it
    # ("Key 'bogus' is not in struct"); keep both so a script says what train.py says.
    lines = [str(exc).strip()]
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause).strip() and str(cause).strip() not in lines[0]:
        lines.append(str(cause).strip())
    return "\n".join(lines)


def compose(overrides: Iterable[str] = (), config_name: str = "train") -> DictConfig:
    """The config ``python train.py <overrides>`` would run with (``hydra.*`` left out)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=list(overrides))
    except HydraException as e:
        raise OverrideError(_message(e)) from None
    finally:
        GlobalHydra.instance().clear()


def config_groups() -> list[str]:
    return sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())


def apply_overrides(cfg: DictConfig, overrides: Iterable[str]) -> DictConfig:
    """Apply ``train.py``-style overrides to a stored config (a checkpoint's), in place.

    A group override (``data=coco``, ``act@head_act=relu``) replaces that node by the group's
    config as composed for the run's task; ``key=value`` overrides then go through Hydra's own
    loader with the config in struct mode, so an unknown key fails as it does for ``train.py``
    (``+key=value`` adds one).
    """
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides = list(overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides=overrides)
    except HydraException as e:
        raise OverrideError(_message(e)) from None
    groups = set(config_groups())
    group_ovr = [o for o in parsed if o.key_or_group in groups and not o.is_delete() and not o.is_add()]
    if group_ovr:
        task = OmegaConf.select(cfg, "task.name", default=None)
        composed = compose(([f"task={task}"] if task else []) + [o.input_line for o in group_ovr])
        for o in group_ovr:
            key = o.package or o.key_or_group
            # resolved here: a group's ${recipe.*} values (configs/recipe/) belong to this compose; a
            # stored config may have no recipe node, or another one, to resolve them against
            cfg[key] = OmegaConf.to_container(composed[key], resolve=True)
    rest = [o for o in parsed if o not in group_ovr]
    OmegaConf.set_struct(cfg, True)
    try:
        ConfigLoaderImpl._apply_overrides_to_config(rest, cfg)
    except HydraException as e:
        raise OverrideError(_message(e)) from None
    finally:
        OmegaConf.set_struct(cfg, False)
    return cfg

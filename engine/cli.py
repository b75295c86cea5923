"""What the command line may say: Hydra's own errors as one line, and ``+key`` checked like ``key``.

* :func:`cli` runs a ``hydra.main`` function. Hydra's errors about the command line (an unknown
  group option such as ``act=dyrelu_d``, an unknown key, an override it cannot parse) become one
  line naming the bad value, the valid choices and the closest one, with exit code 2; then a
  finished sweep sets the exit code (engine/sweep.py).
* :func:`check_added_keys`: Hydra lets ``+key=value`` add any key. An added key that nothing reads
  would be silently ignored (``+act.tau=100`` on DY-ReLU-B, which has no temperature), so a key
  may be added only to a node that builds something (``_target_``) whose builder takes it as an
  argument (e.g. ``+model.in_chans=1``).
"""
from __future__ import annotations

import difflib
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from dyrelu.errors import USER_ERROR_EXIT_CODE, BadNameError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
_MAX_LISTED = 12  # longer lists of choices are cut, with the folder to look in


def _did_you_mean(word: str, choices: Iterable[str], prefix: str = "") -> str:
    """`` (did you mean <prefix><closest>?)``, or nothing when no choice is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def _listing(choices: Sequence[str], where: str) -> str:
    if len(choices) <= _MAX_LISTED:
        return ", ".join(choices)
    return ", ".join(choices[:_MAX_LISTED]) + f", ... ({len(choices)} in {where})"


def group_options(group: str) -> list[str]:
    """The options of config group ``group`` (nested ones as ``table2/relu``)."""
    folder = CONFIG_DIR / group
    return sorted(str(p.relative_to(folder).with_suffix("")) for p in folder.rglob("*.yaml"))


def _owners_hint(parent: str, node: Any, leaf: str) -> str:
    """`` (tau belongs to act=dyrelu_c)`` when ``leaf`` is a key of other options of the group
    ``parent`` was picked from (``act.tau`` under DY-ReLU-B): the key is right, the option is not."""
    group = "act" if parent == "head_act" else parent  # act@head_act picks from configs/act/
    if not parent or not (CONFIG_DIR / group).is_dir() or not isinstance(node, DictConfig) or "name" not in node:
        return ""
    owners = [o for o in group_options(group) if o != node.name
              and leaf in (OmegaConf.load(CONFIG_DIR / group / f"{o}.yaml") or {})]
    if not owners:
        return ""
    pick = "act@head_act" if parent == "head_act" else group
    return f" ({leaf} belongs to {', '.join(f'{pick}={o}' for o in owners[:4])}{', ...' if len(owners) > 4 else ''})"


def _command_overrides(argv: Sequence[str]) -> list[str]:
    return [a for a in argv if "=" in a and not a.startswith("-")]


def _missing_option_line(exc, argv: Sequence[str]) -> str:
    """``act=dyrelu_d`` -> one line with the group's options and the closest one."""
    missing = str(exc.missing_cfg_file or "")
    if exc.options:  # Hydra's own list, for the group the option was looked up in (hydra/launcher too)
        group, _, option = missing.rpartition("/")
    else:  # a nested option (experiment=table2/relu): Hydra lists none
        group, _, option = missing.partition("/")
    typed = f"{group}={option}"
    for arg in _command_overrides(argv):
        key, _, value = arg.lstrip("+~").partition("=")
        if key.split("@")[0] == group and option in value.split(","):
            typed = f"{key}={option}"
            break
    options = sorted(exc.options) if exc.options else group_options(group) if (CONFIG_DIR / group).is_dir() else []
    if not options:
        return f"{typed}: no config {missing}.yaml"
    hint = _did_you_mean(option, options, prefix=typed.split("=")[0] + "=")
    sub = option.rpartition("/")[0]
    if sub and any(o.startswith(sub + "/") for o in options):  # experiment=table2/...: that table's entries
        options = [o for o in options if o.startswith(sub + "/")]
    return f"{typed}: no such {group} config{hint}; valid: {_listing(options, f'configs/{group}/')}"


def _unknown_key_line(message: str, argv: Sequence[str], list_keys: bool) -> Optional[str]:
    """``Could not override 'optim.learning_rate'`` -> one line with the node's keys (those of the
    config train.py composes for the other overrides; ``list_keys=False``: a stored config's key,
    whose node is not composed here)."""
    m = re.match(r"Could not override '([^']+)'\.", message)
    if not m or "@" in m.group(1):
        return None
    key = m.group(1)
    typed = next((a for a in _command_overrides(argv) if a.split("=", 1)[0] == key), key)
    parent, _, leaf = key.rpartition(".")
    if not list_keys:
        return f"{typed}: {parent or 'the config'} has no key {leaf} (add a new key with +{key}=...)"
    from .config import OverrideError, compose

    others = [a for a in _command_overrides(argv) if a != typed]
    try:
        cfg = compose(others)
    except OverrideError:
        cfg = compose([])
    node = OmegaConf.select(cfg, parent) if parent else cfg
    if not isinstance(node, DictConfig):
        return f"{typed}: {parent or 'the config'} has no key {leaf}"
    keys = [str(k) for k in node.keys()]
    hint = _owners_hint(parent, node, leaf) or _did_you_mean(leaf, keys, prefix=f"{parent}." if parent else "")
    return f"{typed}: {parent or 'the config'} has no key {leaf}{hint}; valid keys: {_listing(keys, parent or 'the config')}"


def hydra_error_line(exc: BaseException, argv: Sequence[str], list_keys: bool = True) -> Optional[str]:
    """The one line to print for a Hydra error about the command line; None for anything else."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException

    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        return _missing_option_line(exc, argv)
    if isinstance(exc, OverrideParseException):
        return f"cannot parse the command line: {str(exc).splitlines()[0]} (write key=value; quote special characters)"
    if isinstance(exc, ConfigCompositionException):
        text = str(exc).strip()
        m = re.search(r"An item is already at '([^']+)'", text)
        if m:
            return f"+{m.group(1)}: {m.group(1)} is already in the config; set it without the +: {m.group(1)}=..."
        line = _unknown_key_line(text, argv, list_keys)
        return line or " ".join(part.strip() for part in text.splitlines() if part.strip())
    return None


def _remove_unstarted_sweep() -> None:
    """A multirun whose first job's config failed to compose leaves only Hydra's multirun.yaml."""
    from .errors import remove_if_untouched
    from .sweep import SweepSummary

    folder = SweepSummary.sweep_dir
    if folder is not None and folder.is_dir() and [p.name for p in folder.iterdir()] == ["multirun.yaml"]:
        (folder / "multirun.yaml").unlink()
        remove_if_untouched(folder)


def cli(main: Callable[[], Any], argv: Optional[Sequence[str]] = None) -> int:
    """Run a ``hydra.main`` function from ``__main__`` and return the process's exit code."""
    from .sweep import finish_sweep

    argv = list(sys.argv[1:] if argv is None else argv)
    # Hydra prints its own errors over several lines and exits 1 unless it is asked to raise them.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:
        line = hydra_error_line(exc, argv)
        if line is None:
            raise
        _remove_unstarted_sweep()
        print(f"error: {line}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    return finish_sweep(code)


# ---------------------------------------------------------------------------------------------
# +key=value
# ---------------------------------------------------------------------------------------------
def _params(fn: Callable) -> tuple[set, bool]:
    """(named keyword parameters, whether it takes **kwargs) of a callable or a class."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return set(), True
    named = {n for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def _returned_class(fn: Callable) -> Optional[type]:
    """The class a builder's return annotation names (``-> MobileNetV2``), where its **kwargs go."""
    ann = inspect.signature(fn).return_annotation
    if isinstance(ann, str):
        ann = getattr(fn, "__globals__", {}).get(ann)
    return ann if isinstance(ann, type) else None


def accepted_arguments(node: DictConfig) -> Optional[set]:
    """The arguments the builder of a ``_target_`` node takes (None: it takes any). A builder taking
    ``**kwargs`` is followed to the network it dispatches to (``models.build_model`` and
    ``models.build_pose_model`` pass them to the registered builder ``node.name``) and to the class
    that builder returns."""
    from hydra.utils import get_method

    from models import list_models, model_builder

    fn = get_method(str(node._target_))
    named, var = _params(fn)
    if var and "name" in node and node.name in list_models():
        fn = model_builder(node.name)
        more, var = _params(fn)
        named |= more
    if var:
        cls = _returned_class(fn)
        if cls is not None:
            more, var = _params(cls)
            named |= more
    return None if var else named


def check_added_keys(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Reject a ``+key=value`` / ``++key=value`` that adds a key nothing reads (see the module doc)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .config import compose, config_groups

    groups = set(config_groups())
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    added = [o for o in parsed if (o.is_add() or o.is_force_add()) and o.key_or_group not in groups
             and o.key_or_group.split("/")[0] not in groups and not o.key_or_group.startswith("hydra")]
    if not added:
        return
    base = None
    if any(o.is_force_add() for o in added):  # ++ may set an existing key: compare with the config without them
        base = compose([o.input_line for o in parsed if o not in added])
    for o in added:
        key = o.key_or_group
        if o.is_force_add() and OmegaConf.select(base, key, default=None) is not None:
            continue
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        if isinstance(node, DictConfig) and "_target_" in node:
            accepted = accepted_arguments(node)
            if accepted is None or leaf in accepted:
                continue
            valid = sorted(accepted - {"act", "num_classes", "head_act", "name"})
            what = f"{parent} ({node.name})" if "name" in node else parent
            raise BadNameError(f"{o.input_line}: {what} takes no argument {leaf}{_did_you_mean(leaf, valid, f'+{parent}.')}; "
                               f"valid: {', '.join(valid)}")
        keys = [str(k) for k in node.keys() if str(k) != leaf] if isinstance(node, DictConfig) else []
        what = (f"{parent} ({node.name})" if isinstance(node, DictConfig) and "name" in node else parent) or "the config"
        hint = _owners_hint(parent, node, leaf) or _did_you_mean(leaf, keys, f"{parent}." if parent else "")
        raise BadNameError(f"{o.input_line}: {what} has no key {leaf}, so nothing would read it{hint}; "
                           f"valid keys: {', '.join(keys)}")

"""Swap the activations of an existing model (torchvision, timm, your own) for DY-ReLU or any registry act.

    model = timm.create_model("mobilenetv3_large_100", pretrained=False)
    report = dyrelu.convert(model, "dyrelu_b", input_size=(1, 3, 224, 224), verbose=True)  # prints the report
    report.replaced          # [Replacement(path='bn1.act', old_type='Hardswish', channels=16), ...]

How: one dummy forward (eval mode, no grad, training flags restored afterwards) with a forward
pre-hook on every activation module of the target ``types`` records the channel count (dim 1) each
one sees; then each is replaced, at every attribute that references it, by ``act`` sized to that
count. Activations nested in other modules are found too (timm's BatchNormAct2d keeps its
activation in ``.act``). Functional activations (F.relu, x.relu_()) are not modules and stay.

Shared modules: torchvision calls one nn.ReLU several times (ResNet's BasicBlock uses ``self.relu``
twice at the same width; the Bottleneck uses it at two widths). Per call site modules cannot be
made without rewriting ``forward``, so with ``shared="channels"`` (default) a module seen at one
width becomes one new activation shared by its call sites (as the ReLU was), and a module seen at
several widths becomes a ``ByChannels`` module holding one activation per width. ``shared="error"``
raises instead whenever a module is called more than once, for when per-site weights are required.
Modules never called in the dummy forward are left as they are and listed in
``model.dyrelu_skipped``.
"""
from __future__ import annotations

import fnmatch
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, List, NamedTuple, Sequence, Union

import torch
from torch import nn

from .registry import ActSpec, act_expansion, build_act, parse_spec

log = logging.getLogger(__name__)

#: what convert() replaces by default
DEFAULT_TYPES: tuple = (nn.ReLU, nn.ReLU6, nn.Hardswish)
#: class names of squeeze-and-excitation blocks that ``remove_se=True`` replaces by nn.Identity
SE_CLASS_NAMES: tuple = ("SqueezeExcite", "SEModule", "SqueezeExcitation", "EffectiveSEModule")

__all__ = ["ByChannels", "ConvertReport", "DEFAULT_TYPES", "Replacement", "SE_CLASS_NAMES", "convert"]


class Replacement(NamedTuple):
    """One replaced activation: module path (first one, if referenced from several), old class name, channels."""

    path: str
    old_type: str
    channels: int


@dataclass
class ConvertReport:
    """What :func:`convert` did to ``model`` (converted in place). ``str(report)`` is the summary
    and one line per replaced activation; iterating yields the ``Replacement`` entries."""

    model: nn.Module
    act: str
    replaced: List[Replacement] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)      # target modules the dummy forward never called
    shared: List[str] = field(default_factory=list)       # modules called at several sites (one replacement each)
    removed_se: List[str] = field(default_factory=list)   # SE blocks replaced by nn.Identity (remove_se=True)

    def __iter__(self):
        return iter(self.replaced)

    def __len__(self) -> int:
        return len(self.replaced)

    def summary(self) -> str:
        counts = Counter(r.old_type for r in self.replaced)
        parts = [f"replaced {len(self.replaced)} activations ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items())) or 'none'}) "
                 f"by {self.act}"]
        if self.removed_se:
            parts.append(f"removed {len(self.removed_se)} squeeze-and-excitation blocks")
        if self.shared:
            parts.append(f"{len(self.shared)} modules called at several sites share their replacement")
        if self.skipped:
            parts.append(f"skipped {len(self.skipped)} never called ({', '.join(self.skipped)})")
        return "; ".join(parts)

    def __str__(self) -> str:
        lines = [f"dyrelu.convert: {self.summary()}"]
        lines += [f"  {r.path}: {r.old_type}({r.channels}) -> {self.act}" for r in self.replaced]
        return "\n".join(lines)


class ByChannels(nn.Module):
    """One activation per input width, for an activation module a model calls at several widths."""

    def __init__(self, acts: dict):
        super().__init__()
        self.acts = nn.ModuleDict({str(int(c)): m for c, m in sorted(acts.items())})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.shape[1])
        if key not in self.acts:
            raise ValueError(f"ByChannels has activations for {list(self.acts)} channels, got input {tuple(x.shape)}")
        return self.acts[key](x)


def _factory(act: Union[ActSpec, Callable[[int], nn.Module]], overrides: dict) -> tuple:
    if callable(act) and not isinstance(act, (str, Mapping)):
        if overrides:
            raise ValueError(f"convert: overrides {sorted(overrides)} need act to be a registry spec, not a callable")
        return act, getattr(act, "__name__", type(act).__name__)
    name, spec_over = parse_spec(act)
    if act_expansion(act) != 1:
        raise ValueError(f"convert: {name!r} changes the channel count (act_expansion > 1); it cannot replace an activation in place")
    merged = {**spec_over, **overrides}
    build_act(name, 8, **merged)  # validate the overrides before the dummy forward
    return (lambda channels: build_act(name, channels, **merged)), name


def _excluded(path: str, module: nn.Module, exclude: Any) -> bool:
    if exclude is None:
        return False
    if callable(exclude):
        return bool(exclude(path, module))
    patterns = [exclude] if isinstance(exclude, str) else list(exclude)
    return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attr, new)


def _reference_tensor(model: nn.Module) -> tuple:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.float32


def _run(model: nn.Module, example: Any) -> None:
    if isinstance(example, Mapping):
        model(**example)
    elif isinstance(example, (tuple, list)):
        model(*example)
    else:
        model(example)


def convert(
    model: nn.Module,
    act: Union[ActSpec, Callable[[int], nn.Module]] = "dyrelu_b",
    *,
    input_size: Sequence[int] = (1, 3, 224, 224),
    example_input: Any = None,
    types: Iterable[type] = DEFAULT_TYPES,
    exclude: Any = None,
    remove_se: bool = False,
    shared: str = "channels",
    verbose: bool = False,
    **overrides: Any,
) -> ConvertReport:
    """Replace every activation of ``types`` in ``model`` (in place) by ``act`` sized to its input width.

    act:           registry spec (name or mapping, see ``dyrelu.build_act``) or a callable channels -> module.
    overrides:     keyword overrides for the spec, validated like ``build_act`` (e.g. k=3, reduction=4).
    input_size:    shape of the random dummy input (ignored when ``example_input`` is given).
    example_input: a tensor, a tuple of positional args or a dict of keyword args for ``model``.
    types:         module classes to replace (default nn.ReLU, nn.ReLU6, nn.Hardswish; add nn.SiLU
                   for EfficientNet). Subclasses count.
    exclude:       fnmatch pattern(s) on the module path, or a callable (path, module) -> bool.
    remove_se:     first replace squeeze-and-excitation blocks (timm/torchvision, ``SE_CLASS_NAMES``)
                   by nn.Identity, as the paper does for MobileNetV3.
    shared:        "channels" (default) or "error", see the module docstring.
    verbose:       print the report (summary and one line per replaced activation).

    Converts ``model`` in place and returns a :class:`ConvertReport` (``.model``, ``.replaced``:
    the ``Replacement(path, old_type, channels)`` list, ``.skipped``, ``.shared``, ``.removed_se``).
    The lists are also attached to the model (``model.dyrelu_converted``, ``.dyrelu_skipped``,
    ``.dyrelu_removed_se``), and the summary is logged at INFO level.
    """
    if shared not in ("channels", "error"):
        raise ValueError(f"shared={shared!r} must be 'channels' or 'error'")
    types = tuple(types)
    factory, act_label = _factory(act, overrides)

    removed_se = []
    if remove_se:
        for path, mod in list(model.named_modules(remove_duplicate=False)):
            if path and type(mod).__name__ in SE_CLASS_NAMES and not _excluded(path, mod, exclude):
                _set(model, path, nn.Identity())
                removed_se.append(path)
        if removed_se:
            log.info("convert: removed %d squeeze-and-excitation blocks", len(removed_se))

    # every path of every target module (a module object may be registered at several attributes)
    paths: dict = {}
    modules: dict = {}
    for path, mod in model.named_modules(remove_duplicate=False):
        if isinstance(mod, types) and not _excluded(path, mod, exclude):
            if not path:
                raise ValueError("convert: the model itself is an activation; build the replacement with dyrelu.build_act")
            paths.setdefault(id(mod), []).append(path)
            modules[id(mod)] = mod

    seen: dict = {key: [] for key in modules}

    def make_hook(key: int) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.dim() >= 2:
                seen[key].append(int(x.shape[1]))

        return hook

    device, dtype = _reference_tensor(model)
    if example_input is None:
        gen = torch.Generator().manual_seed(0)  # leave the global RNG alone
        example_input = torch.randn(tuple(input_size), generator=gen).to(device=device, dtype=dtype)

    handles = [mod.register_forward_pre_hook(make_hook(key)) for key, mod in modules.items()]
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            _run(model, example_input)
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.training = flag

    report, skipped, shared_sites = [], [], []
    for key, mod in modules.items():
        where, widths = paths[key], seen[key]
        old = type(mod).__name__
        if not widths:
            skipped.append(where[0])
            log.warning("convert: %s (%s) was not called in the dummy forward; left unchanged", where[0], old)
            continue
        if shared == "error" and (len(widths) > 1 or len(where) > 1):
            raise ValueError(
                f"convert(shared='error'): {old} at {where} is called {len(widths)} times with channels {widths}; "
                "its replacement would be shared by those call sites (use shared='channels' to accept that)"
            )
        counts = Counter(widths)
        if len(counts) == 1:
            new = factory(widths[0])
        else:
            new = ByChannels({c: factory(c) for c in counts})
        new = new.to(device=device, dtype=dtype).train(mod.training)
        for p in where:
            _set(model, p, new)
        if len(widths) > 1 or len(where) > 1:
            shared_sites.append(where[0])
            log.debug("convert: %s (%s) has %d call sites, channels %s, paths %s", where[0], old, len(widths), dict(counts), where)
        for c in sorted(counts):
            report.append(Replacement(where[0], old, c))
            log.debug("convert: %s %s(%d) -> %s", where[0], old, c, act_label)

    if shared_sites:
        log.warning(
            "convert: %d activation modules are called at several sites (e.g. %s); each of their input widths "
            "gets one %s shared by those sites, as the original module was",
            len(shared_sites), ", ".join(shared_sites[:3]) + (", ..." if len(shared_sites) > 3 else ""), act_label,
        )
    result = ConvertReport(model, act_label, report, skipped, shared_sites, removed_se)
    log.info("convert: %s", result.summary())
    model.dyrelu_converted = report
    model.dyrelu_skipped = skipped
    if remove_se:
        model.dyrelu_removed_se = removed_se
    if verbose:
        print(result)
    return result

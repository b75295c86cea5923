"""What the model files share: the registry of networks by name and the activation builder.

``register_model`` adds a network's entry point, ``build_model`` builds one by name, ``ActBuilder``
places the activation spec at each site of a network (the model files' placement rules call it),
``set_fuse_bn_act`` switches the fused BN + DY-ReLU. The model files import from here, never from
the package, so ``models/__init__.py`` only imports the files (which registers them) and re-exports.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable, Dict, List, Optional

from torch import nn

import dyrelu
from dyrelu.errors import BadNameError, BadValueError

__all__ = ["register_model", "build_model", "list_models", "ActBuilder", "HYPER_SIZINGS", "set_fuse_bn_act"]

_MODELS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Optional[Callable] = None, *, name: Optional[str] = None):
    """Decorator: ``@register_model`` or ``@register_model(name="...")`` adds an entry point."""

    def deco(f: Callable) -> Callable:
        key = name or f.__name__
        if key in _MODELS and _MODELS[key] is not f:
            raise ValueError(f"model {key!r} is registered twice")
        _MODELS[key] = f
        return f

    return deco(fn) if fn is not None else deco


def model_builder(name: str) -> Callable[..., nn.Module]:
    """The registered builder of network ``name``."""
    if name not in _MODELS:
        raise BadNameError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return _MODELS[name]


def list_models() -> List[str]:
    """Registered model names, sorted."""
    return sorted(_MODELS)


def build_model(name: str, act: Any = "relu", num_classes: int = 1000, **kwargs) -> nn.Module:
    """Build a registered network with activation spec ``act`` (random init, no downloads)."""
    if name not in _MODELS:
        raise BadNameError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return _MODELS[name](act=act, num_classes=num_classes, **kwargs)


# ---- activation placement helper, shared by the model files ---------------------------------

#: How the hidden width of DY-ReLU's (and SE+ReLU's) first FC is chosen (``hyper_sizing`` model kwarg).
#: "conv_in" (default, fits the paper's parameter counts best; README.md (Model zoo) §Parameters):
#:     hidden = max(hyper_min, C_in // R), C_in = input channels of the conv that feeds the activation.
#: "act": hidden = max(hyper_min, C // R), C = the activation's own channels (public unofficial code).
#: "registry": pass nothing; whatever ``dyrelu.make_act`` does by default (C // R).
HYPER_SIZINGS = ("conv_in", "act", "registry")
DEFAULT_HYPER_MIN = 8


def _spec_get(spec: Any, key: str, default: Any = None) -> Any:
    if isinstance(spec, Mapping):
        return spec.get(key, default)
    return default


def _dyrelu_default(key: str) -> Any:
    return inspect.signature(dyrelu.DyReLU.__init__).parameters[key].default


#: static activations with a hyper function of their own (SE): sized by the same rule as DY-ReLU,
#: passed through the spec (``make_act``'s extra kwargs only reach dynamic activations)
_SIZED_STATIC = {"se_relu": dyrelu.SEReLU}


class ActBuilder:
    """Builds the activation of one network at each site, following that network's placement rules.

    ``act(channels, conv_in=...)``: the activation after a conv whose input had ``conv_in``
    channels (used to size DY-ReLU's hyper function with ``hyper_sizing="conv_in"``).
    ``act(channels, conv_in=..., k1=True)``: the K=1 DY-ReLU the paper adds after the projection
    conv of a mobile block (a = 1 + da, b = 0 + db); only meaningful for a dynamic spec.
    ``expansion``: how many times the conv before an activation multiplies its outputs (Maxout K).
    """

    def __init__(self, spec: Any, hyper_sizing: str = "conv_in", hyper_min: int = DEFAULT_HYPER_MIN):
        if hyper_sizing not in HYPER_SIZINGS:
            raise ValueError(f"hyper_sizing={hyper_sizing!r} is not one of {HYPER_SIZINGS}")
        self.spec = spec
        self.name = dyrelu.act_name(spec)
        self.dynamic = bool(dyrelu.is_dynamic(spec))
        self.sized = self.dynamic or self.name in _SIZED_STATIC
        self.expansion = int(dyrelu.act_expansion(spec))
        self.hyper_sizing = hyper_sizing
        self.hyper_min = int(hyper_min)

    def hidden(self, channels: int, conv_in: Optional[int]) -> Optional[int]:
        """Hidden width of the hyper function at a site, or None to leave the registry's default."""
        if not self.sized or self.hyper_sizing == "registry" or _spec_get(self.spec, "hidden") is not None:
            return None
        cls = _SIZED_STATIC.get(self.name, dyrelu.DyReLU)
        default = inspect.signature(cls.__init__).parameters["reduction"].default
        reduction = int(_spec_get(self.spec, "reduction", default))
        if reduction < 1:
            raise BadValueError(f"act.reduction={reduction} must be >= 1 (the hyper function's FC1 is C / reduction wide)")
        base = channels if (self.hyper_sizing == "act" or conv_in is None) else int(conv_in)
        return max(self.hyper_min, base // reduction)

    def __call__(self, channels: int, conv_in: Optional[int] = None, k1: bool = False, **extra) -> nn.Module:
        if self.dynamic:
            hidden = self.hidden(channels, conv_in)
            if hidden is not None:
                extra.setdefault("hidden", hidden)
            if k1:
                extra.update(k=1, init_a=(1.0,), init_b=(0.0,), dynamic_segments=None)
        elif k1:
            raise ValueError("k1=True (the K=1 activation after a projection conv) needs a dynamic activation")
        elif self.sized:  # SE+ReLU: same hidden-width rule, through the spec
            hidden = self.hidden(channels, conv_in)
            if hidden is not None:
                spec = dict(self.spec) if isinstance(self.spec, Mapping) else {"name": self.spec}
                spec["hidden"] = hidden
                return dyrelu.make_act(spec, channels, **extra)
        return dyrelu.make_act(self.spec, channels, **extra)

    def static(self, spec: Any, channels: int) -> nn.Module:
        """A static activation (e.g. the ReLU kept at positions not selected for the dynamic act)."""
        return dyrelu.make_act(spec, channels)


def set_fuse_bn_act(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn the fused BatchNorm + DY-ReLU on or off in every block of ``model`` that offers it
    (``model.fuse_bn_act`` in the configs). Values, gradients and state_dict keys do not change."""
    for m in model.modules():
        if hasattr(type(m), "fuse_bn_act"):
            m.fuse_bn_act = bool(enabled)
    return model

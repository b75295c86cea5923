"""One registry of every activation the paper compares (Tables 1, 2, 5), built by name.

    build_act("dyrelu_b", 64, k=3)                 # -> DyReLU(64, variant="B", k=3)
    make_act({"name": "leaky_relu", "negative_slope": 0.1}, 64)
    make_act(cfg.act, 64, k=1, init_a=(1.0,), init_b=(0.0,))   # MobileNetV2's A3 site

A *spec* is a name (str) or any Mapping with a "name" key plus overrides (a plain dict or an
omegaconf DictConfig; omegaconf is not imported here). Names are case-insensitive and "-" == "_".

Static activations take only their own keyword arguments (see ``act_params``); an override an
activation does not take is a ValueError naming the key and the activation, never silently dropped.
``make_act``'s ``extra`` kwargs are different: they are DyReLU overrides that a model builder attaches
to one *site* (e.g. k=1, init_a=(1.0,), init_b=(0.0,) after MobileNetV2's projection conv), so they
are applied to dynamic activations (dyrelu_a/b/c) only and ignored by static ones; they must still be
DyReLU keyword names.

    name          module                                        own kwargs (default)
    relu          nn.ReLU                                       inplace (False)
    relu6         nn.ReLU6                                      inplace (False)
    leaky_relu    nn.LeakyReLU                                  negative_slope (0.01), inplace (False)
    prelu         nn.PReLU(channels): one slope per channel     init (0.25)
    prelu_shared  nn.PReLU(1): one slope for the layer          init (0.25)
    rrelu         nn.RReLU                                      lower (1/8), upper (1/3), inplace (False)
    hswish        nn.Hardswish                                  inplace (False)
    se_relu       SEReLU: SE gate (sigmoid) then ReLU           reduction (8), hidden (None -> C // 8)
    dyrelu_a/b/c  DyReLU(channels, variant="A"/"B"/"C")         k, reduction, lambda_a, lambda_b, init_a,
                                                                init_b, use_bias, dynamic_segments, tau,
                                                                impl, hidden, hyper_init, spatial_norm
    dyrelu_*_static  StaticDyReLU(channels, variant=...): the    the same as dyrelu_a/b/c
                  same Eq. 3 with learned constants in place
                  of the hyper function (static.py)
    maxout        Maxout(k): (N, k*C, ...) -> (N, C, ...)       k (2)

se_relu's squeeze width: C // 8 (at least 1), the same hidden width as DY-ReLU at R = 8, so the SE and
DY-ReLU hyper functions differ only in FC2's width (C vs 2KC). This is what reproduces Table 5's
parameter deltas: SE adds 0.4 M (x0.35) and 1.6 M (x1.0), exactly 0.4x DY-ReLU-B's 1.0 M and 4.0 M,
and (C^2/8 + C^2/8) / (C^2/8 + 4 C^2/8) = 0.4 at K = 2. (timm's MobileNetV3 SE uses C/4 rounded to a
multiple of 8 with a hard sigmoid gate; that is MobileNetV3's SE, not the SE+ReLU row of Table 5.)
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .core import DyReLU
from .errors import BadNameError, BadValueError
from .static import StaticDyReLU

ActSpec = Union[str, Mapping]

__all__ = [
    "ACT_NAMES",
    "ActSpec",
    "DYRELU_KEYS",
    "Maxout",
    "SEReLU",
    "act_expansion",
    "act_name",
    "act_params",
    "build_act",
    "is_dynamic",
    "list_acts",
    "make_act",
    "parse_spec",
]


# ---- activation modules the registry needs beyond torch.nn ---------------------------------------
class Maxout(nn.Module):
    """Maxout (Goodfellow et al. 2013) over k groups of channels: (N, k*C, ...) -> (N, C, ...).

    Group layout: k contiguous blocks of C channels, y[:, c] = max_j x[:, j*C + c]. This is
    what the concatenated outputs of k separate C-channel convolutions look like, i.e. the conv
    before a Maxout(k) has k*C output channels (``act_expansion`` returns k). Works for any input
    rank >= 2 and keeps the input's memory format.
    """

    def __init__(self, k: int = 2, channels: Optional[int] = None):
        super().__init__()
        if int(k) < 1:
            raise BadValueError(f"Maxout k={k} must be >= 1")
        self.k = int(k)
        self.channels = int(channels) if channels is not None else None

    def extra_repr(self) -> str:
        return f"k={self.k}" + (f", channels={self.channels}" if self.channels is not None else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expect = self.k * self.channels if self.channels is not None else None
        if x.dim() < 2 or x.shape[1] % self.k or (expect is not None and x.shape[1] != expect):
            want = f"{expect}" if expect is not None else f"a multiple of k={self.k}"
            raise ValueError(f"Maxout(k={self.k}) expects (N, {want}, ...) input, got {tuple(x.shape)}")
        groups = x.chunk(self.k, dim=1)
        y = groups[0]
        for g in groups[1:]:
            y = torch.maximum(y, g)
        return y


class SEReLU(nn.Module):
    """Squeeze-and-Excitation (Hu et al. 2018) followed by ReLU: relu(sigmoid(FC2(relu(FC1(GAP(x))))) * x).

    The gate sees the pre-activation input, like DY-ReLU's hyper function; FC1/FC2 are named as in
    DyReLU. With the same weights, DyReLU(k=1, use_bias=False, init_a=(0.5,), lambda_a=0.5) computes
    exactly the SE part (a_c = 0.5 + 0.5 (2 sigmoid - 1) = sigmoid), Table 1's "SE" special case.
    """

    def __init__(self, channels: int, reduction: int = 8, hidden: Optional[int] = None):
        super().__init__()
        if channels < 1 or reduction < 1 or (hidden is not None and hidden < 1):
            raise BadValueError(f"SEReLU: channels={channels}, reduction={reduction}, hidden={hidden} must be >= 1")
        self.channels, self.reduction = int(channels), int(reduction)
        self.hidden = int(hidden) if hidden is not None else max(1, self.channels // self.reduction)
        self.fc1 = nn.Linear(self.channels, self.hidden)
        self.fc2 = nn.Linear(self.hidden, self.channels)

    def extra_repr(self) -> str:
        return f"{self.channels}, reduction={self.reduction}, hidden={self.hidden}"

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) sigmoid gate of the SE block."""
        return torch.sigmoid(self.fc2(F.relu(self.fc1(DyReLU.pool(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(f"SEReLU({self.channels}) expects (N, {self.channels}, ...) input, got {tuple(x.shape)}")
        s = self.gate(x).to(x.dtype)
        return F.relu(x * s[(Ellipsis,) + (None,) * (x.dim() - 2)])


# ---- the registry ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]  # factory(channels, **own_kwargs)
    params: tuple  # own keyword names
    dynamic: bool = False


def _relu(channels: int, inplace: bool = False) -> nn.Module:
    return nn.ReLU(inplace=inplace)


def _relu6(channels: int, inplace: bool = False) -> nn.Module:
    return nn.ReLU6(inplace=inplace)


def _leaky_relu(channels: int, negative_slope: float = 0.01, inplace: bool = False) -> nn.Module:
    return nn.LeakyReLU(negative_slope=float(negative_slope), inplace=inplace)


def _prelu(channels: int, init: float = 0.25) -> nn.Module:
    return nn.PReLU(num_parameters=channels, init=float(init))


def _prelu_shared(channels: int, init: float = 0.25) -> nn.Module:
    return nn.PReLU(num_parameters=1, init=float(init))


def _rrelu(channels: int, lower: float = 1.0 / 8, upper: float = 1.0 / 3, inplace: bool = False) -> nn.Module:
    return nn.RReLU(lower=float(lower), upper=float(upper), inplace=inplace)


def _hswish(channels: int, inplace: bool = False) -> nn.Module:
    return nn.Hardswish(inplace=inplace)


def _se_relu(channels: int, reduction: int = 8, hidden: Optional[int] = None) -> nn.Module:
    return SEReLU(channels, reduction=reduction, hidden=hidden)


def _maxout(channels: int, k: int = 2) -> nn.Module:
    return Maxout(k=k, channels=channels)


def _dyrelu(variant: str) -> Callable[..., nn.Module]:
    def factory(channels: int, **kwargs: Any) -> nn.Module:
        return DyReLU(channels, variant=variant, **kwargs)

    return factory


def _static_dyrelu(variant: str) -> Callable[..., nn.Module]:
    def factory(channels: int, **kwargs: Any) -> nn.Module:
        return StaticDyReLU(channels, variant=variant, **kwargs)

    return factory


def _own_params(fn: Callable) -> tuple:
    return tuple(list(inspect.signature(fn).parameters)[1:])


#: every DyReLU keyword a dyrelu_* spec (or make_act's ``extra``) may set (all but channels, variant)
DYRELU_KEYS: tuple = tuple(p for p in list(inspect.signature(DyReLU.__init__).parameters)[1:] if p not in ("channels", "variant"))

_REGISTRY: dict[str, _Entry] = {
    "relu": _Entry(_relu, _own_params(_relu)),
    "relu6": _Entry(_relu6, _own_params(_relu6)),
    "leaky_relu": _Entry(_leaky_relu, _own_params(_leaky_relu)),
    "prelu": _Entry(_prelu, _own_params(_prelu)),
    "prelu_shared": _Entry(_prelu_shared, _own_params(_prelu_shared)),
    "rrelu": _Entry(_rrelu, _own_params(_rrelu)),
    "hswish": _Entry(_hswish, _own_params(_hswish)),
    "se_relu": _Entry(_se_relu, _own_params(_se_relu)),
    "dyrelu_a": _Entry(_dyrelu("A"), DYRELU_KEYS, dynamic=True),
    "dyrelu_b": _Entry(_dyrelu("B"), DYRELU_KEYS, dynamic=True),
    "dyrelu_c": _Entry(_dyrelu("C"), DYRELU_KEYS, dynamic=True),
    # the static twins take DyReLU's keywords and sites (k1, hidden sizing) as their dynamic variants do
    "dyrelu_a_static": _Entry(_static_dyrelu("A"), DYRELU_KEYS, dynamic=True),
    "dyrelu_b_static": _Entry(_static_dyrelu("B"), DYRELU_KEYS, dynamic=True),
    "dyrelu_c_static": _Entry(_static_dyrelu("C"), DYRELU_KEYS, dynamic=True),
    "maxout": _Entry(_maxout, _own_params(_maxout)),
}

#: every registered activation name, in the paper's order (static, SE, dynamic, maxout)
ACT_NAMES: tuple = tuple(_REGISTRY)


def list_acts() -> list:
    """All activation names ``build_act`` accepts."""
    return list(ACT_NAMES)


def _canonical(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"activation name must be a str, got {type(name).__name__}: {name!r}")
    key = name.strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        raise BadNameError(f"unknown activation {name!r}; valid names: {', '.join(ACT_NAMES)}")
    return key


def _plain(value: Any) -> Any:
    """DictConfig/ListConfig (or any Mapping/Sequence) values -> dict/tuple, so modules get plain Python."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return tuple(_plain(v) for v in value)
    return value


def parse_spec(spec: ActSpec) -> tuple:
    """spec -> (canonical name, dict of overrides). Raises ValueError on an unknown name."""
    if isinstance(spec, str):
        return _canonical(spec), {}
    if isinstance(spec, Mapping):
        if "name" not in spec:
            raise BadValueError(f"activation spec {dict(spec)!r} has no 'name' key; valid names: {', '.join(ACT_NAMES)}")
        overrides = {str(k): _plain(v) for k, v in spec.items() if k != "name"}
        return _canonical(spec["name"]), overrides
    raise TypeError(f"activation spec must be a name or a mapping with a 'name' key, got {type(spec).__name__}")


def act_params(name: str) -> tuple:
    """The keyword overrides activation ``name`` takes."""
    return _REGISTRY[_canonical(name)].params


def _check_overrides(name: str, overrides: Mapping) -> None:
    params = _REGISTRY[name].params
    bad = [k for k in overrides if k not in params]
    if bad:
        hint = " (the DyReLU variant is chosen by the name: dyrelu_a, dyrelu_b, dyrelu_c)" if "variant" in bad else ""
        takes = ", ".join(params) if params else "no overrides"
        raise BadValueError(f"activation {name!r} does not take {', '.join(map(repr, bad))}; it takes: {takes}{hint}")


def build_act(name: str, channels: int, **overrides: Any) -> nn.Module:
    """A fresh activation module for a ``channels``-wide input (see the module docstring for names).

    ``channels`` is the width the activation sees (for maxout: its output width; the conv before it
    must produce k*channels, see ``act_expansion``). Unknown names and overrides raise ValueError.
    """
    key = _canonical(name)
    if int(channels) < 1:
        raise ValueError(f"channels={channels} must be >= 1")
    overrides = {k: _plain(v) for k, v in overrides.items()}
    _check_overrides(key, overrides)
    return _REGISTRY[key].factory(int(channels), **overrides)


def make_act(spec: ActSpec, channels: int, **extra: Any) -> nn.Module:
    """Build the activation a spec describes. ``extra`` (DyReLU keywords, e.g. k=1 at MobileNetV2's A3)
    override the spec's own values for dynamic activations and are ignored by static ones."""
    key, overrides = parse_spec(spec)
    bad = [k for k in extra if k not in DYRELU_KEYS]
    if bad:
        raise ValueError(
            f"make_act extra kwargs are DyReLU overrides for dynamic activations; "
            f"{', '.join(map(repr, bad))} is not one of: {', '.join(DYRELU_KEYS)}"
        )
    if _REGISTRY[key].dynamic:
        overrides.update(extra)
    return build_act(key, channels, **overrides)


def act_name(spec: ActSpec) -> str:
    """The canonical registry name of a spec."""
    return parse_spec(spec)[0]


def is_dynamic(spec: ActSpec) -> bool:
    """True for the DY-ReLU family (dyrelu_a/b/c and their static twins dyrelu_*_static: they take
    DyReLU's keywords and sites), False for the static activations and se_relu."""
    return _REGISTRY[parse_spec(spec)[0]].dynamic


def act_expansion(spec: ActSpec) -> int:
    """How many times the conv before this activation must multiply its output channels: k for maxout, else 1."""
    key, overrides = parse_spec(spec)
    if key != "maxout":
        return 1
    _check_overrides(key, overrides)
    k = int(overrides.get("k", inspect.signature(_maxout).parameters["k"].default))
    if k < 1:
        raise BadValueError(f"maxout k={k} must be >= 1")
    return k

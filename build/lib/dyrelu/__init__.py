"""dyrelu: Dynamic ReLU (Chen et al., ECCV 2020) for any PyTorch model.

Imports torch only (no timm, torchvision, Hydra, models or data).
"""
from .convert import convert
from .core import Coefficients, DyReLU, set_tau
from .registry import (
    ACT_NAMES,
    Maxout,
    SEReLU,
    act_expansion,
    act_name,
    build_act,
    is_dynamic,
    list_acts,
    make_act,
)

__all__ = [
    "DyReLU",
    "Coefficients",
    "set_tau",
    "build_act",
    "make_act",
    "act_expansion",
    "is_dynamic",
    "act_name",
    "list_acts",
    "ACT_NAMES",
    "Maxout",
    "SEReLU",
    "convert",
]
__version__ = "0.1.0"

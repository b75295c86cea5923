"""dyrelu: Dynamic ReLU (Chen et al., ECCV 2020) for any PyTorch model.

Imports torch only (no timm, torchvision, Hydra, models or data).
"""
from .convert import convert
from .fused.bn_act import BNDyReLU, bn_dyrelu
from .inference import InferenceDyReLU, fold_batchnorm, prepare_for_inference
from .core import Coefficients, DyReLU, set_tau
from .static import StaticDyReLU
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
    "StaticDyReLU",
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
    "prepare_for_inference",
    "fold_batchnorm",
    "InferenceDyReLU",
    "bn_dyrelu",
    "BNDyReLU",
]
__version__ = "0.1.0"

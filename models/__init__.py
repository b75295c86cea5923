"""Model zoo: networks by name, every activation built through ``dyrelu.make_act``.

    from models import build_model, list_models, build_pose_model
    net = build_model("mbv2_035", act={"name": "dyrelu_b", "k": 2, "reduction": 8})

Names (see README.md (Model zoo) for the exact activation placement of each family):
mbv2_035, mbv2_050, mbv2_075, mbv2_100, mbv3_large, mbv3_small, resnet10, resnet18, resnet34,
resnet50. Models take plain arguments (no Hydra), use random init only and never download.

``act`` is an activation spec as ``dyrelu.make_act`` takes it: a name ("relu", "dyrelu_b", ...) or
a mapping {"name": ..., **overrides}. Model-specific placement of the activation (which sites get
it, K=1 after projection convolutions, Maxout channel expansion) happens in the model files
through ``ActBuilder`` (models/_registry.py, with the registry itself).

This file only re-exports: importing the model files registers their networks.
"""
from ._registry import HYPER_SIZINGS, ActBuilder, build_model, list_models, model_builder, register_model, set_fuse_bn_act
from . import mobilenetv2, mobilenetv3, resnet  # noqa: F401  (register their networks)
from .pose import POSE_BACKBONES, build_pose_model

__all__ = ["register_model", "build_model", "list_models", "model_builder", "build_pose_model", "POSE_BACKBONES",
           "ActBuilder", "HYPER_SIZINGS", "set_fuse_bn_act"]

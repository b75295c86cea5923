"""Top-down keypoint model: a mobile backbone (stride 32) + an upsampling head of MobileNetV2 blocks.

The paper (Sec. 5.4) uses "the head of Dynamic Convolution [3]: upsampling and four MobileNetV2
inverted residual bottleneck blocks" and does not give its channels. This head:

    backbone.forward_features(x)          C_bb x H/32 x W/32  (1280 for MobileNetV2 at any width <= 1,
                                                                 960 / 576 for MobileNetV3 Large / Small)
    upsample x2 (bilinear) -> IR(C_bb -> 192, t=1)   at H/16   dw3x3 on C_bb + project (no expand conv)
    upsample x2 (bilinear) -> IR(192  -> 96,  t=6)   at H/8
    upsample x2 (bilinear) -> IR(96   -> 48,  t=6)   at H/4
                              IR(48   -> 48,  t=6)   at H/4    (residual)
    conv1x1 (48 -> num_joints, bias)                  heatmaps at H/4 (64 x 48 for a 256 x 192 crop)

Channels halve as the resolution doubles, and the first block has t=1 (MobileNetV2's own first block)
because expanding 1280 channels six-fold would dwarf everything else. With ReLU everywhere this gives
972 / 772 / 877 / 706 M MAdds for MobileNetV2 x1.0 / x0.5 / V3-Large / V3-Small at 256 x 192, 2-3 %
under Table 10's 993.7 / 794.8 / 896.4 / 726.9 M; parameters are 0.2-0.6 M under the paper's (the
head's share is unknown; README.md (Model zoo) has the table). ``head_channels`` / ``head_expansion``
change the head.

Activations of the head (``head_act``, a dyrelu spec) follow MobileNetV2's placement: A1 (after the
expand conv; absent in the t=1 block) and A2 (after the depthwise conv) get ``head_act``; A3 (after
the projection) is linear for a static act and DY-ReLU with K=1 for a dynamic one. The final 1x1
conv is linear. The backbone's activations follow its own model file (``act``, ``backbone_kwargs``);
MobileNetV3 with a dynamic ``act`` loses its SE blocks, as in the paper.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from dyrelu.errors import BadNameError, BadValueError

from ._registry import ActBuilder, build_model, set_fuse_bn_act
from .mobilenetv2 import InvertedResidual, _SiteActs, _init_weights

__all__ = ["build_pose_model", "PoseNet", "PoseHead", "POSE_BACKBONES"]

POSE_BACKBONES = ("mbv2_050", "mbv2_100", "mbv3_small", "mbv3_large")
DEFAULT_HEAD_CHANNELS = (192, 96, 48, 48)


class PoseHead(nn.Module):
    """Upsampling + four inverted residual blocks (strides 16, 8, 4, 4 of the input) + 1x1 to joints."""

    def __init__(self, in_channels: int, num_joints: int = 17, act: Any = "relu",
                 channels: Sequence[int] = DEFAULT_HEAD_CHANNELS, expansion: int = 6,
                 hyper_sizing: str = "conv_in", hyper_min: int = 8):
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"head channels must list 4 block widths, got {list(channels)}")
        builder = ActBuilder(act, hyper_sizing=hyper_sizing, hyper_min=hyper_min)
        if builder.expansion != 1:
            raise BadValueError(f"head act {builder.name!r} (Maxout) is not supported in the pose head")
        acts = _SiteActs(builder, ("a1", "a2", "a3"), dynamic_stem_last=False)
        self.upsample_before = (True, True, True, False)
        blocks, cin = [], in_channels
        for i, cout in enumerate(channels):
            blocks.append(InvertedResidual(cin, int(cout), 1, 1 if i == 0 else int(expansion), acts))
            cin = int(cout)
        self.blocks = nn.ModuleList(blocks)
        self.final = nn.Conv2d(cin, num_joints, 1)
        self.num_joints = num_joints

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for up, block in zip(self.upsample_before, self.blocks):
            if up:
                x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
            x = block(x)
        return self.final(x)


class PoseNet(nn.Module):
    """backbone.forward_features -> PoseHead; output (N, num_joints, H/4, W/4) heatmaps."""

    def __init__(self, backbone: nn.Module, head: PoseHead):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.num_joints = head.num_joints

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_features(x))


def _strip_classifier(backbone: nn.Module) -> nn.Module:
    """Drop what only classification uses (pooling, MobileNetV3's 1x1 head conv, dropout, classifier)."""
    for name in ("global_pool", "dropout", "classifier", "fc"):
        if isinstance(getattr(backbone, name, None), nn.Module):
            setattr(backbone, name, nn.Identity())
    if hasattr(backbone, "act_head") and hasattr(backbone, "conv_last"):  # MobileNetV3: conv_head is post-pool
        backbone.conv_head = nn.Identity()
        backbone.act_head = nn.Identity()
    return backbone


def build_pose_model(name: str, act: Any = "relu", head_act: Any = "relu", num_joints: int = 17,
                     head_channels: Optional[Sequence[int]] = None, head_expansion: int = 6,
                     dropout: Optional[float] = None, **backbone_kwargs) -> PoseNet:
    """Keypoint model: the backbone ``name`` (one of POSE_BACKBONES) with activation ``act`` (its own
    placement rules, plus ``backbone_kwargs``, e.g. positions=...), head with ``head_act``.

    Takes a model group's keys as they are (configs/task/kpt.yaml targets it): ``dropout`` is a
    classifier setting and the pose model has no classifier, so it is accepted and unused."""
    if name not in POSE_BACKBONES:
        raise BadNameError(f"unknown pose backbone {name!r}; valid: {', '.join(POSE_BACKBONES)}")
    backbone_kwargs.pop("num_classes", None)
    fuse_bn_act = bool(backbone_kwargs.pop("fuse_bn_act", True))
    net = _strip_classifier(build_model(name, act=act, num_classes=0, fuse_bn_act=fuse_bn_act, **backbone_kwargs))
    sizing = {k: backbone_kwargs[k] for k in ("hyper_min",) if k in backbone_kwargs}
    head = PoseHead(net.num_features, num_joints, act=head_act, channels=head_channels or DEFAULT_HEAD_CHANNELS,
                    expansion=head_expansion, **sizing)
    _init_weights(head)
    nn.init.normal_(head.final.weight, std=0.001)  # Simple Baselines' init of the heatmap layer
    nn.init.zeros_(head.final.bias)
    return set_fuse_bn_act(PoseNet(net, head), fuse_bn_act)

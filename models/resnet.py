"""ResNet v1 (He et al. 2016) with pluggable activations: ResNet-10/18/34 (BasicBlock), ResNet-50.

ResNet v1, not v1.5: a downsampling Bottleneck has its stride in the FIRST 1x1 conv (and in the 1x1
projection shortcut), which is what gives ResNet-50 the 3.86 G MAdds of the paper (torchvision /
timm put the stride in the 3x3 conv: 4.11 G). BasicBlocks have the stride in their first 3x3.
ResNet-10 is BasicBlock with one block per stage (0.89 G).

Activation placement: every ReLU of the original network is replaced by ``act`` --

    stem      conv7x7 s2 (3 -> 64) + BN + act ── maxpool3x3 s2
    Basic     conv3x3 + BN + act1 ── conv3x3 + BN ──(+ shortcut)── act2
    Bottle    conv1x1 + BN + act1 ── conv3x3 + BN + act2 ── conv1x1 + BN ──(+ shortcut)── act3
    head      global average pool -> dropout (0.1) -> linear

including the stem activation and the one after the residual sum (act2 / act3), which sees the
sum, as the ReLU it replaces did. There is no "projection" K=1 site in ResNet (the post-sum ReLU
already follows the last conv of each block).

DY-ReLU hyper-function width (``hyper_sizing``, models.ActBuilder): hidden = max(8, C_in // R) with
C_in = input channels of the conv before the activation (for the post-sum activation: the last
conv of the residual branch; for the stem: 3 -> the minimum 8).

Maxout is refused (ValueError): the post-sum activation has no single conv before it to widen K
times (both the residual branch and the shortcut would have to be), and Table 5 uses Maxout on
MobileNetV2 only.
"""
from __future__ import annotations

from typing import Any, List, Optional, Type, Union

import torch
from torch import nn
from dyrelu.errors import BadValueError

from dyrelu.fused.bn_act import bn_dyrelu

from ._registry import ActBuilder, register_model, set_fuse_bn_act

__all__ = ["ResNet", "BasicBlock", "Bottleneck"]


def _bn_act(x: torch.Tensor, bn: nn.Module, act: nn.Module, fuse: bool) -> torch.Tensor:
    """act(bn(x)), through the fused BN + DY-ReLU where ``fuse`` (it falls back by itself)."""
    return bn_dyrelu(x, bn, act) if fuse else act(bn(x))


class BasicBlock(nn.Module):
    fuse_bn_act = True

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int, acts: ActBuilder):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = acts(planes, conv_in=in_ch)
        self.conv2 = nn.Conv2d(planes, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.downsample = _shortcut(in_ch, out, stride)
        self.act2 = acts(out, conv_in=planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _bn_act(self.conv1(x), self.bn1, self.act1, self.fuse_bn_act)
        y = self.bn2(self.conv2(y))
        return self.act2(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    fuse_bn_act = True

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, acts: ActBuilder):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, stride, 0, bias=False)  # v1: stride here
        self.bn1 = nn.BatchNorm2d(planes)
        self.act1 = acts(planes, conv_in=in_ch)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.act2 = acts(planes, conv_in=planes)
        self.conv3 = nn.Conv2d(planes, out, 1, 1, 0, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = _shortcut(in_ch, out, stride)
        self.act3 = acts(out, conv_in=planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _bn_act(self.conv1(x), self.bn1, self.act1, self.fuse_bn_act)
        y = _bn_act(self.conv2(y), self.bn2, self.act2, self.fuse_bn_act)
        y = self.bn3(self.conv3(y))
        return self.act3(y + (x if self.downsample is None else self.downsample(x)))


def _shortcut(in_ch: int, out: int, stride: int) -> Optional[nn.Module]:
    if stride == 1 and in_ch == out:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out, 1, stride, bias=False), nn.BatchNorm2d(out))


class ResNet(nn.Module):
    fuse_bn_act = True

    def __init__(self, block: Type[Union[BasicBlock, Bottleneck]], layers: List[int], act: Any = "relu",
                 num_classes: int = 1000, dropout: float = 0.1, hyper_sizing: str = "conv_in",
                 hyper_min: int = 8, in_chans: int = 3, zero_init_residual: bool = False,
                 fuse_bn_act: bool = True):
        super().__init__()
        acts = ActBuilder(act, hyper_sizing=hyper_sizing, hyper_min=hyper_min)
        if acts.expansion != 1:
            raise BadValueError(f"act={acts.name} needs {acts.expansion}x conv outputs (Maxout), which ResNet cannot give (its "
                                "post-sum activations have no single conv before them); use another act, e.g. act=relu")
        self.act_spec, self.dynamic = act, acts.dynamic
        self.stem = nn.Sequential()
        self.stem.add_module("conv", nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False))
        self.stem.add_module("bn", nn.BatchNorm2d(64))
        self.stem.add_module("act", acts(64, conv_in=in_chans))
        self.stem.add_module("pool", nn.MaxPool2d(3, 2, 1))
        self.feature_info = [dict(num_chs=64, reduction=4, module="stem")]
        in_ch, stages, reduction = 64, [], 4
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                blocks.append(block(in_ch, planes, stride if j == 0 else 1, acts))
                in_ch = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
            reduction *= stride
            self.feature_info.append(dict(num_chs=in_ch, reduction=reduction, module=f"layer{i + 1}"))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.num_features = in_ch
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop_rate = float(dropout)
        self.dropout = nn.Dropout(self.drop_rate)
        self.fc = nn.Linear(in_ch, num_classes) if num_classes > 0 else nn.Identity()
        self.num_classes = num_classes
        self._init(zero_init_residual)
        set_fuse_bn_act(self, fuse_bn_act)

    def _init(self, zero_init_residual: bool) -> None:
        from dyrelu import DyReLU

        skip = {id(m) for d in self.modules() if isinstance(d, DyReLU) for m in d.modules()}
        for m in self.modules():
            if id(m) in skip:
                continue
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse_bn_act and "act" in self.stem._modules:  # keeps the stem's keys (stem.conv, stem.bn, stem.act)
            x = self.stem.pool(bn_dyrelu(self.stem.conv(x), self.stem.bn, self.stem.act))
        else:
            x = self.stem(x)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.fc(self.dropout(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def resnet10(act: Any = "relu", num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-10: BasicBlock, one block per stage. kwargs: dropout (0.1), hyper_sizing, hyper_min."""
    return ResNet(BasicBlock, [1, 1, 1, 1], act=act, num_classes=num_classes, **kwargs)


@register_model
def resnet18(act: Any = "relu", num_classes: int = 1000, **kwargs) -> ResNet:
    return ResNet(BasicBlock, [2, 2, 2, 2], act=act, num_classes=num_classes, **kwargs)


@register_model
def resnet34(act: Any = "relu", num_classes: int = 1000, **kwargs) -> ResNet:
    return ResNet(BasicBlock, [3, 4, 6, 3], act=act, num_classes=num_classes, **kwargs)


@register_model
def resnet50(act: Any = "relu", num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-50 v1 (stride in the first 1x1 of a downsampling bottleneck: 3.86 G MAdds)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], act=act, num_classes=num_classes, **kwargs)

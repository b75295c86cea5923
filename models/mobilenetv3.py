"""MobileNetV3 Large / Small (Howard et al. 2019) with pluggable activations, written from scratch.

timm's mobilenetv3 hard-codes ReLU in some blocks and inside SE, so swapping its act_layer does not
reach every activation; this file owns every site instead.

Layout (the MobileNetV3 paper's Tables 1 and 2; exp/out channels as written there, multiplier 1.0):

    stem   conv3x3 s2 (3 -> 16) + BN + NL
    blocks bneck(k, exp, out, SE, NL, s); one block:
           x ── [conv1x1 expand (C_in -> exp) + BN + NL]  (skipped when exp == C_in, first block)
             ── dw conv kxk (stride s) + BN + NL ── [SE(exp)] ── conv1x1 project (exp -> out) + BN ── P
             ──(+ x if s == 1 and C_in == out)
    last   conv1x1 (160 -> 960 | 96 -> 576) + BN + NL      <- forward_features() ends here
    head   global average pool -> conv1x1 (-> 1280 | 1024, bias, no BN) + NL -> dropout -> linear

Activation placement by ``act``:

* "relu" or "relu_se_hswish" (the paper's "ReLU/SE/HS" baseline): the standard network. NL is ReLU
  or h-swish per the MobileNetV3 table, SE blocks present (squeeze = make_divisible(exp / 4, 8),
  ReLU inside, hard-sigmoid gate), P (after the projection) is linear.
* dynamic act (dyrelu_a/b/c): SE blocks removed (``se=None`` -> False) and every ReLU and h-swish
  (stem, expand, depthwise, last conv, head conv after pooling) replaced by the act (K from the
  spec, default 2); P gets DY-ReLU with K=1 ("the last conv of each mobile block", like MobileNetV2).
* any other static act (relu6, leaky_relu, prelu, hswish, ...): every NL site gets that act, SE
  kept, P linear. Maxout is not supported here (ValueError).

``se`` overrides whether SE blocks are present; ``dropout`` overrides the paper's 0.2 (large) /
0.1 (small) before the last layer.

DY-ReLU hyper-function sizing (models.ActBuilder): MobileNetV3 defaults to ``hyper_sizing="act"``,
hidden = max(8, C // R) with C the activation's own channels -- that reproduces Table 4's 9.8 M /
4.0 M within 3 %, while MobileNetV2's "conv_in" rule would give 7.5 M / 3.3 M (README.md (Model zoo)).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from timm.layers import SEModule, make_divisible
from dyrelu.errors import BadNameError, BadValueError

from ._registry import ActBuilder, register_model, set_fuse_bn_act
from .mobilenetv2 import ConvBNAct, _init_weights

__all__ = ["MobileNetV3", "MBV3_LARGE", "MBV3_SMALL"]

# (kernel, exp, out, se, nl, stride); nl: "RE" = ReLU, "HS" = h-swish
MBV3_LARGE = (
    (3, 16, 16, False, "RE", 1),
    (3, 64, 24, False, "RE", 2),
    (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2),
    (5, 120, 40, True, "RE", 1),
    (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2),
    (3, 200, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1),
    (3, 480, 112, True, "HS", 1),
    (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2),
    (5, 960, 160, True, "HS", 1),
    (5, 960, 160, True, "HS", 1),
)
MBV3_SMALL = (
    (3, 16, 16, True, "RE", 2),
    (3, 72, 24, False, "RE", 2),
    (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2),
    (5, 240, 40, True, "HS", 1),
    (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1),
    (5, 144, 48, True, "HS", 1),
    (5, 288, 96, True, "HS", 2),
    (5, 576, 96, True, "HS", 1),
    (5, 576, 96, True, "HS", 1),
)
_ARCH = {
    "large": dict(cfg=MBV3_LARGE, stem=16, last=960, head=1280, dropout=0.2),
    "small": dict(cfg=MBV3_SMALL, stem=16, last=576, head=1024, dropout=0.1),
}
BASELINE_NAMES = ("relu", "relu_se_hswish")


class _Acts:
    def __init__(self, act: Any, hyper_sizing: str, hyper_min: int):
        from collections.abc import Mapping

        name = act.get("name") if isinstance(act, Mapping) else act
        self.baseline = str(name).lower() in BASELINE_NAMES
        self.b = None if self.baseline else ActBuilder(act, hyper_sizing=hyper_sizing, hyper_min=hyper_min)
        self.dynamic = bool(self.b is not None and self.b.dynamic)
        if self.b is not None and self.b.expansion != 1:
            raise BadValueError(f"act {self.b.name!r} needs {self.b.expansion}x conv outputs (Maxout); "
                             "MobileNetV3 supports it only in MobileNetV2-style models")

    def nl(self, kind: str, channels: int, conv_in: Optional[int]) -> nn.Module:
        if self.baseline:
            return nn.ReLU(inplace=True) if kind == "RE" else nn.Hardswish(inplace=True)
        return self.b(channels, conv_in=conv_in)

    def proj(self, channels: int, conv_in: int) -> nn.Module:
        return self.b(channels, conv_in=conv_in, k1=True) if self.dynamic else nn.Identity()


class Bneck(nn.Module):
    def __init__(self, in_ch: int, k: int, exp: int, out: int, se: bool, nl: str, stride: int, acts: _Acts):
        super().__init__()
        self.use_res = stride == 1 and in_ch == out
        self.in_channels, self.out_channels, self.hidden_channels = in_ch, out, exp
        self.conv_pw = ConvBNAct(in_ch, exp, 1, act=acts.nl(nl, exp, in_ch)) if exp != in_ch else None
        self.conv_dw = ConvBNAct(exp, exp, k, stride, groups=exp, act=acts.nl(nl, exp, exp))
        self.se = (SEModule(exp, rd_channels=make_divisible(exp / 4, 8), act_layer=nn.ReLU, gate_layer="hard_sigmoid")
                   if se else nn.Identity())
        self.conv_pwl = ConvBNAct(exp, out, 1, act=acts.proj(out, exp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.conv_pw is None else self.conv_pw(x)
        y = self.conv_pwl(self.se(self.conv_dw(y)))
        return x + y if self.use_res else y


class MobileNetV3(nn.Module):
    def __init__(self, variant: str = "large", act: Any = "relu", num_classes: int = 1000,
                 se: Optional[bool] = None, dropout: Optional[float] = None, hyper_sizing: str = "act",
                 hyper_min: int = 8, in_chans: int = 3, fuse_bn_act: bool = True):
        super().__init__()
        if variant not in _ARCH:
            raise BadNameError(f"variant={variant!r} is not one of {sorted(_ARCH)}")
        arch = _ARCH[variant]
        acts = _Acts(act, hyper_sizing, hyper_min)
        use_se = (not acts.dynamic) if se is None else bool(se)
        self.variant, self.act_spec, self.dynamic, self.use_se = variant, act, acts.dynamic, use_se

        self.stem = ConvBNAct(in_chans, arch["stem"], 3, 2, act=acts.nl("HS", arch["stem"], in_chans))
        blocks, in_ch, reduction = [], arch["stem"], 2
        self.feature_info = [dict(num_chs=in_ch, reduction=2, module="stem")]
        for i, (k, exp, out, has_se, nl, s) in enumerate(arch["cfg"]):
            blocks.append(Bneck(in_ch, k, exp, out, has_se and use_se, nl, s, acts))
            in_ch, reduction = out, reduction * s
            self.feature_info.append(dict(num_chs=out, reduction=reduction, module=f"blocks.{i}"))
        self.blocks = nn.Sequential(*blocks)
        self.num_features = arch["last"]
        self.conv_last = ConvBNAct(in_ch, self.num_features, 1, act=acts.nl("HS", self.num_features, in_ch))
        self.feature_info.append(dict(num_chs=self.num_features, reduction=reduction, module="conv_last"))

        self.head_hidden_size = arch["head"]
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.conv_head = nn.Conv2d(self.num_features, self.head_hidden_size, 1, bias=True)
        self.act_head = acts.nl("HS", self.head_hidden_size, self.num_features)
        self.drop_rate = float(arch["dropout"] if dropout is None else dropout)
        self.dropout = nn.Dropout(self.drop_rate)
        self.classifier = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        self.num_classes = num_classes
        _init_weights(self)
        set_fuse_bn_act(self, fuse_bn_act)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_last(self.blocks(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.act_head(self.conv_head(self.global_pool(x)))
        x = x.flatten(1)
        return x if pre_logits else self.classifier(self.dropout(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def mbv3_large(act: Any = "relu", num_classes: int = 1000, **kwargs) -> MobileNetV3:
    """MobileNetV3-Large 1.0 (dropout 0.2). kwargs: se, dropout, hyper_sizing, hyper_min, fuse_bn_act."""
    return MobileNetV3("large", act=act, num_classes=num_classes, **kwargs)


@register_model
def mbv3_small(act: Any = "relu", num_classes: int = 1000, **kwargs) -> MobileNetV3:
    """MobileNetV3-Small 1.0 (dropout 0.1)."""
    return MobileNetV3("small", act=act, num_classes=num_classes, **kwargs)

"""MobileNetV2 (Sandler et al. 2018) with pluggable activations, as the DY-ReLU paper uses it.

Layout (width multiplier w; channels rounded with timm's ``make_divisible(c * w, 8)``; the last conv
keeps 1280 channels for w <= 1, as in the MobileNetV2 paper):

    stem   conv3x3 s2 (3 -> 32w) + BN + act[stem]
    blocks 17 inverted residual blocks, (t, c, n, s) =
           (1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1)
    last   conv1x1 (320w -> 1280) + BN + act[last]
    head   global average pool -> dropout -> linear(1280, num_classes)

One inverted residual block (the paper's Table 7 names):

    x ── conv1x1 expand (C_in -> t*C_in) + BN ── A1 ── dw conv3x3 (stride s) + BN ── A2
         ── conv1x1 project (t*C_in -> C_out) + BN ── A3 ──(+ x if s == 1 and C_in == C_out)

    A3 is applied to the projection's output *before* the residual sum, so the identity path
    stays linear. The first block has t = 1: no expand conv, hence no A1 (only A2 and A3).

Activation placement (``act`` is a dyrelu spec; ``positions`` a subset of {"a1", "a2", "a3"},
default all three; ``dynamic_stem_last`` default True):

* dynamic act (dyrelu_a/b/c): the selected block sites get it. A1 and A2 use the spec as is (K=2 by
  default); A3 gets DY-ReLU with K=1 (a = 1 + lambda_a*da, b = 0 + lambda_b*db: "MobileNetV2 has no
  activation after the last conv of a block, where we add DY-ReLU with K=1"). Sites not selected
  keep the baseline: ReLU at A1/A2, nothing (linear) at A3 -- the paper's Table 7 rows are
  positions=[a1], [a2], [a3], [a1, a2], ...; its all-three row is the default (= Table 4).
* stem and last conv: the paper replaces "the ReLU activations" of MobileNetV2, and the stem conv
  and the last 1x1 conv (-> 1280) carry ReLUs in the original network, so with a dynamic act they
  get it too (spec as is, K=2), independent of ``positions``; ``dynamic_stem_last=False`` keeps
  ReLU there (x1.0: 0.26 M fewer params, 1.2 M fewer MAdds; README.md (Model zoo)).
* static act (relu, relu6, leaky_relu, prelu, prelu_shared, rrelu, hswish, se_relu): stem, A1, A2
  and last use it; A3 stays linear (``positions`` is ignored).
* Maxout (K = dyrelu.act_expansion(spec)) at the sites ``maxout_sites`` (default stem, a1, a3, last;
  tokens stem/a1/a2/a3/last): each conv that feeds a Maxout has K times its output channels, its BN
  normalises all of them, and Maxout takes the max over the K groups. Sites not listed keep the
  baseline (ReLU; linear at A3). The default is what Table 5 implies: its Maxout rows add 278-283 M
  MAdds per extra K on x1.0 and 2.15-2.2 M params -- exactly the stem + expand + projection + last
  1x1 convs (278.8 M, 2.15 M); adding the depthwise convs would give 299.5 M, and dropping the last
  conv instead 1.8 M params (README.md (Model zoo)). So Maxout, like DY-ReLU (K=1 there), sits after the
  projection too, and the depthwise conv keeps ReLU. With "a2" listed, the depthwise conv becomes
  groups = C with K filters per input channel (C -> K*C); its outputs come out as c*K + k, so a
  fixed channel permutation (_GroupsToBlocks) reorders them to the k*C + c block layout dyrelu's
  Maxout expects -- every max is then over the K filters of one input channel.

DY-ReLU hyper-function width (``hyper_sizing``, see models.ActBuilder): by default
hidden = max(8, C_in // R) with C_in the input channels of the conv before the activation (the
block input for A1, the expanded width for A2 and A3, 320w for last, 3 for the stem).

The ReLU6 of the original network is replaced by plain ReLU in the baseline (the paper's Tables
4 and 5 call the baseline "ReLU"); pass act="relu6" for the original clipping.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn
from timm.layers import make_divisible
from dyrelu.errors import BadNameError

from dyrelu.fused.bn_act import bn_dyrelu

from ._registry import ActBuilder, register_model, set_fuse_bn_act

__all__ = ["MobileNetV2", "InvertedResidual", "ConvBNAct", "MBV2_SETTINGS", "POSITIONS", "SITES", "MAXOUT_SITES"]

MBV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
POSITIONS = ("a1", "a2", "a3")
SITES = ("stem", "a1", "a2", "a3", "last")
MAXOUT_SITES = ("stem", "a1", "a3", "last")


class _GroupsToBlocks(nn.Module):
    """(N, C*K, ...) in c*K + k order (a grouped conv's output) -> k*C + c order (dyrelu Maxout's blocks)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = int(k)

    def extra_repr(self) -> str:
        return f"k={self.k}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, ck = x.shape[:2]
        return x.reshape(n, ck // self.k, self.k, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


class ConvBNAct(nn.Sequential):
    """conv -> BN -> act, where the conv produces ``expansion`` times ``out_ch`` channels for Maxout.

    With expansion K the conv has K*out_ch outputs (a depthwise conv keeps groups=in_ch and gets K
    filters per input channel), BN covers all K*out_ch, and ``act`` must map K*out_ch -> out_ch.
    With ``fuse_bn_act`` (default; ``models.set_fuse_bn_act``) BN + DY-ReLU run as one fused op
    (``dyrelu.fused.bn_act.bn_dyrelu``: same values, gradients and running stats, same state_dict
    keys); it falls back to the plain sequence for other activations, SyncBatchNorm / global BN
    and folded (inference-prepared) modules.
    """

    fuse_bn_act = True

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 1, stride: int = 1, groups: int = 1,
                 act: Optional[nn.Module] = None, expansion: int = 1):
        conv_out = out_ch * expansion
        super().__init__()
        self.conv = nn.Conv2d(in_ch, conv_out, kernel_size, stride, kernel_size // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(conv_out)
        if expansion > 1 and groups > 1:
            self.reorder = _GroupsToBlocks(expansion)
        self.act = act if act is not None else nn.Identity()
        self.out_channels = out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fuse_bn_act and "reorder" not in self._modules:
            return bn_dyrelu(self.conv(x), self.bn, self.act)
        return super().forward(x)


class InvertedResidual(nn.Module):
    """MobileNetV2 block with activation sites A1 (after expand), A2 (after dw), A3 (after project)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int, acts: "_SiteActs",
                 kernel_size: int = 3):
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_res = stride == 1 and in_ch == out_ch
        self.in_channels, self.out_channels, self.hidden_channels = in_ch, out_ch, hidden
        if expand_ratio != 1:
            act1, e1 = acts.site("a1", hidden, conv_in=in_ch)
            self.conv_pw = ConvBNAct(in_ch, hidden, 1, act=act1, expansion=e1)  # A1
        else:
            self.conv_pw = None
        act2, e2 = acts.site("a2", hidden, conv_in=hidden)
        self.conv_dw = ConvBNAct(hidden, hidden, kernel_size, stride, groups=hidden, act=act2, expansion=e2)  # A2
        act3, e3 = acts.site("a3", out_ch, conv_in=hidden)
        self.conv_pwl = ConvBNAct(hidden, out_ch, 1, act=act3, expansion=e3)  # A3 (linear for static acts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x if self.conv_pw is None else self.conv_pw(x)
        y = self.conv_pwl(self.conv_dw(y))
        return x + y if self.use_res else y


class _SiteActs:
    """Which module goes at each site of a mobile network, given the spec and the selected positions."""

    def __init__(self, builder: ActBuilder, positions: Iterable[str], baseline: Any = "relu",
                 dynamic_stem_last: bool = True, maxout_sites: Iterable[str] = MAXOUT_SITES):
        self.b = builder
        self.positions = set(positions) | ({"stem", "last"} if dynamic_stem_last else set())
        self.maxout_sites = set(maxout_sites)
        self.baseline = baseline

    def site(self, where: str, channels: int, conv_in: Optional[int] = None) -> tuple:
        """(module, conv expansion) for a site; where in a1/a2/a3/stem/last."""
        b = self.b
        if b.dynamic:
            if where not in self.positions:
                return (nn.Identity() if where == "a3" else b.static(self.baseline, channels)), 1
            return b(channels, conv_in=conv_in, k1=(where == "a3")), 1
        if b.expansion > 1:  # Maxout
            if where not in self.maxout_sites:
                return (nn.Identity() if where == "a3" else b.static(self.baseline, channels)), 1
            return b(channels, conv_in=conv_in), b.expansion
        if where == "a3":
            return nn.Identity(), 1
        return b(channels, conv_in=conv_in), 1


def _check_positions(positions: Optional[Sequence[str]], valid: tuple = POSITIONS, what: str = "positions") -> tuple:
    if positions is None:
        return valid
    if isinstance(positions, str):
        positions = [positions]
    pos = tuple(str(p).lower() for p in positions)
    bad = [p for p in pos if p not in valid]
    if bad:
        raise BadNameError(f"unknown {what} {bad}; valid: {list(valid)}")
    return pos


class MobileNetV2(nn.Module):
    def __init__(self, width: float = 1.0, act: Any = "relu", num_classes: int = 1000,
                 positions: Optional[Sequence[str]] = None, dropout: Optional[float] = None,
                 dynamic_stem_last: bool = True, maxout_sites: Sequence[str] = MAXOUT_SITES,
                 hyper_sizing: str = "conv_in", hyper_min: int = 8, in_chans: int = 3,
                 last_channels: Optional[int] = None, fuse_bn_act: bool = True):
        super().__init__()
        builder = ActBuilder(act, hyper_sizing=hyper_sizing, hyper_min=hyper_min)
        self.positions = _check_positions(positions)
        self.maxout_sites = _check_positions(maxout_sites, SITES, "maxout_sites")
        acts = _SiteActs(builder, self.positions, dynamic_stem_last=dynamic_stem_last, maxout_sites=self.maxout_sites)
        self.width, self.act_spec = width, act
        self.dynamic = builder.dynamic

        stem_ch = make_divisible(32 * width, 8)
        act0, e0 = acts.site("stem", stem_ch, conv_in=in_chans)
        self.stem = ConvBNAct(in_chans, stem_ch, 3, 2, act=act0, expansion=e0)

        blocks, in_ch = [], stem_ch
        self.feature_info = [dict(num_chs=stem_ch, reduction=2, module="stem")]
        reduction = 2
        for t, c, n, s in MBV2_SETTINGS:
            out_ch = make_divisible(c * width, 8)
            for i in range(n):
                stride = s if i == 0 else 1
                blocks.append(InvertedResidual(in_ch, out_ch, stride, t, acts))
                in_ch = out_ch
                reduction *= stride
            self.feature_info.append(dict(num_chs=out_ch, reduction=reduction, module=f"blocks.{len(blocks) - 1}"))
        self.blocks = nn.Sequential(*blocks)

        self.num_features = last_channels or make_divisible(1280 * max(1.0, width), 8)
        act_l, e_l = acts.site("last", self.num_features, conv_in=in_ch)
        self.conv_head = ConvBNAct(in_ch, self.num_features, 1, act=act_l, expansion=e_l)
        self.feature_info.append(dict(num_chs=self.num_features, reduction=reduction, module="conv_head"))

        if dropout is None:
            dropout = 0.1 if width <= 0.35 else 0.2
        self.drop_rate = float(dropout)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(self.drop_rate)
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.num_classes = num_classes
        _init_weights(self)
        set_fuse_bn_act(self, fuse_bn_act)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_head(self.blocks(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)
        return x if pre_logits else self.classifier(self.dropout(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs, unit BN, small-normal linears (torchvision's MobileNetV2 recipe).

    Modules that come from dyrelu (DY-ReLU hyper functions etc.) keep their own init.
    """
    from dyrelu import DyReLU

    skip = set()
    for m in model.modules():
        if isinstance(m, DyReLU):
            skip.update(id(p) for p in m.modules())
    for m in model.modules():
        if id(m) in skip:
            continue
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m is getattr(model, "classifier", None):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _mbv2(width: float, act: Any, num_classes: int, **kwargs) -> MobileNetV2:
    return MobileNetV2(width=width, act=act, num_classes=num_classes, **kwargs)


@register_model
def mbv2_035(act: Any = "relu", num_classes: int = 1000, **kwargs) -> MobileNetV2:
    """MobileNetV2 x0.35 (dropout 0.1). kwargs: positions, dropout, dynamic_stem_last, maxout_sites, hyper_sizing,
    hyper_min, fuse_bn_act."""
    return _mbv2(0.35, act, num_classes, **kwargs)


@register_model
def mbv2_050(act: Any = "relu", num_classes: int = 1000, **kwargs) -> MobileNetV2:
    """MobileNetV2 x0.5 (dropout 0.2)."""
    return _mbv2(0.5, act, num_classes, **kwargs)


@register_model
def mbv2_075(act: Any = "relu", num_classes: int = 1000, **kwargs) -> MobileNetV2:
    """MobileNetV2 x0.75 (dropout 0.2)."""
    return _mbv2(0.75, act, num_classes, **kwargs)


@register_model
def mbv2_100(act: Any = "relu", num_classes: int = 1000, **kwargs) -> MobileNetV2:
    """MobileNetV2 x1.0 (dropout 0.2)."""
    return _mbv2(1.0, act, num_classes, **kwargs)

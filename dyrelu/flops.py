"""Honest complexity counts for networks with DY-ReLU, on top of fvcore.

fvcore counts one fused multiply-add as one flop (= one MAdd) for conv / linear / matmul, and by
default skips elementwise ops. That is the convention of the papers (MobileNetV2's 300 M, ResNet-50's
3.86 G) for static networks, but it hides most of what DY-ReLU costs: the global pooling, the
coefficient normalisation, the K-segment piecewise apply and DY-ReLU-C's spatial attention.

Convention of :func:`count_complexity` ("madds"):

* every conv / linear / matmul / einsum in the network: one MAdd per multiply-accumulate (fvcore);
* BatchNorm: not counted (it folds into the conv before it at inference; fvcore would count 2/element);
* plain activations (ReLU, h-swish, PReLU, Maxout's max ...), residual sums, upsampling: not counted,
  as in the papers' tables -- reported separately under ``uncounted``;
* inside *dynamic* modules (``DYNAMIC_SCOPE``: DyReLU, SE+ReLU, SE blocks) every op is counted with
  these per-element costs (elements of the output unless noted):

    mean / sum / adaptive_avg_pool     1 per INPUT element (one add each)
    mul                                 1 (a multiply; an add/sub that consumes a mul's result is the
                                          second half of that multiply-add and costs 0)
    add, sub, rsub, div                 1 (0 when fused with a preceding mul, see above)
    maximum, minimum, clamp, relu, ...  1 (one compare-select)
    sigmoid, hardsigmoid, tanh, exp     1
    softmax                             3 (exp, sum, divide)

  So DY-ReLU-B with K segments on an N x C x H x W map costs C*H*W (pool) + K*C*H*W (a_k x + b_k)
  + (K-1)*C*H*W (running max) + its two FCs + O(KC) for the normalisation; DY-ReLU-C adds its 1x1
  conv (C*H*W), 6*H*W for the attention (z / tau, softmax, x gamma, clamp) and the scaling (C*H*W).

``madds_paper`` is the paper's convention (it reproduces Table 4's DY-ReLU MAdds within ~1 %):
conv/linear MACs plus only the multiplies inside the dynamic modules -- K per element for the K
segments (each a_k x + b_k is one multiply-add), 1 for DY-ReLU-C's pi scaling or SE's gating;
pooling, the max over segments, the normalisation's adds and the attention's softmax are free.

Counting runs in eval mode, batch 1, without gradients, with every DyReLU forced to its reference
path (``impl="reference"``; the fused path may hide inside a custom autograd Function fvcore
cannot see into). The model's modes and impls are restored afterwards.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .core import DyReLU

__all__ = [
    "count_complexity",
    "elementwise_handles",
    "DYNAMIC_SCOPE",
    "BASE_OPS",
    "reference_impl",
]

#: fvcore ops that are counted everywhere in the network (MACs)
BASE_OPS = ("aten::_convolution", "aten::addmm", "aten::linear", "aten::matmul", "aten::mm", "aten::bmm",
            "aten::einsum")


def _dynamic_scope_types() -> tuple:
    types: List[type] = [DyReLU]
    try:
        from .registry import SEReLU

        types.append(SEReLU)
    except ImportError:  # pragma: no cover - registry is part of the package
        pass
    import sys

    if "timm" in sys.modules:  # timm's SE blocks (MobileNetV3); dyrelu itself does not import timm
        from timm.layers import SEModule, SqueezeExcite

        types.extend([SEModule, SqueezeExcite])
    return tuple(types)


#: module types whose every op is counted (input-dependent gates): DyReLU, SEReLU, and timm's
#: SEModule / SqueezeExcite when timm is loaded (resolved at each count_complexity call)
DYNAMIC_SCOPE: tuple = _dynamic_scope_types()


def _numel(value) -> int:
    t = value.type()
    try:
        sizes = t.sizes()
    except RuntimeError:
        return 0
    if sizes is None:
        return 0
    n = 1
    for s in sizes:
        n *= int(s) if s is not None else 1
    return n


def _is_tensor(value) -> bool:
    return value.type().kind() == "TensorType"


def _out_elems(scale: float = 1.0):
    def handle(inputs, outputs) -> float:
        return scale * _numel(outputs[0])

    return handle


def _in_elems(scale: float = 1.0):
    def handle(inputs, outputs) -> float:
        return scale * _numel(inputs[0])

    return handle


def _add_like(inputs, outputs) -> float:
    """add/sub: free when one operand was produced by a mul (that mul already paid for the MAdd)."""
    for v in inputs[:2]:
        if _is_tensor(v) and v.node().kind() in ("aten::mul", "aten::mul_"):
            return 0.0
    return float(_numel(outputs[0]))


def elementwise_handles() -> Dict[str, Callable]:
    """fvcore op handles for the elementwise ops (see the module docstring for the costs)."""
    one = _out_elems(1.0)
    h: Dict[str, Callable] = {}
    for op in ("mul", "div", "maximum", "minimum", "clamp", "clamp_min", "clamp_max", "relu", "hardtanh",
               "hardswish", "leaky_relu", "prelu", "rrelu", "rrelu_with_noise", "gelu", "silu", "sigmoid",
               "hardsigmoid", "tanh", "exp", "where", "abs", "neg", "reciprocal", "sqrt", "rsqrt"):
        h[f"aten::{op}"] = one
        h[f"aten::{op}_"] = one
    for op in ("add", "sub", "rsub"):
        h[f"aten::{op}"] = _add_like
        h[f"aten::{op}_"] = _add_like

    def maxmin(inputs, outputs) -> float:  # binary max/min: per output; reduction max: per input
        if len(inputs) >= 2 and _is_tensor(inputs[1]):
            return float(_numel(outputs[0]))
        return float(_numel(inputs[0]))

    h["aten::max"] = maxmin
    h["aten::min"] = maxmin
    for op in ("mean", "sum", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "avg_pool2d"):
        h[f"aten::{op}"] = _in_elems(1.0)
    for op in ("softmax", "_softmax", "log_softmax"):
        h[f"aten::{op}"] = _out_elems(3.0)
    return h


def _import_fvcore_nn():
    """fvcore.nn, imported lazily (dyrelu needs torch only). Importing it runs torch.jit.script on
    fvcore's focal loss, which torch >= 2.10 answers with a FutureWarning on every run; the call is
    fvcore's, not ours, so exactly that warning is silenced, once, around the import."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        import fvcore.nn
    return fvcore.nn


def _fvcore_defaults() -> Dict[str, Callable]:
    _import_fvcore_nn()
    from fvcore.nn.flop_count import _DEFAULT_SUPPORTED_OPS

    return dict(_DEFAULT_SUPPORTED_OPS)


# fvcore's own handles kept for ops that are not MACs (reported under "uncounted" outside the scope)
_FVCORE_KEEP = ("aten::upsample_nearest2d", "aten::upsample_bilinear2d", "aten::grid_sampler", "aten::group_norm",
                "aten::layer_norm", "aten::instance_norm")

_SHAPE_OPS = ("aten::pad", "aten::expand_as", "aten::unflatten", "aten::transpose", "aten::view", "aten::type_as",
              "aten::select", "aten::slice", "aten::unsqueeze", "aten::squeeze", "aten::to", "aten::split",
              "aten::split_with_sizes", "aten::unbind", "aten::stack", "aten::repeat", "aten::dropout", "aten::feature_dropout",
              "aten::max_pool2d",
              "aten::zeros_like", "aten::ones_like", "aten::detach", "aten::alias", "aten::lift_fresh",
              "aten::scalar_tensor", "aten::size", "aten::numel", "aten::_unsafe_view", "aten::expand",
              "aten::contiguous", "aten::clone", "aten::chunk", "aten::flatten", "aten::reshape", "aten::cat",
              "prim::PythonOp")


@contextlib.contextmanager
def reference_impl(model: nn.Module):
    """Temporarily set ``impl="reference"`` on every DyReLU of ``model``."""
    saved = [(m, m.impl) for m in model.modules() if isinstance(m, DyReLU)]
    try:
        for m, _ in saved:
            m.impl = "reference"
        yield model
    finally:
        for m, impl in saved:
            m.impl = impl


def _classifier_params(model: nn.Module) -> int:
    getter = getattr(model, "get_classifier", None)
    head = getter() if callable(getter) else None
    if head is None:
        for name in ("classifier", "fc", "head"):
            m = getattr(model, name, None)
            if isinstance(m, nn.Linear):
                head = m
                break
    return sum(p.numel() for p in head.parameters()) if isinstance(head, nn.Module) else 0


def _scope_pred(scope) -> Callable[[nn.Module], bool]:
    if scope is None:
        scope = _dynamic_scope_types()
    if callable(scope) and not isinstance(scope, type):
        return scope
    types = tuple(scope) if isinstance(scope, (tuple, list)) else (scope,)
    return lambda m: isinstance(m, types)


def count_complexity(
    model: nn.Module,
    input_size: Union[int, Sequence[int]] = (224, 224),
    in_chans: int = 3,
    scope: Any = None,
    inputs: Optional[Tuple[torch.Tensor, ...]] = None,
) -> Dict[str, Any]:
    """Params and MAdds of ``model`` for one ``in_chans x H x W`` image (batch 1, eval mode).

    ``input_size``: H, (H, W), (C, H, W) or (N, C, H, W) (N is ignored: always one image).

    Returns a dict:
      params (int): every parameter; params_no_classifier (int): without the final linear layer
      (the paper's ResNet rows exclude it);
      madds (int): the convention of the module docstring = madds_base + madds_dynamic;
      madds_base: conv/linear/matmul MACs in the whole network (what fvcore counts by default minus BN);
      madds_dynamic: every other op inside DYNAMIC_SCOPE modules (pooling, apply, normalisation, attention);
      uncounted: {op: count} of elementwise ops outside the scope (BN, ReLU, residual adds, ...),
        with the same per-element costs, for reference; fvcore_default: fvcore's own total (incl. BN);
      by_module: {module name: madds} (same convention) for every module with nonzero count;
      by_operator: {op: madds} (same convention).
    """
    FlopCountAnalysis = _import_fvcore_nn().FlopCountAnalysis

    if isinstance(input_size, int):
        input_size = (input_size, input_size)
    input_size = tuple(int(v) for v in input_size)
    if len(input_size) == 3:  # (C, H, W)
        in_chans, input_size = input_size[0], input_size[1:]
    elif len(input_size) == 4:  # (N, C, H, W): counted for one image
        in_chans, input_size = input_size[1], input_size[2:]
    elif len(input_size) != 2:
        raise ValueError(f"input_size={input_size}: give H, (H, W), (C, H, W) or (N, C, H, W)")
    if inputs is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        inputs = (torch.zeros(1, in_chans, int(input_size[0]), int(input_size[1]), device=device, dtype=dtype),)
    params = sum(p.numel() for p in model.parameters())
    in_scope = _scope_pred(scope)

    was_training = model.training
    model.eval()
    try:
        with reference_impl(model), torch.no_grad():
            fca = FlopCountAnalysis(model, inputs)
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            fca.set_op_handle(**elementwise_handles())
            fca.set_op_handle(**{"aten::batch_norm": _out_elems(2.0)})
            defaults = _fvcore_defaults()
            fca.set_op_handle(**{op: defaults[op] for op in _FVCORE_KEEP if op in defaults})
            for op in _SHAPE_OPS:
                fca._ignored_ops.add(op)
            per_mod = fca.by_module_and_operator()
    finally:
        model.train(was_training)

    # names of the dynamic-scope modules, and the top-most ones among them
    names = {m: n for n, m in model.named_modules()}
    scoped = [n for m, n in names.items() if in_scope(m)]
    scoped_set = set(scoped)

    def inside(name: str, anc: str) -> bool:
        return anc == "" or name == anc or name.startswith(anc + ".")

    def is_in_scope(name: str) -> bool:
        return any(inside(name, s) for s in scoped_set)

    top_scoped = [s for s in scoped if not any(o != s and inside(s, o) for o in scoped)]

    def split(counter: Counter) -> Tuple[float, Counter]:
        base = sum(v for k, v in counter.items() if k in _BASE_KEYS)
        elem = Counter({k: v for k, v in counter.items() if k not in _BASE_KEYS})
        return base, elem

    root = per_mod.get("", Counter())
    base_total, elem_all = split(root)
    dyn = Counter()
    for s in top_scoped:
        dyn.update(split(per_mod.get(s, Counter()))[1])
    uncounted = Counter(elem_all)
    uncounted.subtract(dyn)
    uncounted = Counter({k: int(v) for k, v in uncounted.items() if v})

    by_module: Dict[str, int] = {}
    for name, counter in per_mod.items():
        b, e = split(counter)
        if is_in_scope(name):
            val = b + sum(e.values())
        else:
            val = b + sum(sum(split(per_mod.get(s, Counter()))[1].values()) for s in top_scoped if inside(s, name))
        if val:
            by_module[name] = int(val)
    by_operator = Counter({k: int(v) for k, v in root.items() if k in _BASE_KEYS})
    for k, v in dyn.items():
        by_operator[k] += int(v)

    madds_dynamic = int(sum(dyn.values()))
    # what fvcore reports with its default handles: MACs + BN (2/element) + its pooling/upsample handles
    fvcore_default = int(base_total + sum(v for k, v in elem_all.items() if k in _FVCORE_DEFAULT_KEYS))
    return dict(
        params=int(params),
        params_no_classifier=int(params - _classifier_params(model)),
        madds=int(base_total) + madds_dynamic,
        madds_base=int(base_total),
        madds_dynamic=madds_dynamic,
        madds_paper=int(base_total) + int(dyn.get("mul", 0)),
        uncounted=dict(uncounted),
        fvcore_default=fvcore_default,
        by_module=by_module,
        by_operator=dict(by_operator),
    )


# fvcore names operators in its Counters without the "aten::" prefix ("conv" for aten::_convolution)
_BASE_KEYS = {op.split("::", 1)[1] for op in BASE_OPS} | {"conv"}
_FVCORE_DEFAULT_KEYS = {"batch_norm", "adaptive_avg_pool2d", "upsample_nearest2d", "upsample_bilinear2d",
                        "grid_sampler", "group_norm", "layer_norm", "instance_norm"}

"""dyrelu/dynamics.py: the measures of how dynamic a DY-ReLU is, on hand-made coefficients (no training)."""
from __future__ import annotations

import pytest
import torch

from dyrelu import DyReLU, build_act
from dyrelu.dynamics import LayerDynamics, dynamics_of, module_dynamics

#: every measure that is 0 for a layer at its initial function, the same for every image
DYNAMICS = ("share_slope_margin", "share_intercept_gt_0.05", "share_abs_intercept_gt_0.05", "a_spread", "b_spread",
            "a_spread_rel", "b_spread_rel", "a_dist", "b_dist", "band_x_pos", "band_x_neg")
PI = ("pi_flatness", "pi_input_var")


def _inputs(n=8, c=12):
    """Images whose pooled contexts differ a lot (scaled, shifted)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, 6, 5, generator=g)
    return x * torch.linspace(0.3, 3.0, n).view(n, 1, 1, 1) + torch.randn(n, c, 1, 1, generator=g)


@pytest.mark.parametrize("variant", ["A", "B", "C"])
def test_every_measure_is_zero_with_fc2_zero(variant):
    m = DyReLU(12, variant=variant)  # hyper_init="zero": FC2 = 0
    if m.spatial is not None:
        torch.nn.init.zeros_(m.spatial.weight)  # a flat attention: pi = 1/3 everywhere
    r = module_dynamics(m, _inputs())
    for key in DYNAMICS + (PI if variant == "C" else ()):
        assert r[key] == 0, key
    assert r["slope_diff_mean"] == 1.0  # ReLU's own |1 - 0|


@pytest.mark.parametrize("variant", ["A", "B", "C"])
def test_every_measure_is_clearly_positive_with_random_fc2(variant):
    torch.manual_seed(0)
    m = DyReLU(12, variant=variant, reduction=2, hyper_init="random")
    with torch.no_grad():
        m.fc2.weight.mul_(4.0)  # residuals spread over most of their range
    r = module_dynamics(m, _inputs())
    for key in DYNAMICS + (PI if variant == "C" else ()):
        assert r[key] > 1e-3, (key, r[key])
    if variant != "C":
        assert r["pi_flatness"] is None and r["pi_input_var"] is None


def test_static_twin_has_no_spread_and_a_distance_once_its_constants_move():
    twin = build_act("dyrelu_c_static", 12)
    x = _inputs()
    r = module_dynamics(twin, x)
    assert all(r[k] == 0 for k in DYNAMICS)  # at its start: the initial function
    assert r["pi_input_var"] > 1e-3  # C's twin keeps an input-dependent attention
    with torch.no_grad():
        twin.fc2.bias.uniform_(-2.0, 2.0, generator=torch.Generator().manual_seed(1))
    r = module_dynamics(twin, x)
    for key in ("a_spread", "b_spread", "a_spread_rel", "b_spread_rel", "band_x_pos", "band_x_neg"):
        assert r[key] == 0, key
    assert r["a_dist"] > 0.1 and r["b_dist"] > 0.05 and r["share_slope_margin"] > 0


def test_the_margin_keeps_the_initial_function_at_zero_where_the_unmargined_count_is_half():
    """alpha = (1, 0) with 1e-3 of noise: the paper's unmargined a < 0 or a > 1 counts about 3/4 of
    the units (the noise crosses 1 or 0); the margined share is 0."""
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([1.0, 0.0]).view(1, 2, 1) + 1e-3 * torch.randn(50, 2, 16, generator=g)
    b = 1e-3 * torch.randn(50, 2, 16, generator=g)
    assert float(((a < 0) | (a > 1)).any(dim=1).float().mean()) > 0.5
    r = dynamics_of(a, b)
    assert r["share_slope_margin"] == 0 and r["share_intercept_gt_0.05"] == 0
    # the boundaries: a > 1.05 and a < -0.05 count, 1.04 and -0.04 do not
    a = torch.tensor([[1.04, -0.04], [1.06, 0.0], [1.0, -0.06], [0.5, 0.5]]).view(4, 2, 1)
    b = torch.tensor([[0.04, 0.0], [0.0, 0.06], [-0.06, 0.0], [0.0, 0.0]]).view(4, 2, 1)
    r = dynamics_of(a, b)
    assert r["share_slope_margin"] == 0.5 and r["share_intercept_gt_0.05"] == 0.25
    assert r["share_abs_intercept_gt_0.05"] == 0.5


def test_definitions_on_hand_made_coefficients():
    # two images, K = 2, two channels; lambda_a = 1, lambda_b = 0.5, alpha = (1, 0), beta = 0
    a = torch.tensor([[[1.2, 1.0], [0.0, 0.0]],
                      [[1.4, 1.0], [-0.2, 0.0]]])  # (N, K, C)
    b = torch.tensor([[[0.1, 0.0], [0.0, 0.0]],
                      [[0.3, 0.0], [0.0, 0.0]]])
    r = dynamics_of(a, b)
    # channel 0: a^1 in {1.2, 1.4} (std 0.1), a^2 in {0, -0.2} (std 0.1); channel 1 static
    assert r["a_spread"] == pytest.approx(0.05) and r["a_spread_rel"] == pytest.approx(0.05)
    assert r["b_spread"] == pytest.approx(0.025) and r["b_spread_rel"] == pytest.approx(0.05)
    # mean a: channel 0 (1.3, -0.1), channel 1 (1, 0): |.3| + |.1| over 4 entries
    assert r["a_dist"] == pytest.approx(0.1) and r["b_dist"] == pytest.approx(0.05)
    # y(+0.5) = max(0.5 a1 + b1, 0.5 a2 + b2): channel 0 {0.7, 1.0}; channel 1 {0.5, 0.5}
    # 10-90 % range over two images: 0.8 * 0.3 = 0.24 and 0; the median of (0.24, 0) is 0.12
    assert r["band_x_pos"] == pytest.approx(0.12)
    # y(-0.5): channel 0 max(-0.6 + 0.1, 0) = 0 and max(-0.7 + 0.3, 0.1) = 0.1; channel 1 {0, 0}
    assert r["band_x_neg"] == pytest.approx(0.04)


def test_pi_measures_on_hand_made_maps():
    # two images, two positions: image 1 flat (1/3, 1/3), image 2 peaked (0.5, 1/6)
    pi = torch.tensor([[1 / 3, 1 / 3], [0.5, 1 / 6]]).view(2, 1, 2, 1)
    a = torch.tensor([1.0, 0.0]).view(1, 2, 1).expand(2, 2, 3)
    r = dynamics_of(a, torch.zeros_like(a), pi)
    assert r["pi_flatness"] == pytest.approx((0 + 1 / 6) / 2)  # std over positions, mean over images
    # position 0: mean 5/12, std 1/12 -> 0.2; position 1: mean 1/4, std 1/12 -> 1/3
    assert r["pi_input_var"] == pytest.approx((0.2 + 1 / 3) / 2)
    assert LayerDynamics.pi_input_var_of(pi) == pytest.approx(r["pi_input_var"])  # train_health.py's per-batch one
    same = torch.tensor([[0.5, 1 / 6], [0.5, 1 / 6]]).view(2, 1, 2, 1)  # peaked, the same for both images
    r = dynamics_of(a, torch.zeros_like(a), same)
    assert r["pi_input_var"] == 0 and r["pi_flatness"] > 0


def test_batches_accumulate_to_the_whole():
    torch.manual_seed(3)
    m = DyReLU(8, variant="C", reduction=2, hyper_init="random")
    x = _inputs(10, 8)
    acc = LayerDynamics.for_module(m)
    with torch.no_grad():
        for part in x.split(3):
            co = m.coefficients(part)
            acc.update(co.a, co.b, co.pi)
    split, whole = acc.result(), module_dynamics(m, x)
    assert split.keys() == whole.keys()
    for key, value in whole.items():
        assert split[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key

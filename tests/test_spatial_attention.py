"""DY-ReLU-C's spatial attention: the collapse mechanism, the logit normalisation that prevents it,
and act.tau reaching the model."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dyrelu
from dyrelu import DyReLU


def _features(seed=0, n=8, c=16, hw=16):
    """Inputs with spatial structure (a smooth random field per channel), like a conv's output."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, c, 4, 4, generator=g)
    return nn.functional.interpolate(low, size=(hw, hw), mode="bilinear", align_corners=False) \
        + 0.1 * torch.randn(n, c, hw, hw, generator=g)


def _pi(m: DyReLU, x: torch.Tensor) -> torch.Tensor:
    return m.coefficients(x).pi.flatten(1)


def _scaled(m: DyReLU, factor: float) -> DyReLU:
    m = copy.deepcopy(m)
    with torch.no_grad():
        m.spatial.weight.mul_(factor)
    return m


def test_unnormalised_logits_switch_positions_off_when_the_spatial_weights_grow():
    """The mechanism behind the collapse: without a normalisation the softmax's real temperature is
    tau / |w|, so growing spatial weights switch most positions off (pi < 0.05)."""
    torch.manual_seed(0)
    m = DyReLU(16, "C", spatial_norm="none")
    x = _features()
    with torch.no_grad():
        m.spatial.weight.copy_(torch.randn_like(m.spatial.weight))  # |w| ~ 4: z spreads by several units
    off = lambda mod: (_pi(mod, x) < 0.05).float().mean().item()  # noqa: E731
    assert off(m) < 0.2
    assert off(_scaled(m, 10.0)) > 0.5


@pytest.mark.parametrize("norm", ["bn", "std"])
def test_normalised_logits_do_not_depend_on_the_spatial_weights_scale(norm):
    torch.manual_seed(0)
    m = DyReLU(16, "C", spatial_norm=norm)
    x = _features()
    with torch.no_grad():
        m.spatial.weight.copy_(torch.randn_like(m.spatial.weight))
    pi = _pi(m, x)
    torch.testing.assert_close(_pi(_scaled(m, 10.0), x), pi, atol=1e-5, rtol=1e-4)
    assert (pi < 0.05).float().mean().item() < 0.2


def test_spatial_norm_is_only_for_variant_c_and_checked():
    assert DyReLU(8, "B", spatial_norm="bn").spatial_bn is None
    with pytest.raises(dyrelu.errors.BadValueError, match="spatial_norm='batch' is not one of"):
        DyReLU(8, "C", spatial_norm="batch")


@pytest.mark.parametrize("norm", ["none", "bn", "std"])
def test_every_path_computes_the_same_attention(norm):
    """Reference, fused, fused BN + DY-ReLU and the prepared (inference) module agree for each
    normalisation, in training (values and gradients) and in evaluation."""
    from dyrelu.fused.bn_act import BNDyReLU

    torch.manual_seed(1)
    bn, act = nn.BatchNorm2d(16), DyReLU(16, "C", spatial_norm=norm, hyper_init="random")
    with torch.no_grad():
        act.spatial.weight.mul_(20.0)  # a peaky pi, so a wrong path shows
    ref = nn.Sequential(copy.deepcopy(bn), copy.deepcopy(act))
    ref[1].impl = "reference"
    fused = nn.Sequential(copy.deepcopy(bn), copy.deepcopy(act))
    pair = BNDyReLU(copy.deepcopy(bn), copy.deepcopy(act))
    x = _features(seed=2).requires_grad_(True)
    g = torch.randn(x.shape)
    outs = []
    for mod in (ref, fused, pair):
        y = mod(x)
        gx, gw = torch.autograd.grad(y, [x, mod[1].spatial.weight if isinstance(mod, nn.Sequential) else mod.act.spatial.weight], g)
        outs.append((y.detach(), gx, gw))
    for y, gx, gw in outs[1:]:
        torch.testing.assert_close(y, outs[0][0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(gx, outs[0][1], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(gw, outs[0][2], atol=1e-4, rtol=1e-4)
    ref.eval()
    prepared = dyrelu.prepare_for_inference(copy.deepcopy(ref))
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), ref(x), atol=1e-5, rtol=1e-4)


def test_act_tau_reaches_the_model_and_a_contradicting_schedule_is_an_error(tmp_path, monkeypatch):
    """act.tau=100 is what every DY-ReLU-C holds while it trains (the schedule used to overwrite it
    with 10 at each epoch, silently); a schedule start that contradicts it stops the run."""
    from engine.validate import ConfigError
    from runs import train_in_process

    tiny = ["model=mbv2_035", "act=dyrelu_c", "data.train_per_class=2", "data.val_per_class=1",
            "data.batch_size=10", "data.num_workers=0", "data.image_size=36", "data.crop_size=32",
            "data.val_resize=32", "trainer.progress=false", "trainer.device=cpu", "logger=csv",
            "trainer.max_epochs=1", "trainer.limit_train_batches=1"]
    _, model = train_in_process(monkeypatch, tmp_path / "a", [*tiny, "act.tau=100"])
    assert {float(m.tau) for m in model.modules() if isinstance(m, DyReLU) and m.variant == "C"} == {100.0}
    with pytest.raises(ConfigError, match="contradicts act.tau=100"):
        train_in_process(monkeypatch, tmp_path / "b", [*tiny, "act.tau=100", "trainer.tau_schedule.start=10"])

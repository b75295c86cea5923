"""trainer.dyrelu_warmup_epochs: every DY-ReLU's lambdas ramp from 0 to their built values, step by step."""
import pytest
import torch
from omegaconf import OmegaConf

import dyrelu
from engine.residual_warmup import ResidualWarmup


def _model():
    return torch.nn.Sequential(dyrelu.DyReLU(8, "B", lambda_a=1.0, lambda_b=0.5),
                               dyrelu.build_act("dyrelu_c_static", 8), torch.nn.ReLU())


def _lambdas(model):
    return [(float(m.lambda_a), float(m.lambda_b)) for m in model.modules() if isinstance(m, dyrelu.DyReLU)]


def test_ramp_reaches_the_built_values_and_stops():
    model = _model()
    warmup = ResidualWarmup(model, steps=4)
    warmup(0)
    assert _lambdas(model) == [(0.0, 0.0), (0.0, 0.0)]
    warmup(2)
    assert _lambdas(model) == [(0.5, 0.25), (0.5, 0.25)]
    warmup(4)
    assert _lambdas(model) == [(1.0, 0.5), (1.0, 0.5)] and warmup.done
    model[0].lambda_a.fill_(3.0)  # after the ramp the buffers are the model's own again
    warmup(5)
    assert float(model[0].lambda_a) == 3.0


def test_a_resumed_run_continues_the_ramp_from_its_step():
    fresh = _model()
    warmup = ResidualWarmup(fresh, steps=10)  # targets from the built model, before a checkpoint loads
    saved = _model()
    ResidualWarmup(saved, steps=10)(3)
    fresh.load_state_dict(saved.state_dict())  # a checkpoint written mid-ramp holds the reduced lambdas
    warmup(6)
    assert _lambdas(fresh)[0] == pytest.approx((0.6, 0.3))


def test_from_config_is_off_without_epochs_or_dyrelu():
    cfg = OmegaConf.create({"trainer": {"dyrelu_warmup_epochs": 0}})
    assert ResidualWarmup.from_config(cfg, _model(), steps_per_epoch=10) is None
    cfg.trainer.dyrelu_warmup_epochs = 1.5
    assert ResidualWarmup.from_config(cfg, _model(), steps_per_epoch=10).steps == 15
    assert ResidualWarmup.from_config(cfg, torch.nn.Sequential(torch.nn.ReLU()), steps_per_epoch=10) is None

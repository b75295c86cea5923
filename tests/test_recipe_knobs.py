"""Engine parts tested alone: the two recipe knobs of the DY-ReLU training-health work
(precise BN statistics; a param group of their own for DY-ReLU's hyper functions) and the
pooling swap of trainer.deterministic."""
from __future__ import annotations

import torch
from omegaconf import OmegaConf
from torch import nn

import dyrelu
from engine.optim import build_optimizer, build_scheduler
from engine.precise_bn import recalibrate_bn


def _optim_cfg(**over):
    base = dict(name="sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4, base_batch_size=256,
                scale_lr=False, decay_norm_and_bias=True, hyper_lr_scale=1.0, spatial_lr_scale=None,
                hyper_weight_decay=None)
    return OmegaConf.create({**base, **over})


def _sched_cfg(**over):
    base = dict(name="cosine", warmup_epochs=1, warmup_lr=1e-3, min_lr=0.0, milestones=[], gamma=0.1)
    return OmegaConf.create({**base, **over})


def _net():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), dyrelu.DyReLU(8, variant="C"),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _hyper_ids(model):
    return {id(p) for m in model.modules() if isinstance(m, dyrelu.DyReLU) for p in m.parameters()}


def test_hyper_functions_get_their_own_lr_scale_and_decay_through_the_schedule():
    model = _net()
    hyper = _hyper_ids(model)
    assert len(hyper) == 5  # fc1 (w, b), fc2 (w, b), spatial (w)
    opt = build_optimizer(model, _optim_cfg(hyper_lr_scale=0.1, hyper_weight_decay=0.0), global_batch=256)
    sched = build_scheduler(opt, _sched_cfg(), epochs=2, steps_per_epoch=10)
    groups = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert set(groups) == {id(p) for p in model.parameters()}
    for p in model.parameters():
        g = groups[id(p)]
        assert g["weight_decay"] == (0.0 if id(p) in hyper else 1e-4)
    base = opt.param_groups[0]
    assert not any(id(p) in hyper for p in base["params"])
    hyper_group = next(g for g in opt.param_groups if g["lr_scale"] != 1.0)
    for step in (0, 5, 10, 15):  # warmup, then cosine: the ratio holds at every step
        sched.step_update(step)
        assert abs(hyper_group["lr"] - 0.1 * base["lr"]) < 1e-12, step
    assert base["lr"] > 1e-3  # the schedule really moved it


def test_spatial_convs_get_their_own_lr_scale():
    model = _net()
    spatial = {id(m.spatial.weight) for m in model.modules() if isinstance(m, dyrelu.DyReLU)}
    opt = build_optimizer(model, _optim_cfg(spatial_lr_scale=0.1), global_batch=256)
    scale_of = {id(p): g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    for p in model.parameters():  # fc1/fc2 keep hyper_lr_scale (1.0), only the spatial conv moves
        assert scale_of[id(p)] == (0.1 if id(p) in spatial else 1.0)
    # Unset, it follows hyper_lr_scale.
    opt = build_optimizer(model, _optim_cfg(hyper_lr_scale=0.5, spatial_lr_scale=None), global_batch=256)
    assert {g["lr_scale"] for g in opt.param_groups} == {1.0, 0.5}
    assert all(g["lr_scale"] == 0.5 for g in opt.param_groups for p in g["params"] if id(p) in spatial)


def test_default_hyper_knobs_keep_todays_optimizer():
    model = _net()
    opt = build_optimizer(model, _optim_cfg(), global_batch=256)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 1e-4
    # spatial_lr_scale only splits the groups of a model that has spatial convs (checkpoints of A/B
    # and static runs keep their one group)
    b_net = nn.Sequential(nn.Conv2d(3, 8, 3), dyrelu.DyReLU(8, variant="B"))
    assert len(build_optimizer(b_net, _optim_cfg(spatial_lr_scale=0.1), global_batch=256).param_groups) == 1
    sched = build_scheduler(opt, _sched_cfg(warmup_epochs=0), epochs=2, steps_per_epoch=10)
    assert opt.param_groups[0]["lr"] == 0.1
    # Excluding norms and biases from decay still works with a scaled hyper group.
    opt = build_optimizer(model, _optim_cfg(decay_norm_and_bias=False, hyper_lr_scale=2.0), global_batch=256)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert decay_of[id(p)] == (0.0 if p.ndim <= 1 else 1e-4), name
    del sched


def test_precise_bn_sets_population_statistics_of_the_current_weights():
    torch.manual_seed(0)
    model = _net().eval()
    batches = [torch.randn(4, 3, 10, 10) * 3 + 2 for _ in range(5)]
    mean_buf, var_buf = model[1].running_mean, model[1].running_var
    n = recalibrate_bn(model, iter(batches), num_batches=5)
    assert n == 1
    assert not model.training  # the mode is restored
    assert model[1].running_mean is mean_buf and model[1].running_var is var_buf  # updated in place
    with torch.no_grad():
        feats = torch.cat([model[0](b) for b in batches])  # equal-size batches: population = pooled
    assert torch.allclose(mean_buf, feats.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(var_buf, feats.var((0, 2, 3), unbiased=False), rtol=1e-3, atol=1e-4)


def test_deterministic_pooling_gives_the_same_numbers_and_keys():
    from engine.determinism import GlobalAvgPool2d, use_deterministic_pooling
    from models import build_model

    torch.manual_seed(0)
    model = build_model("mbv2_035", act="dyrelu_b", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(x)
        use_deterministic_pooling(model)
        after = model(x)
    assert any(isinstance(m, GlobalAvgPool2d) for m in model.modules())
    assert not any(isinstance(m, nn.AdaptiveAvgPool2d) for m in model.modules())
    assert list(model.state_dict()) == keys
    assert torch.allclose(before, after, atol=1e-6)

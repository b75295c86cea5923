"""DY-ReLU-C's temperature and the paper's recipe reach the backbone (act) and the pose head (head_act)
each from its own config key; recipe=paper is one override for both."""
from __future__ import annotations

import pytest
import torch
from runs import compose

from dyrelu import DyReLU
from engine.loop import set_scheduled_tau, tau_at, tau_parts
from engine.validate import ConfigError, validate


def _build(cfg):
    from engine.tasks import build_task

    task = build_task(cfg)
    task.num_classes = 10
    return task.build_model()


def _taus(module):
    return {float(m.tau) for m in module.modules() if isinstance(m, DyReLU) and m.variant == "C"}


@pytest.fixture(scope="module")
def pose():
    """The bare task=kpt config and its model (built once: the model is only read or re-tau'd)."""
    cfg = compose(["task=kpt"])
    return cfg, _build(cfg)


def test_bare_kpt_is_dyrelu_c_in_backbone_and_head(pose):
    cfg, net = pose
    validate(cfg)
    assert cfg.act.name == "dyrelu_c" and cfg.head_act.name == "dyrelu_c"
    for part in (net.backbone, net.head):
        acts = [m for m in part.modules() if isinstance(m, DyReLU)]
        assert acts and all(m.variant == "C" for m in acts)
    assert [k for k, _ in tau_parts(cfg, net)] == ["act", "head_act"]


def test_recipe_paper_is_one_override_for_backbone_and_head():
    ours, paper = compose(["task=kpt"]), compose(["task=kpt", "recipe=paper"])
    validate(paper)
    for key in ("act", "head_act"):
        assert paper[key].tau == 10.0 and paper[key].hyper_init == "random"
        assert ours[key].tau == ours.recipe.tau and ours[key].hyper_init == ours.recipe.hyper_init
    assert paper.optim.spatial_lr_scale == 1.0 and ours.optim.spatial_lr_scale == ours.recipe.spatial_lr_scale
    assert paper.recipe.name == "paper" and ours.recipe.name == "ours"
    # an explicit key still wins over the recipe, in either part
    cfg = compose(["task=kpt", "recipe=paper", "head_act.tau=20"])
    assert cfg.act.tau == 10.0 and cfg.head_act.tau == 20
    # the classification default reads the same recipe
    cls = compose(["recipe=paper", "act=dyrelu_c"])
    assert cls.act.tau == 10.0 and cls.act.hyper_init == "random" and cls.optim.spatial_lr_scale == 1.0


def test_the_schedule_sets_each_part_from_its_own_tau(pose):
    cfg, net = pose
    cfg = cfg.copy()
    cfg.act.tau, cfg.head_act.tau = 30.0, 20.0
    cfg.trainer.tau_schedule.end = 1.0
    cfg.trainer.tau_schedule.end_epoch_frac = 0.5
    cfg.trainer.max_epochs = 10
    validate(cfg)
    assert set_scheduled_tau(cfg, net, 0) == {"tau": 30.0, "head_tau": 20.0}
    assert _taus(net.backbone) == {30.0} and _taus(net.head) == {20.0}
    assert tau_at(cfg, 0, 10, "head_act") == 20.0 and tau_at(cfg, 5, 10, "head_act") == 1.0
    assert set_scheduled_tau(cfg, net, 5) == {"tau": 1.0, "head_tau": 1.0}
    assert _taus(net) == {1.0}
    cfg.trainer.tau_schedule.end = None  # no schedule: nothing is set, nothing reported
    cfg.trainer.tau_schedule.start = None
    assert set_scheduled_tau(cfg, net, 0) == {} and _taus(net) == {1.0}


def test_a_start_that_contradicts_the_heads_tau_is_refused():
    cfg = compose(["task=kpt", "act.tau=10", "head_act.tau=30", "trainer.tau_schedule.start=10"])
    with pytest.raises(ConfigError, match=r"trainer.tau_schedule.start=10 contradicts head_act.tau=30"):
        validate(cfg)
    cfg = compose(["task=kpt", "act.tau=10", "head_act.tau=10", "trainer.tau_schedule.start=10"])
    validate(cfg)  # one start that is both parts' own tau


def test_a_classifier_is_all_act():
    cfg = compose(["act=dyrelu_c", "trainer.tau_schedule.end=5"])
    net = torch.nn.Sequential(DyReLU(4, variant="C"))
    assert tau_parts(cfg, net) == [("act", net)]
    assert set_scheduled_tau(cfg, net, 0) == {"tau": float(cfg.act.tau)}

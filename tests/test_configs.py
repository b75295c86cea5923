"""Every model x activation pair the paper uses composes from the configs and runs forward; the
composed config names what is built."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml

from runs import ROOT, compose, env

CLS_PAIRS = (
    [("mbv2_035", a) for a in ["relu", "dyrelu_a", "dyrelu_b", "dyrelu_c", "rrelu", "leaky_relu", "prelu",
                               "prelu_shared", "se_relu", "maxout", "relu6", "hswish"]]
    + [("mbv2_100", a) for a in ["relu", "dyrelu_b", "se_relu", "maxout"]]
    + [(m, a) for m in ["mbv2_050", "mbv2_075", "mbv3_large", "mbv3_small", "resnet10", "resnet18", "resnet34", "resnet50"]
       for a in ["relu", "dyrelu_b"]]
)
KPT_PAIRS = [("mbv2_050", b, h) for b in ["relu", "dyrelu_a", "dyrelu_b", "dyrelu_c"] for h in ["relu", "dyrelu_a", "dyrelu_b", "dyrelu_c"]] + [
    (m, a, a) for m in ["mbv2_100", "mbv3_large", "mbv3_small"] for a in ["relu", "dyrelu_c"]
]


def _build(cfg):
    from engine.tasks import build_task

    task = build_task(cfg)
    task.num_classes = 10
    return task.build_model().eval()


@pytest.mark.parametrize("model,act", CLS_PAIRS)
def test_cls_pair_composes_and_runs(model, act):
    cfg = compose([f"model={model}", f"act={act}", "data=imagenet", "data.root=/unused"])
    assert cfg.model.name == model and cfg.act.name == act
    net = _build(cfg)
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 10)


@pytest.mark.parametrize("model,act,head", KPT_PAIRS)
def test_kpt_pair_composes_and_runs(model, act, head):
    cfg = compose(["task=kpt", f"model={model}", f"act={act}", f"act@head_act={head}"])
    assert cfg.head_act.name == head and cfg.optim.name == "adam" and cfg.data.name == "coco_demo"
    net = _build(cfg)
    with torch.no_grad():
        out = net(torch.randn(1, 3, 128, 96))
    assert out.shape == (1, 17, 32, 24)


TASKS = sorted(p.stem for p in (ROOT / "configs" / "task").glob("*.yaml"))


@pytest.mark.parametrize("task", TASKS)
def test_the_composed_target_is_what_the_task_builds(task, monkeypatch):
    """``model._target_`` of the composed config is the function the engine calls to build the network."""
    from hydra.utils import get_method

    cfg = compose([f"task={task}"])
    target = cfg.model._target_
    module, _, name = target.rpartition(".")
    builder, calls = get_method(target), []

    def spy(*args, **kwargs):
        calls.append(builder(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(f"{module}.{name}", spy)
    net = _build(cfg)
    assert len(calls) == 1 and calls[0] is net


@pytest.mark.parametrize("task", TASKS)
def test_cfg_job_prints_the_target_that_is_built(task):
    """``python train.py task=<t> --cfg job`` shows the same ``_target_`` the engine instantiates."""
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), f"task={task}", "--cfg", "job"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    printed = yaml.safe_load(p.stdout)
    assert printed["task"]["name"] == task
    assert printed["model"]["_target_"] == compose([f"task={task}"]).model._target_
    assert printed["model"]["_target_"] == {"cls": "models.build_model", "kpt": "models.build_pose_model"}[task]


def test_a_keypoint_config_stored_before_kpt_named_its_builder_still_builds_the_pose_model():
    from engine.evaluate import upgrade_stored_config
    from models.pose import PoseNet

    cfg = compose(["task=kpt", "model=mbv3_small", "act=relu"])
    cfg.model._target_ = "models.build_model"  # what such a checkpoint stored
    assert isinstance(_build(upgrade_stored_config(cfg)), PoseNet)
    cls_cfg = compose(["model=mbv3_small"])
    assert upgrade_stored_config(cls_cfg).model._target_ == "models.build_model"


def test_recipes_follow_the_paper():
    c = compose(["model=mbv2_035", "data=imagenet", "data.root=/x"])
    assert (c.optim.name, c.optim.lr, c.optim.momentum, c.optim.weight_decay) == ("sgd", 0.05, 0.9, 2.0e-5)
    assert (c.sched.name, c.trainer.max_epochs, c.model.dropout, c.aug.label_smoothing) == ("cosine", 300, 0.1, 0.1)
    assert c.aug.color_jitter > 0 and c.aug.mixup_alpha == 0 and c.data.batch_size == 256
    c = compose(["model=mbv2_100", "data=imagenet", "data.root=/x"])
    assert c.optim.weight_decay == 3.0e-5 and c.model.dropout == 0.2 and c.aug.mixup_alpha > 0
    c = compose(["model=resnet50", "data=imagenet", "data.root=/x"])
    assert (c.optim.lr, c.optim.weight_decay, c.sched.name, list(c.sched.milestones), c.trainer.max_epochs) == (0.1, 1.0e-4, "step", [30, 60], 90)
    c = compose(["task=kpt", "model=mbv2_050", "data=coco", "data.root=/x"])
    assert (c.optim.name, c.optim.lr, list(c.sched.milestones), c.trainer.max_epochs) == ("adam", 1.0e-3, [170, 200], 210)
    assert list(c.data.input_size) == [256, 192] and list(c.data.heatmap_size) == [64, 48]


def test_lr_scales_linearly_with_the_global_batch():
    from engine.optim import effective_lr

    c = compose(["model=mbv2_035", "data=imagenet", "data.root=/x"])
    assert effective_lr(c.optim, 256) == pytest.approx(0.05)
    assert effective_lr(c.optim, 1024) == pytest.approx(0.2)


def test_tau_schedule_hook():
    from engine.loop import tau_at

    c = compose(["act=dyrelu_c", "data=imagenet", "data.root=/x"])
    assert tau_at(c, 0, 300) is None  # no schedule: every DY-ReLU-C keeps the act.tau it was built with
    c = compose(["act=dyrelu_c", "data=imagenet", "data.root=/x", "trainer.tau_schedule.end=1.0"])
    assert tau_at(c, 0, 100) == 30.0 and tau_at(c, 25, 100) == pytest.approx(15.5) and tau_at(c, 80, 100) == 1.0
    c = compose(["act=dyrelu_c", "act.tau=100", "data=imagenet", "data.root=/x", "trainer.tau_schedule.end=1.0"])
    assert tau_at(c, 0, 100) == 100.0  # the schedule starts from act.tau

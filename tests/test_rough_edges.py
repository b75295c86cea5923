"""What a new user met (issue 33), in process: a step schedule cut short says so, metrics.png and
eval.py's record name what ran, the keypoint run folder names the head's activation, and a key of
another activation says which one has it."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from engine.optim import build_scheduler
from runs import ROOT, compose


def _step(milestones, gamma=0.1):
    return OmegaConf.create({"name": "step", "warmup_epochs": 0, "warmup_lr": 1e-6, "min_lr": 0.0,
                             "milestones": milestones, "gamma": gamma})


@pytest.mark.parametrize("milestones,epochs,said", [
    ([16, 19], 2, "no decay happens, the learning rate stays at 0.002 for the whole run"),
    ([16, 19], 17, "trainer.max_epochs=17 ends before sched.milestones [19], so that decay never happens"),
    ([16, 19], 19, "ends before sched.milestones [19]"),  # a decay at the last step changes nothing
    ([], 5, "no decay happens"),
    ([16, 19], 20, None),
])
def test_a_step_schedule_cut_short_says_so_once(caplog, milestones, epochs, said):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.002)
    with caplog.at_level(logging.WARNING):
        build_scheduler(opt, _step(milestones), epochs, steps_per_epoch=3)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert lines == [] if said is None else (len(lines) == 1 and said in lines[0]), lines


def test_a_cosine_schedule_is_compressed_without_a_word(caplog):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    cosine = OmegaConf.create({"name": "cosine", "warmup_epochs": 0, "warmup_lr": 1e-6, "min_lr": 0.0})
    with caplog.at_level(logging.WARNING):
        build_scheduler(opt, cosine, 2, steps_per_epoch=3)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_metrics_png_and_eval_records_name_what_ran(tmp_path):
    from engine.evaluate import what_was_scored
    from engine.plots import plot_metrics, run_title

    kpt = compose(["task=kpt", "act@head_act=relu"])
    assert run_title(OmegaConf.to_container(kpt, resolve=True)) == "mbv2_050  act=dyrelu_c  head_act=relu  data=coco_demo  seed=0"
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,train_loss,ap\n1,2.3,10.0\n")
    assert plot_metrics(csv_path, config=OmegaConf.to_container(kpt, resolve=True)).is_file()
    # three person boxes on two images; a classification set has one image per sample
    boxes = SimpleNamespace(records=[{"image_id": 7}, {"image_id": 7}, {"image_id": 9}])
    assert what_was_scored(kpt, boxes, [0, 1, 2]) == {"model": "mbv2_050", "act": "dyrelu_c", "head_act": "relu",
                                                      "val_images": 2, "val_instances": 3}
    assert what_was_scored(compose([]), list(range(5)), [0, 1, 2]) == {"model": "mbv2_035", "act": "dyrelu_b",
                                                                        "val_images": 3}


def test_the_keypoint_run_folder_names_the_heads_activation():
    run_dir = OmegaConf.load(ROOT / "configs" / "task" / "kpt.yaml").hydra.run
    assert "${act.name}-head_${head_act.name}" in OmegaConf.to_container(run_dir)["dir"]


def test_a_key_of_another_activation_names_it():
    from engine.cli import _unknown_key_line

    line = _unknown_key_line("Could not override 'act.tau'.", ["act.tau=abc"], True)
    assert line.startswith("act.tau=abc: act has no key tau (tau belongs to act=dyrelu_c"), line
    line = _unknown_key_line("Could not override 'optim.learning_rate'.", ["optim.learning_rate=0.1"], True)
    assert "belongs to" not in line and line.startswith("optim.learning_rate=0.1: optim has no key learning_rate;")

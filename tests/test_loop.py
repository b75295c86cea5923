"""The loop in-process on tiny CPU runs: host syncs per step, stop signals at sync points and
during validation, and each trainer option (amp, compile, EMA, grad clip, channels_last,
precise BN) doing what it promises while training stays finite. No test here asserts where a
few SGD steps go (the direction of ten steps is not a property of any option, and it changes
with the CPU's rounding)."""
from __future__ import annotations

import csv
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from runs import ROOT, compose, train_in_process

# 40 training images of 32 px, batch 8: 5 steps per epoch; no augmentation or dropout.
TINY_RUN = [
    "data.train_per_class=4", "data.val_per_class=2", "data.batch_size=8", "data.num_workers=0",
    "data.image_size=40", "data.crop_size=32", "data.val_resize=32", "data.train_augment=false",
    "model.dropout=0.0", "trainer.progress=false", "trainer.device=cpu", "logger=csv",
    "optim=adam", "optim.lr=3e-3", "sched.warmup_epochs=0", "trainer.log_every=1",
]


@pytest.fixture(autouse=True)
def _restore_global_torch_state():
    det = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(det)


def _rows(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _train(monkeypatch, run_dir, *overrides):
    """Run the loop in this process; returns (results, metrics rows, the model it trained)."""
    res, model = train_in_process(monkeypatch, run_dir, [*TINY_RUN, *overrides])
    return res, _rows(run_dir), model


def _trained(rows):
    """Every epoch trained and was validated with finite numbers."""
    assert rows and all(math.isfinite(float(r["train_loss"])) and math.isfinite(float(r["val_loss"])) for r in rows), rows


def _last(run_dir):
    return torch.load(Path(run_dir) / "checkpoints" / "last.pt", weights_only=False)


# ---- host syncs ---------------------------------------------------------------------------------
# Call sites whose tensors live on the host whatever the device: the optimizers' step counters
# (torch keeps them on the CPU unless capturable=True), and data loading (sampler, transforms,
# collate), which runs in worker processes on a real run.
HOST_ONLY = ("/torch/optim/", "/torchvision/", "/torch/utils/data/", str(ROOT / "engine" / "loaders.py"), str(ROOT / "data") + "/")


def test_one_host_sync_every_log_every_steps(monkeypatch, tmp_path):
    import sys

    from engine import loop

    calls, inside = [], [False]

    def counting(name):
        orig = getattr(torch.Tensor, name)

        def wrapper(self, *a, **k):
            if inside[0]:
                caller = sys._getframe(1).f_code.co_filename
                if not any(part in caller for part in HOST_ONLY):
                    calls.append((name, f"{caller}:{sys._getframe(1).f_lineno}"))
            return orig(self, *a, **k)

        return wrapper

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    epoch = loop.train_one_epoch

    def counted_epoch(*a, **k):
        inside[0] = True
        try:
            return epoch(*a, **k)
        finally:
            inside[0] = False

    monkeypatch.setattr(loop, "train_one_epoch", counted_epoch)
    # 10 steps per epoch, 2 epochs, a sync every 4 global steps and at each epoch's end:
    # global steps 4, 8, 10 | 12, 16, 20. DY-ReLU-B, grad clipping and the EMA included.
    _train(monkeypatch, tmp_path / "run", "data.train_per_class=8", "trainer.max_epochs=2", "trainer.log_every=4",
           "act=dyrelu_b", "trainer.grad_clip=1.0", "trainer.ema_decay=0.9")
    assert [name for name, _ in calls] == ["tolist"] * 6, calls
    assert all("/engine/loop.py" in site for _, site in calls), calls


# ---- stop signals -------------------------------------------------------------------------------
def _signal_at_step(monkeypatch, sig, at: int):
    """Send ``sig`` to this process right after the ``at``-th training step (1-based, whole run)."""
    from engine import loop

    seen = [0]
    add = loop._Syncs.add

    def add_and_signal(self, loss, n):
        add(self, loss, n)
        seen[0] += 1
        if seen[0] == at:
            os.kill(os.getpid(), sig)

    monkeypatch.setattr(loop._Syncs, "add", add_and_signal)


@pytest.mark.parametrize("workers", [
    [],
    # random crops and flips drawn in 2 persistent workers, which the resumed run restarts
    ["data.num_workers=2", "data.train_augment=true"],
], ids=["main_process", "two_workers_augmenting"])
def test_stop_signal_is_read_at_the_next_sync_point_and_resume_matches(monkeypatch, tmp_path, workers):
    from engine.signals import StopRequested

    args = ["trainer.max_epochs=2", "trainer.log_every=3", "trainer.deterministic=true", *workers]
    _, straight_rows, _ = _train(monkeypatch, tmp_path / "straight", *args)
    monkeypatch.undo()
    # Step 7 is epoch 2's second step; the next sync point is global step 9 (epoch 2 step 4).
    _signal_at_step(monkeypatch, signal.SIGUSR2, at=7)  # outside submitit: a plain stop (exit 124)
    with pytest.raises(StopRequested):
        _train(monkeypatch, tmp_path / "stopped", *args)
    state = _last(tmp_path / "stopped")
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 4, 9)
    monkeypatch.undo()
    _train(monkeypatch, tmp_path / "stopped", *args)
    a, b = _last(tmp_path / "straight")["model"], _last(tmp_path / "stopped")["model"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5, rtol=0), k
    # The resumed epoch reports the loss of the whole epoch, as the uninterrupted run does.
    resumed_rows = _rows(tmp_path / "stopped")
    assert abs(float(resumed_rows[-1]["train_loss"]) - float(straight_rows[-1]["train_loss"])) < 1e-5


def test_stop_signal_during_validation_saves_and_resume_validates(monkeypatch, tmp_path):
    from engine.signals import StopRequested
    from engine.tasks.cls import ClassificationTask

    evaluate = ClassificationTask.evaluate

    def evaluate_then_signal(self, model, loader, *a, **k):
        def batches():
            for i, batch in enumerate(loader):
                if i == 0:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

        return evaluate(self, model, batches(), *a, **k)

    monkeypatch.setattr(ClassificationTask, "evaluate", evaluate_then_signal)
    with pytest.raises(StopRequested):
        _train(monkeypatch, tmp_path / "run", "trainer.max_epochs=1", "trainer.log_every=1")
    state = _last(tmp_path / "run")
    assert (state["epoch"], state["step_in_epoch"]) == (0, 5)  # trained, not yet validated
    monkeypatch.undo()
    res, rows, _ = _train(monkeypatch, tmp_path / "run", "trainer.max_epochs=1")
    assert [r["epoch"] for r in rows] == ["1"] and "top1" in res
    assert float(rows[0]["train_loss"]) > 0  # the epoch's loss survived the stop


# ---- trainer options ----------------------------------------------------------------------------
def test_amp_bf16_autocasts_the_forward(monkeypatch, tmp_path):
    dtypes = []
    from engine import loop

    build = loop.build_model

    def hooked(*a, **k):
        model, c = build(*a, **k)
        model.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        return model, c

    monkeypatch.setattr(loop, "build_model", hooked)
    cfg = compose([*TINY_RUN, "trainer.amp=bf16", "trainer.max_epochs=2"])
    loop.run(cfg, tmp_path / "run")
    assert dtypes and set(dtypes) == {torch.bfloat16}
    _trained(_rows(tmp_path / "run"))


def test_compile_compiles_the_model(monkeypatch, tmp_path):
    import torch._dynamo

    torch._dynamo.reset()
    # ResNet-10: Inductor compiles its 9 activation sites faster than MobileNetV2's 52 on a cold cache
    _, rows, model = _train(monkeypatch, tmp_path / "run", "model=resnet10", "act=relu", "trainer.compile=true",
                            "trainer.max_epochs=2", "trainer.limit_val_batches=1")
    assert model._compiled_call_impl is not None
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert not any(k.startswith("_orig_mod") for k in _last(tmp_path / "run")["model"])  # keys as without compile
    _trained(rows)


def test_ema_weights_are_evaluated_and_saved(monkeypatch, tmp_path):
    res, rows, _ = _train(monkeypatch, tmp_path / "run", "trainer.ema_decay=0.5", "trainer.max_epochs=2")
    state = _last(tmp_path / "run")
    raw, ema = state["model"], {k.removeprefix("module."): v for k, v in state["ema"].items()}  # timm's EMA wraps
    differs = [k for k in raw if raw[k].is_floating_point() and not torch.equal(raw[k], ema[k])]
    assert differs
    assert "top1_ema" in rows[-1]
    _trained(rows)


def test_grad_clip_bounds_the_gradient_norm(monkeypatch, tmp_path):
    clip = 0.05
    norms = []
    orig = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        total = orig(params, max_norm, *a, **k)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        norms.append((float(total), float(after), max_norm))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    _, rows, _ = _train(monkeypatch, tmp_path / "run", f"trainer.grad_clip={clip}", "trainer.max_epochs=2")
    assert len(norms) == 10 and all(m == clip for _, _, m in norms)
    # `before` is the norm of the same batch's gradients unclipped. What clipping guarantees: a
    # norm above the bound comes down to it, one within it is left alone.
    assert any(before > clip for before, _, _ in norms)  # the clip had work to do
    for before, after, _ in norms:
        if before > clip:
            assert after <= clip * (1 + 1e-5) and after >= clip * 0.99, (before, after)
        else:
            assert after == pytest.approx(before, rel=1e-6), (before, after)
    _trained(rows)


def test_channels_last_reaches_weights_and_inputs(monkeypatch, tmp_path):
    layouts = []
    from engine import loop

    build = loop.build_model

    def hooked(*a, **k):
        model, c = build(*a, **k)
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        conv.register_forward_pre_hook(lambda m, i: layouts.append(i[0].is_contiguous(memory_format=torch.channels_last)))
        return model, c

    monkeypatch.setattr(loop, "build_model", hooked)
    loop.run(compose([*TINY_RUN, "trainer.channels_last=true", "trainer.max_epochs=2"]), tmp_path / "run")
    assert layouts and all(layouts)
    _trained(_rows(tmp_path / "run"))


def test_precise_bn_recalibrates_model_and_ema_before_validation(monkeypatch, tmp_path):
    from engine import loop

    calls = []
    recal = loop.recalibrate_bn

    def spy(model, inputs, num_batches, world_size=1):
        calls.append(num_batches)
        return recal(model, inputs, num_batches, world_size)

    monkeypatch.setattr(loop, "recalibrate_bn", spy)
    _, rows, model = _train(monkeypatch, tmp_path / "run", "trainer.precise_bn_batches=3", "trainer.ema_decay=0.5",
                            "trainer.max_epochs=2")
    assert calls == [3, 3, 3, 3]  # model and EMA, at each of the 2 validations
    _trained(rows)


def test_loader_workers_start_once_per_run(monkeypatch, tmp_path):
    from torch.utils.data import dataloader

    starts = []
    init = dataloader._MultiProcessingDataLoaderIter.__init__

    def counted(self, loader):
        starts.append(loader.persistent_workers)
        init(self, loader)

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "__init__", counted)
    # 3 epochs, each validated, with the EMA evaluated too and precise BN drawing training batches.
    _train(monkeypatch, tmp_path / "run", "data.num_workers=1", "trainer.max_epochs=3", "trainer.ema_decay=0.5",
           "trainer.precise_bn_batches=1")
    assert starts == [True, True]  # the training loader's workers and the validation loader's


def test_precise_bn_sees_fused_bn_dyrelu_sites():
    """Fused BN + DY-ReLU sites never call their BN's forward, where fvcore counts a layer's batch:
    precise BN must still give them the statistics the plain sequence gets (it gave zero variances,
    an inf in evaluation)."""
    import copy

    import models
    from engine.precise_bn import recalibrate_bn

    torch.manual_seed(0)
    fused = models.build_model("mbv2_035", act={"name": "dyrelu_b"}, num_classes=10)
    plain = models.set_fuse_bn_act(copy.deepcopy(fused), False)
    xs = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    recalibrate_bn(fused, iter(xs), 3)
    recalibrate_bn(plain, iter(xs), 3)
    assert all(m.fuse_bn_act for m in fused.modules() if hasattr(type(m), "fuse_bn_act"))  # fusion back on
    a, b = dict(fused.named_buffers()), dict(plain.named_buffers())
    for k in a:
        if k.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)

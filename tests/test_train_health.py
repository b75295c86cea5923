"""DY-ReLU trains about as well as ReLU on the demo: the regression test for the first landing's
DY-ReLU-B, which stayed near chance while its validation loss spiked to 1e2-1e6, and for DY-ReLU-C
with the paper's recipe alone, which stayed at chance on some seeds (docs/training-health.md).

Each DY-ReLU is compared with ReLU on the same data and schedule (the default demo, shortened to 4
epochs; ReLU's seed-0 curve is the yardstick for every seed), not against absolute numbers. With
``act.hyper_init=random`` (the first landing's initialisation) DY-ReLU-B fails on the validation-loss
check (about 1e5 times the training loss in epoch 2 on the 2-core machine). The training-loss check is
the looser guard against a DY-ReLU that does not learn at all. DY-ReLU-C runs two seeds: 0, and 2,
where the paper's recipe alone (``act.tau=10 optim.spatial_lr_scale=1.0``) stayed at chance. C is also
asked to keep an attention that depends on the image: the median over its layers of pi_input_var
(dyrelu/dynamics.py) on 64 validation images at least PI_INPUT_VAR_MIN; an untrained C's median is
0 and the same trained network with its attention flattened (tau = 1e5, checked here) gives 4e-6.
Measured on the code of 2026-12-07 (one thread, these 4 epochs): today's recipe, training loss
2.302 -> 2.154 and pi_input_var 0.013 on seed 2, 2.302 -> 2.189 and 0.014 on seed 0; the paper's
recipe alone on seed 2, 2.308 -> 2.310 (at chance) and 0.0014, so it fails both checks.
"""
from __future__ import annotations

import csv
import statistics
import sys
from pathlib import Path

import pytest
import torch

import dyrelu
from runs import ROOT, Background

sys.path.insert(0, str(ROOT / "scripts"))
import inspect_dynamic  # noqa: E402

SHORT_DEMO = ["sched.epochs=4", "trainer.progress=false", "logger=csv", "data.num_workers=0"]


def _epochs(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


# The trainings the slow tests compare, by name; each test names the ones it reads (RUNS_OF).
RUNS = {"relu": ["act=relu"], "b": ["act=dyrelu_b"], "c0": ["act=dyrelu_c", "seed=0"], "c2": ["act=dyrelu_c", "seed=2"]}
RUNS_OF = {
    "test_dyrelu_b_trains_about_as_fast_as_relu": lambda params: ["relu", "b"],
    "test_dyrelu_c_trains_and_keeps_an_input_dependent_attention": lambda params: ["relu", f"c{params['seed']}"],
}


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory):
    """``trained(name)``: the run folder of RUNS[name] trained on SHORT_DEMO. Every run a selected test
    of this module reads is started at once, two at a time (one thread each: ReLU's curve and the
    DY-ReLU runs side by side), so the tests wait for about half of the four runs' time."""
    root = tmp_path_factory.mktemp("health")
    runs = Background(jobs=2)

    def start(name):
        runs.start(name, root / name, *RUNS[name], *SHORT_DEMO)

    start("relu")
    for item in request.session.items:
        if item.module is request.module and item.originalname in RUNS_OF:
            for name in RUNS_OF[item.originalname](getattr(item, "callspec", None) and item.callspec.params):
                start(name)

    def get(name) -> Path:
        start(name)
        runs.get(name)
        return root / name

    yield get
    runs.close()


@pytest.fixture(scope="module")
def relu_curve(trained) -> list[dict]:
    return _epochs(trained("relu"))


#: the median over DY-ReLU-C layers of pi_input_var that a healthy C keeps (see the module docstring)
PI_INPUT_VAR_MIN = 0.002


def _check_against_relu(act: str, rows: list[dict], relu_curve: list[dict]) -> None:
    curves = {"relu": relu_curve, act: rows}
    for name, curve in curves.items():
        for r in curve:  # the first landing's symptom: eval-mode losses of 1e2-1e6
            assert r["val_loss"] <= 10 * r["train_loss"], (name, r)
    # Over the first epochs both losses fall from about ln(10), DY-ReLU's by a good part of ReLU's drop.
    drop = {name: curve[0]["train_loss"] - curve[-1]["train_loss"] for name, curve in curves.items()}
    assert drop["relu"] > 0.05, drop  # the comparison means something only if ReLU learns
    assert drop[act] >= 0.3 * drop["relu"], (drop, [r["train_loss"] for r in rows], [r["train_loss"] for r in relu_curve])


@pytest.mark.slow
def test_dyrelu_b_trains_about_as_fast_as_relu(relu_curve, trained):
    """DY-ReLU-B with act.hyper_init=random fails this test."""
    _check_against_relu("dyrelu_b", _epochs(trained("b")), relu_curve)


def _pi_input_var(measured: dict) -> float:
    return statistics.median(r["pi_input_var"] for r in measured["per_layer"] if r["pi_input_var"] is not None)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 2])  # seed 2: at chance with the paper's recipe (docs/training-health.md)
def test_dyrelu_c_trains_and_keeps_an_input_dependent_attention(seed, relu_curve, trained):
    """DY-ReLU-C with the paper's recipe alone (act.tau=10 optim.spatial_lr_scale=1.0) fails the
    loss check on seed 2; a flattened attention fails the pi check."""
    run_dir = trained(f"c{seed}")
    _check_against_relu("dyrelu_c", _epochs(run_dir), relu_curve)
    run_cfg, task, val_ds, model, _ = inspect_dynamic.load_run(str(run_dir / "checkpoints" / "last.pt"), [])
    healthy = _pi_input_var(inspect_dynamic.measure_model(model, task, val_ds, run_cfg, max_images=64))
    assert healthy >= PI_INPUT_VAR_MIN, healthy
    if seed == 2:  # the check's own negative control, once: the same network, its attention flattened
        dyrelu.set_tau(model, 1e5)
        flat = _pi_input_var(inspect_dynamic.measure_model(model, task, val_ds, run_cfg, max_images=64))
        assert flat < PI_INPUT_VAR_MIN, (flat, healthy)


@pytest.mark.parametrize("variant", ["A", "B", "C"])
@pytest.mark.parametrize("shape", [(3, 16), (3, 16, 9), (2, 16, 5, 7)])
def test_fresh_dyrelu_is_its_initial_function(variant, shape):
    """hyper_init=zero (the default): a fresh module computes max_k(alpha^k x + beta^k), times pi for
    C, for any input; with the paper's defaults that is ReLU."""
    torch.manual_seed(0)
    x = torch.randn(shape) * 3
    act = dyrelu.DyReLU(16, variant=variant)
    pi = act.coefficients(x).pi
    expected = torch.relu(x) * (1 if pi is None else pi)
    # exact for A and B; C's pi comes from the fused path's own 1x1-conv kernel (another summation order)
    torch.testing.assert_close(act(x), expected, rtol=0 if pi is None else 1e-6, atol=0)
    k3 = dyrelu.DyReLU(16, variant=variant, k=3, init_a=(1.0, 0.25, -0.5), init_b=(0.0, 0.1, -0.2))
    pi = k3.coefficients(x).pi
    ref = torch.stack([x, 0.25 * x + 0.1, -0.5 * x - 0.2]).amax(0) * (1 if pi is None else pi)
    torch.testing.assert_close(k3(x), ref, rtol=1e-6, atol=1e-6)


def test_random_hyper_init_is_not_its_initial_function():
    torch.manual_seed(0)
    x = torch.randn(4, 16, 5, 5)
    act = dyrelu.DyReLU(16, variant="B", hyper_init="random")
    assert (act(x) - torch.relu(x)).abs().max() > 1e-2
    # "small": near the initial function, a tenth of the random init's distance from it
    dist = {}
    for init in ("small", "random"):
        torch.manual_seed(0)
        a = dyrelu.DyReLU(16, variant="B", reduction=2, hyper_init=init).coefficients(x).a
        dist[init] = float((a - torch.tensor([1.0, 0.0]).reshape(1, 2, 1)).abs().max())
    assert 0 < dist["small"] < 0.2 * dist["random"], dist
    with pytest.raises(ValueError, match="hyper_init='ones' is not one of"):
        dyrelu.DyReLU(16, hyper_init="ones")

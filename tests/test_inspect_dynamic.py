"""scripts/inspect_dynamic.py: Fig. 3 / supplementary Fig. 1 plots and the Sec. 5.2 statistics."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from runs import ROOT, TINY, env, run_train, wandb_offline_runs

sys.path.insert(0, str(ROOT / "scripts"))
import inspect_dynamic as ind  # noqa: E402


@pytest.fixture(scope="module")
def smoke_ckpt(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("inspect") / "run"
    run_train(run_dir, "experiment=table2/dyrelu_b", "data=demo", "trainer=smoke", "trainer.max_epochs=1", *TINY)
    return run_dir / "checkpoints" / "best.pt"


def test_inspect_writes_plots_and_statistics(smoke_ckpt, tmp_path):
    out = tmp_path / "insp"
    e = {**env(), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "inspect_dynamic.py"), str(smoke_ckpt), "--max-images", "20",
                        "--out", str(out), "--points-per-image", "16", "data.batch_size=8", "--wandb", "true"],
                       cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    line = json.loads(p.stdout.strip().splitlines()[-1])
    assert line["images"] == 20
    for key in ("all.share_slope_margin", "all.share_intercept_gt_0.05", "all.share_abs_intercept_gt_0.05",
                "k2plus.share_slope_margin"):
        assert 0.0 <= line[key] <= 1.0, key
    for key in ("a_spread", "a_spread_rel", "b_spread_rel", "a_dist", "b_dist", "band_x_pos", "band_x_neg"):
        assert line[f"all.{key}_median"] >= 0.0, key
    assert sorted(map(int, line["slope_diff_per_block"])) == list(range(1, 18))  # MobileNetV2: 17 blocks
    for name in ("fig3_top_scatter", "supp_fig1_scatter", "fig3_bottom_slope_diff", "fig3_band"):
        png = out / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    stats = json.loads((out / "stats.json").read_text())
    assert stats["images"] == 20 and stats["act"] == "dyrelu_b" and stats["row"] == "dyrelu_b"
    # every other block's depthwise DY-ReLU (blocks 1, 3, ..., 17)
    assert stats["scatter_layers"] == [f"blocks.{i}.conv_dw.act" for i in range(0, 17, 2)]
    per = {r["name"]: r for r in stats["per_layer"]}
    assert per["blocks.0.conv_dw.act"]["units"] == 20 * per["blocks.0.conv_dw.act"]["channels"]
    assert stats["pooled"]["all"]["units"] == sum(r["units"] for r in stats["per_layer"])
    assert stats["pooled"]["all"]["layers"] > stats["pooled"]["k2plus"]["layers"]  # the K=1 ones at A3
    assert sorted(map(int, stats["per_block"])) == list(range(1, 18)) and "pi_input_var" in stats["definitions"]
    # W&B (offline): the three plots as images, in the table's group
    (run,) = wandb_offline_runs(out)
    assert run["group"] == "table2" and run["job_type"] == "inspect_dynamic"
    for name in ("fig3_top_scatter", "supp_fig1_scatter", "fig3_bottom_slope_diff"):
        assert run["history"][f"{name}/_type"] == "image-file", name
        assert (run["dir"] / "files" / run["history"][f"{name}/path"]).is_file()


def test_statistics_follow_the_documented_definitions():
    from dyrelu import DyReLU

    def fixed(channels, logits, variant="B"):
        """A DY-ReLU whose hyper function outputs constant logits (fc2 weight 0, bias = logits)."""
        m = DyReLU(channels, variant=variant, k=2, reduction=1)
        with torch.no_grad():
            m.fc2.weight.zero_()
            m.fc2.bias.copy_(torch.tensor(logits, dtype=torch.float32))
        return m

    big = 20.0  # 2*sigmoid(20)-1 = 1: da, db = +-1 exactly (in float32)
    # layout [da^1_c..., da^2_c..., db^1_c..., db^2_c...], C = 2; lambda_a = 1, lambda_b = 0.5, init a = (1, 0)
    # channel 0: a = (2, 0)   -> slope > 1;  b = (0.5, 0)  -> intercept > 0.05
    # channel 1: a = (1, 0)   -> plain ReLU; b = (-0.5, 0) -> only |b| > 0.05
    m1 = fixed(2, [big, 0.0, 0.0, 0.0, big, -big, 0.0, 0.0])
    # variant A, one function per image: a = (0, -1) -> negative slope; b = 0
    m2 = fixed(2, [-big, -big, 0.0, 0.0], variant="A")
    model = nn.Sequential(m1, m2)
    rec = ind.Recorder(model, ["0"], points_per_image=4, max_points=100, seed=0)
    with torch.no_grad():
        model(torch.randn(3, 2, 4, 4))
    rec.remove()
    s = ind.summarize(rec, {})
    per = {r["name"]: r for r in s["per_layer"]}
    assert per["0"]["units"] == 6 and per["0"]["share_slope_margin"] == pytest.approx(0.5)
    assert per["0"]["share_intercept_gt_0.05"] == pytest.approx(0.5) and per["0"]["share_abs_intercept_gt_0.05"] == 1.0
    assert per["0"]["slope_diff_mean"] == pytest.approx(1.5)  # (|2-0| + |1-0|) / 2
    assert per["1"]["units"] == 3 and per["1"]["share_slope_margin"] == 1.0 and per["1"]["share_intercept_gt_0.05"] == 0
    assert s["pooled"]["all"]["units"] == 9 and s["pooled"]["all"]["share_slope_margin"] == pytest.approx(6 / 9)
    assert len(rec.points["0"][0]) == 3 * 4  # scatter sample: points_per_image per image


def test_spread_is_zero_for_a_static_function_and_measures_the_dynamic_one():
    """a_spread is the std over images of each coefficient: 0 at the zero init (every image gets the
    same function), the std of the coefficient over images for a hyper function that reads its input."""
    from dyrelu import DyReLU

    torch.manual_seed(0)
    static, dynamic = DyReLU(16, variant="C"), DyReLU(16, variant="B", reduction=2, hyper_init="random")
    model = nn.Sequential(static, dynamic)
    rec = ind.Recorder(model, [], points_per_image=1, max_points=1, seed=0)
    x = torch.randn(6, 16, 5, 5)
    with torch.no_grad():
        model(x)
    rec.remove()
    per = {r["name"]: r for r in ind.summarize(rec, {})["per_layer"]}
    assert per["0"]["a_spread"] == 0 and per["0"]["b_spread"] == 0 and per["0"]["pi_flatness"] > 0
    a = dynamic.coefficients(static(x)).a.double()  # (N, K, C)
    assert per["1"]["a_spread"] == pytest.approx(float(a.std(dim=0, correction=0).mean()), rel=1e-6)
    assert per["1"]["a_spread"] > 1e-3 and per["1"]["pi_flatness"] is None and per["1"]["pi_input_var"] is None


def test_a_model_without_dyrelu_is_a_clear_error():
    from models import build_model

    with pytest.raises(ValueError, match="no DY-ReLU"):
        ind.Recorder(build_model("mbv2_035", act="relu", num_classes=10), [], 4, 10, 0)
    with pytest.raises(SystemExit):  # the checkpoint is required
        ind.parse_args(["--max-images", "3"])


def test_overrides_are_train_overrides_of_the_stored_config(smoke_ckpt, capsys):
    from engine.config import OverrideError

    cfg, *_ = ind.load_run(str(smoke_ckpt), ["data.val_per_class=2", "trainer.device=cpu"])
    assert cfg.data.val_per_class == 2 and cfg.trainer.device == "cpu"
    with pytest.raises(OverrideError, match="Key 'nope' is not in struct"):
        ind.load_run(str(smoke_ckpt), ["data.nope=1"])
    with pytest.raises(SystemExit) as e:
        ind.main([str(smoke_ckpt), "data.nope=1"])
    assert e.value.code == 2 and "error: data.nope: data has no key nope" in capsys.readouterr().err  # one line, as train.py


def test_a2_blocks_are_the_backbones_even_in_a_pose_model():
    names = [f"backbone.blocks.{i}.conv_dw.act" for i in range(17)] + [f"head.blocks.{i}.conv_dw.act" for i in range(4)]
    names += ["backbone.stem.act", "backbone.blocks.1.conv_pw.act"]
    blocks = ind.find_a2_blocks(names)
    assert blocks == {f"backbone.blocks.{i}.conv_dw.act": i + 1 for i in range(17)}
    assert ind.find_a2_blocks(["layer1.0.act1"]) == {}

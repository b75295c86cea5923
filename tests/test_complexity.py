"""Complexity counts (dyrelu.flops + scripts/complexity.py) against the paper's tables."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch import nn

import dyrelu
from dyrelu import DyReLU
from dyrelu.flops import count_complexity
from models import build_model
from runs import load_script

ROOT = Path(__file__).resolve().parents[1]


def _script():
    return load_script("complexity")


# ---- the counting convention on one DY-ReLU --------------------------------------------------------
@pytest.mark.parametrize("variant,k", [("B", 2), ("B", 3), ("A", 2), ("C", 2)])
def test_dyrelu_own_work_is_counted(variant, k):
    c, h, w = 16, 8, 6
    m = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), DyReLU(c, variant=variant, k=k, reduction=4))
    r = count_complexity(m, (h, w), in_chans=c)
    n = c * h * w
    conv = c * c * h * w
    hidden = c // 4
    width = 1 if variant == "A" else c
    fc = c * hidden + hidden * 2 * k * width + (c * h * w if variant == "C" else 0)  # + spatial 1x1 conv
    assert r["madds_base"] == conv + fc
    apply = n + k * n + (k - 1) * n  # pool + K multiply-adds + (K-1) max per element
    if variant == "C":
        apply += n + 6 * h * w  # pi scaling; per position: z / tau, softmax (3), x gamma, clamp
    small = r["madds_dynamic"] - apply  # hidden ReLU + normalisation on O(K*C) coefficients
    assert 0 <= small <= 8 * k * width + hidden, r["by_operator"]
    assert r["madds"] == r["madds_base"] + r["madds_dynamic"]
    # the paper's convention keeps only the multiplies: K per element (+1 for C's pi) + O(KC)
    extra = r["madds_paper"] - r["madds_base"] - (k + (variant == "C")) * n
    assert 0 <= extra <= 6 * k * width + (h * w if variant == "C" else 0)


def test_static_network_counts_only_macs():
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
    r = count_complexity(m, (10, 10))
    assert count_complexity(m, (3, 10, 10))["madds"] == count_complexity(m, (8, 3, 10, 10))["madds"] == r["madds"]
    assert r["madds"] == r["madds_paper"] == 8 * 3 * 9 * 100  # BN and ReLU are not counted ...
    assert r["uncounted"]["batch_norm"] == 2 * 800 and r["uncounted"]["relu"] == 800  # ... but reported
    assert r["fvcore_default"] == r["madds"] + 1600  # fvcore's default adds BN (2 per element)


def test_counting_forces_reference_path_and_restores_state(monkeypatch):
    import dyrelu.fused as fused

    calls = []

    def boom(module, x):  # a fused path fvcore could not see into
        calls.append(1)
        raise AssertionError("fused path used while counting")

    monkeypatch.setattr(fused, "supports", lambda module, x: True)
    monkeypatch.setattr(fused, "forward", boom)
    m = nn.Sequential(nn.Conv2d(3, 8, 1), DyReLU(8, impl="auto")).train()
    r = count_complexity(m, (4, 4))
    assert r["madds_dynamic"] > 0 and not calls
    assert m.training and m[1].impl == "auto"


# ---- the paper's numbers ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,paper", [("resnet10", 890.0), ("resnet18", 1810.0), ("resnet34", 3640.0), ("resnet50", 3860.0)])
def test_resnet_madds(name, paper):
    r = count_complexity(build_model(name), 224)
    assert r["madds"] / 1e6 == pytest.approx(paper, rel=0.02)


def test_mbv2_dyrelu_overhead():
    relu = count_complexity(build_model("mbv2_100"), 224)
    dy = count_complexity(build_model("mbv2_100", act="dyrelu_b"), 224)
    assert relu["madds"] / 1e6 == pytest.approx(300.0, rel=0.01)
    assert relu["fvcore_default"] / 1e6 == pytest.approx(314.2, rel=0.01)  # timm/fvcore's 314 M includes BN
    paper_overhead = dy["madds_paper"] / relu["madds"] - 1  # paper: 315.5 / 300 = +5.2 %
    full_overhead = dy["madds"] / relu["madds"] - 1
    assert 0.03 <= paper_overhead <= 0.08
    assert 0.08 <= full_overhead <= 0.12  # pooling and the K-way max are not free (documented)
    assert dy["params"] / 1e6 == pytest.approx(7.5, rel=0.01)


def test_maxout_madds_x035():
    r = count_complexity(build_model("mbv2_035", act="maxout"), 224)
    # paper 106.6 M; ours counts 108.7 M (+2.0 %): stem, expand, projection and last conv doubled
    assert r["madds"] / 1e6 == pytest.approx(106.6, rel=0.025)
    assert r["params"] / 1e6 == pytest.approx(2.1, rel=0.03)


@pytest.mark.slow
def test_maxout_madds_x100_k3():
    r = count_complexity(build_model("mbv2_100", act={"name": "maxout", "k": 3}), 224)
    assert r["madds"] / 1e6 == pytest.approx(860.2, rel=0.01)


@pytest.mark.slow
def test_pose_madds_near_table10():
    from models import build_pose_model

    r = count_complexity(build_pose_model("mbv2_100"), (256, 192))
    assert r["madds"] / 1e6 == pytest.approx(993.7, rel=0.03)


# ---- the script ------------------------------------------------------------------------------------
def test_script_composes_train_overrides():
    s = _script()
    net, desc = s.build(["model=mbv2_035", "act=dyrelu_b", "act.k=3", "model.positions=[a1,a2]"], (96, 64), 10)
    assert desc["model"] == "mbv2_035" and desc["act"] == "dyrelu_b" and desc["input_size"] == [96, 64]
    ks = {m.k for m in net.modules() if isinstance(m, DyReLU)}
    assert 3 in ks and net.classifier.out_features == 10
    from engine.config import OverrideError

    with pytest.raises(OverrideError, match="Key 'bogus' is not in struct"):  # train.py's message
        s.build(["model=mbv2_035", "act.bogus=3"])
    with pytest.raises(OverrideError, match="Available options in 'model'"):
        s.build(["model=nope"])


def test_script_last_line_is_json(capsys):
    s = _script()
    assert s.main(["model=mbv2_035", "act=dyrelu_b", "act.k=1", "model.positions=[a2]", "--input-size", "64", "64"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    d = json.loads(last)
    assert d["model"] == "mbv2_035" and d["act"] == "dyrelu_b" and d["task"] == "cls"
    assert isinstance(d["params"], int) and isinstance(d["madds"], int) and d["madds"] > d["madds_paper"]
    assert d["input_size"] == [64, 64]
    with pytest.raises(SystemExit) as e:
        s.main(["data.bogus=1"])
    assert e.value.code == 2 and "error: data.bogus: data has no key bogus" in capsys.readouterr().err  # one line, as train.py


def test_script_keypoint_task(capsys):
    s = _script()
    s.main(["task=kpt", "model=mbv3_small", "act=relu", "act@head_act=dyrelu_c", "--input-size", "64", "48"])
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["task"] == "kpt" and d["head_act"] == "dyrelu_c" and d["madds"] > 0


def test_paper_rows_cover_the_tables(tmp_path):
    s = _script()
    import yaml

    assert s.TABLES == ROOT / "configs" / "paper" / "tables.yaml"  # the project's copy, not ../shared
    rows = s.paper_rows(yaml.safe_load(s.TABLES.read_text()))
    tables = [r[0] for r in rows]
    assert tables.count("Table 4") == 20 and tables.count("Table 5") == 18 and tables.count("Table 8") == 6
    assert tables.count("Table 10") == 8 and tables.count("Supp. Table 1") == 10
    models = {o.split("=", 1)[1] for r in rows for o in r[2] if o.startswith("model=")}
    from models import list_models

    assert models <= set(list_models())
    md = tmp_path / "doc.md"
    md.write_text(f"intro\n{s.BEGIN}\nold\n{s.END}\noutro\n")
    s.write_markdown(str(md), "| new |\n")
    assert md.read_text() == f"intro\n{s.BEGIN}\n| new |\n{s.END}\noutro\n"

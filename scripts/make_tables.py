#!/usr/bin/env python
"""Gather the runs of table sweeps and write every paper table beside the paper's numbers.

    python scripts/make_tables.py multirun/table2/2026-01-01_00-00-00 [more sweep dirs ...] \
        [--out tables.md] [--tables table2,table4] [--all] [--best] [--json cells.json] [--wandb]

Finds every ``results.json`` under the given folders (recursively) and matches each run to a
paper row by the ``table`` and ``row`` keys that the experiment entries set
(configs/experiment/<table>/<row>.yaml). Several seeds of one row become mean +- sample std (n-1).
A row without a finished run shows "not run" (or "incomplete" when a run folder with a
resolved config but no results.json exists), never a number. The paper's numbers come from
configs/paper/tables.yaml, read at run time.

This file is also the one description of the paper's rows: ``load_specs()`` turns tables.yaml
into tables of rows, each with its experiment settings; scripts/gen_experiments.py writes the
experiment YAMLs from it, and tests check the sweeps against it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from _bootstrap import ROOT  # the checkout on sys.path (the framework is not installed)

PAPER_YAML = ROOT / "configs" / "paper" / "tables.yaml"

# ---------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------
MODEL = {  # tables.yaml name -> configs/model/<name>.yaml
    "mobilenetv2_035": "mbv2_035", "mobilenetv2_050": "mbv2_050", "mobilenetv2_075": "mbv2_075",
    "mobilenetv2_100": "mbv2_100", "mobilenetv3_large": "mbv3_large", "mobilenetv3_small": "mbv3_small",
    "resnet10": "resnet10", "resnet18": "resnet18", "resnet34": "resnet34", "resnet50": "resnet50",
}
PRETTY_MODEL = {
    "mbv2_035": "MobileNetV2 ×0.35", "mbv2_050": "MobileNetV2 ×0.5", "mbv2_075": "MobileNetV2 ×0.75",
    "mbv2_100": "MobileNetV2 ×1.0", "mbv3_large": "MobileNetV3-Large", "mbv3_small": "MobileNetV3-Small",
    "resnet10": "ResNet-10", "resnet18": "ResNet-18", "resnet34": "ResNet-34", "resnet50": "ResNet-50",
}
PRETTY_ACT = {
    "relu": "ReLU", "relu_se_hswish": "ReLU/SE/HS", "dyrelu_a": "DY-ReLU-A", "dyrelu_b": "DY-ReLU-B",
    "dyrelu_c": "DY-ReLU-C", "rrelu": "RReLU", "leaky_relu": "LeakyReLU", "prelu": "PReLU (channel-wise)",
    "prelu_shared": "PReLU (channel-shared)", "se_relu": "SE+ReLU", "maxout": "Maxout",
    "dyrelu_a_static": "DY-ReLU-A static twin", "dyrelu_b_static": "DY-ReLU-B static twin",
    "dyrelu_c_static": "DY-ReLU-C static twin",
}
METRIC_NAMES = {
    "top1": "top-1", "top5": "top-5", "ap": "AP", "ap50": "AP50", "ap75": "AP75", "apm": "APM", "apl": "APL",
    "params": "params", "madds": "MAdds",
}
COMPLEXITY = ("params", "madds")
BEST_KEY = {"top1": "best_top1", "ap": "best_ap"}  # --best reads these instead


def _comparable_key(key: str, results: dict) -> str:
    """The results.json key counted as the paper counts: MAdds with only DY-ReLU's multiplies
    (`madds_paper`; `madds` counts all of its work), ResNet params without the final FC."""
    if key == "madds" and "madds_paper" in results:
        return "madds_paper"
    if key == "params" and str(results.get("model", "")).startswith("resnet") and "params_no_classifier" in results:
        return "params_no_classifier"
    return key


def _act_cfg_name(act: str) -> str:
    """The paper's activation name -> configs/act/<name>.yaml. MobileNetV3's ReLU/SE/h-swish
    baseline is the standard network, which models/mobilenetv3.py builds for act=relu."""
    return "relu" if act == "relu_se_hswish" else act


def _k_overrides(act: str, k: int) -> dict:
    """act.* settings for K segments: Maxout's k, or DY-ReLU's k with one init per segment.
    For K=3 the extra segment starts like the second one (alpha = (1, 0, 0), beta = 0): the
    paper gives only the K=2 initialisation."""
    if act == "maxout":
        return {"k": int(k)}
    if act.startswith("dyrelu") and int(k) != 2:
        return {"k": int(k), "init_a": [1.0] + [0.0] * (int(k) - 1), "init_b": [0.0] * int(k)}
    return {}


def _num(v: float) -> str:
    """A number in a readable form for file names: 1.5 -> 1p5, -0.1 -> m0p1, 1.0 -> 1."""
    s = f"{float(v):g}".replace("-", "m").replace(".", "p")
    return s


# ---------------------------------------------------------------------------------------------
# the paper's tables as rows with experiment settings
# ---------------------------------------------------------------------------------------------
@dataclass
class Row:
    table: str
    id: str  # the paper row (unique within its table)
    run: str  # the experiment entry configs/experiment/<table>/<run>.yaml (rows may share one)
    labels: dict  # column -> text, in order
    paper: dict  # metric -> number (None: the paper gives none); "<metric>_std" for std
    task: str = "cls"
    model: str = "mbv2_035"
    act: str = "relu"
    act_overrides: dict = field(default_factory=dict)
    head_act: Optional[str] = None
    positions: Optional[list] = None
    section: Optional[str] = None
    note: Optional[str] = None
    describe: str = ""  # one line for the experiment file's header


@dataclass
class Table:
    id: str  # table2 ... table10, supp_table1, supp_table2 (= configs/experiment/<id>/, scripts/<id>.sh)
    title: str
    metrics: list  # metric keys shown, in order
    seeds: list
    rows: list
    layout: str = "rows"  # or "matrix" (supp_table2: backbone x head)
    paper_key: str = ""
    notes: list = field(default_factory=list)  # the paper's notes (tables.yaml) and ours

    def runs(self) -> list:
        """Unique experiment entries, in paper order."""
        seen = []
        for r in self.rows:
            if r.run not in seen:
                seen.append(r.run)
        return seen

    def row_for_run(self, run: str) -> Row:
        return next(r for r in self.rows if r.run == run)


def _cls(table, rid, labels, paper, model, act, k=2, run=None, **kw) -> Row:
    cfg_act = _act_cfg_name(act)
    over = dict(_k_overrides(cfg_act, k))
    over.update(kw.pop("act_overrides", {}))
    return Row(table=table, id=rid, run=run or rid, labels=labels, paper=paper, task="cls", model=model,
               act=cfg_act, act_overrides=over, **kw)


def _table2(P: dict) -> Table:
    """Table 2: three variants on ImageNet, MobileNetV2 x0.35, 3 seeds."""
    t = P["table2"]
    m = MODEL[t["model"]]
    return Table("table2", "Table 2. DY-ReLU variants on ImageNet, MobileNetV2 ×0.35 (mean ± std over seeds)",
                 ["top1", "top5", "params", "madds"], [0, 1, 2], [
                     _cls("table2", r["act"], {"Activation": PRETTY_ACT[r["act"]]},
                          {"top1": r["top1"], "top1_std": r["std"]}, m, r["act"],
                          describe=f"{PRETTY_ACT[r['act']]}, {PRETTY_MODEL[m]}, ImageNet")
                     for r in t["rows"]], paper_key="table2")


def _table3(P: dict) -> Table:
    """Table 3: backbone x head variants on COCO keypoints, MobileNetV2 x0.5, 3 seeds."""
    t = P["table3"]
    m = MODEL[t["backbone"]]
    rows = []
    for r in t["rows"]:
        b, h = r["backbone_act"], r["head_act"]
        rows.append(Row("table3", f"{b}-{h}", f"{b}-{h}", {"Backbone": PRETTY_ACT[b], "Head": PRETTY_ACT[h]},
                        {"ap": r["ap"], "ap_std": r["std"]}, task="kpt", model=m, act=b, head_act=h,
                        describe=f"backbone {PRETTY_ACT[b]}, head {PRETTY_ACT[h]}, {PRETTY_MODEL[m]}, COCO keypoints"))
    return Table("table3", "Table 3. DY-ReLU variants on COCO keypoints, MobileNetV2 ×0.5 backbone (mean ± std over seeds)",
                 ["ap", "params", "madds"], [0, 1, 2], rows, paper_key="table3")


def _table4(P: dict) -> Table:
    """Table 4: ImageNet, three architectures, ReLU (ReLU/SE/HS) vs DY-ReLU-B K=2."""
    rows = []
    for r in P["table4"]["rows"]:
        m, a = MODEL[r["model"]], r["act"]
        rid = f"{m}-{'relu' if a == 'relu_se_hswish' else a}"
        rows.append(_cls("table4", rid, {"Network": PRETTY_MODEL[m], "Activation": PRETTY_ACT[a]},
                         {k: r[k] for k in ("params", "madds", "top1", "top5")}, m, a,
                         describe=f"{PRETTY_ACT[a]}, {PRETTY_MODEL[m]}, ImageNet"))
    return Table("table4", "Table 4. DY-ReLU-B (K=2) vs the baseline activations on ImageNet",
                 ["top1", "top5", "params", "madds"], [0], rows, paper_key="table4")


def _table5(P: dict) -> Table:
    """Table 5: related activations, MobileNetV2 x0.35 and x1.0."""
    rows = []
    for width, m in (("x035", "mbv2_035"), ("x100", "mbv2_100")):
        for r in P["table5"]["rows"]:
            a, k = r["act"], r["k"]
            # Table 5's PReLU is the channel-shared one: its x1.0 top-1 (73.3) is the
            # supplementary Table 1's "PReLU (channel-shared)" (channel-wise: 72.9).
            cfg_a = "prelu_shared" if a == "prelu" else a
            name = f"{cfg_a}_k{k}" if a in ("maxout", "dyrelu_b") else cfg_a
            rows.append(_cls("table5", f"{width}-{name}", {"Activation": PRETTY_ACT[cfg_a], "K": str(k) if a in ("maxout", "dyrelu_b") else "—"},
                             dict(r[width]), m, cfg_a, k=k, section=PRETTY_MODEL[m],
                             describe=f"{PRETTY_ACT[cfg_a]} K={k}, {PRETTY_MODEL[m]}, ImageNet"))
    return Table("table5", "Table 5. DY-ReLU vs related activations on ImageNet, MobileNetV2 ×0.35 and ×1.0",
                 ["top1", "params", "madds"], [0], rows, paper_key="table5")


def _table6(P: dict) -> Table:
    """Table 6: dynamic piecewise functions (K, intercept, dynamic segments)."""
    rows = []
    for r in P["table6"]["rows"]:
        if r["act"] == "relu":
            rid, over = "relu", {}
        else:
            k, seg, inter = r["k"], r["dynamic_segments"], r["intercept"]
            rid = f"k{k}" + ("_seg1" if seg == 1 else "") + ("" if inter else "_noint")
            over = {"use_bias": bool(inter)}
            if seg != k:
                over["dynamic_segments"] = seg
        rows.append(_cls("table6", rid, {"Activation": PRETTY_ACT[r["act"]], "K": str(r["k"]),
                                         "intercept": "✓" if r["intercept"] else "", "function": r["function"]},
                         {"top1": r["top1"], "top5": r["top5"]}, "mbv2_035", r["act"], k=r["k"], act_overrides=over,
                         describe=f"{r['function']} ({PRETTY_ACT[r['act']]}), MobileNetV2 ×0.35, ImageNet"))
    return Table("table6", "Table 6. Dynamic piecewise functions on ImageNet, MobileNetV2 ×0.35",
                 ["top1", "top5", "params", "madds"], [0], rows, paper_key="table6")


def _table7(P: dict) -> Table:
    """Table 7: DY-ReLU-B at A1 (after expand), A2 (after depthwise), A3 (after projection)."""
    rows = []
    for r in P["table7"]["rows"]:
        pos = [p for p in ("a1", "a2", "a3") if r[p]]
        labels = {p.upper(): ("✓" if r[p] else "–") for p in ("a1", "a2", "a3")}
        if pos:
            rows.append(_cls("table7", "_".join(pos), labels, {"top1": r["top1"], "top5": r["top5"]}, "mbv2_035",
                             "dyrelu_b", positions=pos, describe=f"DY-ReLU-B at {', '.join(p.upper() for p in pos)} "
                             "(ReLU elsewhere, A3 linear where not selected), MobileNetV2 ×0.35, ImageNet"))
        else:
            rows.append(_cls("table7", "none", labels, {"top1": r["top1"], "top5": r["top5"]}, "mbv2_035", "relu",
                             describe="no DY-ReLU (the ReLU baseline), MobileNetV2 ×0.35, ImageNet"))
    return Table("table7", "Table 7. DY-ReLU-B at different layers (A1, A2, A3), ImageNet, MobileNetV2 ×0.35",
                 ["top1", "top5", "params", "madds"], [0], rows, paper_key="table7")


def _table8(P: dict) -> Table:
    """Table 8: reduction ratio R of the hyper function's first FC."""
    rows = []
    for r in P["table8"]["rows"]:
        R = r["reduction"]
        if R is None:
            rows.append(_cls("table8", "relu", {"Activation": "ReLU", "R": "–"},
                             {k: r[k] for k in ("params", "madds", "top1", "top5")}, "mbv2_035", "relu",
                             describe="ReLU baseline, MobileNetV2 ×0.35, ImageNet"))
        else:
            rows.append(_cls("table8", f"r{R}", {"Activation": "DY-ReLU-B", "R": str(R)},
                             {k: r[k] for k in ("params", "madds", "top1", "top5")}, "mbv2_035", "dyrelu_b",
                             act_overrides={"reduction": int(R)}, describe=f"DY-ReLU-B R={R}, MobileNetV2 ×0.35, ImageNet"))
    return Table("table8", "Table 8. Reduction ratio R of the hyper function, ImageNet, MobileNetV2 ×0.35",
                 ["top1", "top5", "params", "madds"], [0], rows, paper_key="table8")


def _table9(P: dict) -> Table:
    """Table 9: (a) alpha init, (b) beta init, (c) lambda_a. The default setting (alpha = (1, 0),
    beta = (0, 0), lambda_a = 1) is one run shown in all three sub-tables."""
    t, rows = P["table9"], []
    defaults = P["defaults_dyrelu"]
    for key, section, colnames in (("init_a", "(a) initialisation of α", ("α¹", "α²")),
                                   ("init_b", "(b) initialisation of β", ("β¹", "β²")),
                                   ("lambda_a", "(c) range of slope λa", ("λa",))):
        for r in t[key]:
            v = r[key]
            vals = list(v) if isinstance(v, list) else [v]
            is_default = (list(map(float, vals)) == list(map(float, defaults[key])) if isinstance(v, list)
                          else float(v) == float(defaults[key]))
            run = "default" if is_default else f"{key}_" + "_".join(_num(x) for x in vals)
            over = {} if is_default else {key: [float(x) for x in vals] if isinstance(v, list) else float(v)}
            paper = {"top1": r.get("top1"), "top5": r.get("top5")}
            rows.append(_cls("table9", f"{key}_" + "_".join(_num(x) for x in vals),
                             dict(zip(colnames, (f"{float(x):g}" for x in vals))), paper, "mbv2_035", "dyrelu_b",
                             run=run, act_overrides=over, section=section, note=r.get("note"),
                             describe="DY-ReLU-B with the paper's defaults" if is_default else
                             f"DY-ReLU-B {key}={over[key]}, MobileNetV2 ×0.35, ImageNet"))
    return Table("table9", "Table 9. DY-ReLU-B hyper-parameters, ImageNet, MobileNetV2 ×0.35",
                 ["top1", "top5"], [0], rows, paper_key="table9")


def _table10(P: dict) -> Table:
    """Table 10: COCO keypoints, DY-ReLU-C K=2 in backbone and head vs the static network."""
    rows = []
    for r in P["table10"]["rows"]:
        m, a = MODEL[r["backbone"]], r["act"]
        cfg_a = _act_cfg_name(a)
        rows.append(Row("table10", f"{m}-{cfg_a}", f"{m}-{cfg_a}", {"Backbone": PRETTY_MODEL[m], "Activation": PRETTY_ACT[a]},
                        {k: r[k] for k in ("params", "madds", "ap", "ap50", "ap75", "apm", "apl")}, task="kpt",
                        model=m, act=cfg_a, head_act=cfg_a,
                        describe=f"{PRETTY_ACT[a]} in backbone and head, {PRETTY_MODEL[m]}, COCO keypoints"))
    return Table("table10", "Table 10. DY-ReLU-C (K=2, backbone and head) vs the baseline on COCO keypoints (val2017)",
                 ["ap", "ap50", "ap75", "apm", "apl", "params", "madds"], [0], rows, paper_key="table10")


def _supp_table1(P: dict) -> Table:
    """Supplementary Table 1: related activations, MobileNetV2 x1.0."""
    rows = []
    for r in P["supplementary_table1"]["rows"]:
        a, k = r["act"], r["k"]
        name = f"{a}_k{k}" if a in ("maxout", "dyrelu_b") else a
        rows.append(_cls("supp_table1", name, {"Activation": PRETTY_ACT[a], "K": str(k) if a in ("maxout", "dyrelu_b") else "—"},
                         {k2: r[k2] for k2 in ("params", "madds", "top1", "top5")}, "mbv2_100", a, k=k,
                         describe=f"{PRETTY_ACT[a]} K={k}, MobileNetV2 ×1.0, ImageNet"))
    return Table("supp_table1", "Supplementary Table 1. Related activations on ImageNet, MobileNetV2 ×1.0",
                 ["top1", "top5", "params", "madds"], [0], rows, paper_key="supplementary_table1")


def _supp_table2(P: dict) -> Table:
    """Supplementary Table 2: all 16 backbone x head combinations, COCO keypoints, MobileNetV2 x0.5."""
    t, rows = P["supplementary_table2"], []
    for b, aps in t["rows"].items():
        for h, ap in zip(t["heads"], aps):
            rows.append(Row("supp_table2", f"{b}-{h}", f"{b}-{h}", {"Backbone": PRETTY_ACT[b], "Head": PRETTY_ACT[h]},
                            {"ap": ap}, task="kpt", model="mbv2_050", act=b, head_act=h,
                            describe=f"backbone {PRETTY_ACT[b]}, head {PRETTY_ACT[h]}, MobileNetV2 ×0.5, COCO keypoints"))
    return Table("supp_table2", "Supplementary Table 2. Backbone × head activations on COCO keypoints, "
                 "MobileNetV2 ×0.5 (AP: ours / paper (Δ))", ["ap"], [0], rows, layout="matrix",
                 paper_key="supplementary_table2")


# The tables in paper order, each built from its part of tables.yaml.
_BUILDERS = (_table2, _table3, _table4, _table5, _table6, _table7, _table8, _table9, _table10, _supp_table1, _supp_table2)


def _add_notes(T: dict, P: dict) -> None:
    """The paper's notes of each table (tables.yaml), then ours."""
    for t in T.values():
        t.notes = list((P.get(t.paper_key) or {}).get("notes") or [])
    T["table5"].notes.append("PReLU here is the channel-shared one: the paper's x1.0 number (73.3) is the "
                             "supplementary Table 1's 'PReLU (channel-shared)'; the channel-wise one is in supp_table1.")
    for tid in ("table5", "table6", "supp_table1"):
        T[tid].notes.append("K=3 DY-ReLU starts at alpha = (1, 0, 0), beta = (0, 0, 0) (the paper gives the K=2 init only).")
    T["table9"].notes.append("The default setting (alpha = (1, 0), beta = (0, 0), lambda_a = 1) is one run ('default'), "
                             "shown in all three sub-tables.")


def load_specs(path: Path | str = PAPER_YAML) -> dict:
    """Every table of the paper and its supplement, from configs/paper/tables.yaml."""
    P = yaml.safe_load(Path(path).read_text())
    T = {t.id: t for t in (build(P) for build in _BUILDERS)}
    _add_notes(T, P)
    return T


# ---------------------------------------------------------------------------------------------
# gathering runs
# ---------------------------------------------------------------------------------------------
@dataclass
class Run:
    dir: Path
    table: Optional[str]
    row: Optional[str]
    seed: Optional[int]
    results: Optional[dict]  # None: incomplete (a resolved config but no results.json)
    mtime: float
    config: Optional[dict] = None

    @property
    def is_demo(self) -> bool:
        """Trained on a generated demo set: never set beside the paper's ImageNet / COCO numbers."""
        from engine.sweep import DEMO_DATA

        data = ((self.config or {}).get("data") or {}).get("name") or (self.results or {}).get("data")
        return data in DEMO_DATA


def _read_config(run_dir: Path) -> Optional[dict]:
    """The run's .hydra/config.yaml, its ``${recipe.*}`` values resolved (Hydra saves them unresolved)."""
    p = run_dir / ".hydra" / "config.yaml"
    if not p.is_file():
        return None
    try:
        cfg = yaml.safe_load(p.read_text())
    except Exception:
        return None
    return _resolved(cfg) if isinstance(cfg, dict) else cfg


def _resolved(cfg: dict) -> dict:
    """``cfg`` with its interpolations resolved where they resolve (each top-level node alone, so one
    that needs Hydra's runtime, e.g. ``${hydra:...}``, keeps its text and the rest still resolve)."""
    from omegaconf import OmegaConf

    root = OmegaConf.create(cfg)
    out = {}
    for key in cfg:
        try:
            out[key] = OmegaConf.to_container(root[key], resolve=True) if OmegaConf.is_config(root[key]) else root[key]
        except Exception:
            out[key] = cfg[key]
    return out


#: the paper's setting where our recipe departs from it (configs/recipe/paper.yaml)
def _paper_recipe() -> dict:
    return _group_defaults("recipe", "paper")


def departures(cfg: dict) -> list:
    """Every setting of a run's (resolved) config that departs from the paper's recipe, one text each:
    DY-ReLU-C's tau, the spatial convs' lr, FC2's start, and our other DY-ReLU knobs when set."""
    paper = _paper_recipe()
    out = []
    acts = [(k, cfg.get(k)) for k in ("act", "head_act")
            if isinstance(cfg.get(k), dict) and str(cfg[k].get("name", "")).startswith("dyrelu")]
    if not acts:
        return out
    has_c = any(a.get("tau") is not None for _, a in acts)  # the DY-ReLU-C configs carry tau
    for key, act in acts:
        if act.get("tau") is not None and float(act["tau"]) != float(paper["tau"]):
            out.append(f"{key}.tau={float(act['tau']):g} (the paper: {float(paper['tau']):g})")
        if act.get("hyper_init") is not None and act["hyper_init"] != paper["hyper_init"]:
            out.append(f"{key}.hyper_init={act['hyper_init']} (the paper says nothing of FC2's init; "
                       f"recipe=paper: {paper['hyper_init']}, PyTorch's default)")
        if act.get("spatial_norm") not in (None, "none"):
            out.append(f"{key}.spatial_norm={act['spatial_norm']} (the paper: none)")
    optim, trainer = cfg.get("optim") or {}, cfg.get("trainer") or {}
    hyper = float(optim.get("hyper_lr_scale") if optim.get("hyper_lr_scale") is not None else 1.0)
    spatial = optim.get("spatial_lr_scale")
    spatial = hyper if spatial is None else float(spatial)
    if hyper != 1.0:
        out.append(f"optim.hyper_lr_scale={hyper:g} (the paper: one lr for all)")
    if has_c and spatial != float(paper["spatial_lr_scale"]):
        out.append(f"optim.spatial_lr_scale={spatial:g} (the paper: one lr for all)")
    if optim.get("hyper_weight_decay") is not None:
        out.append(f"optim.hyper_weight_decay={optim['hyper_weight_decay']} (the paper: one weight decay)")
    if trainer.get("dyrelu_warmup_epochs"):
        out.append(f"trainer.dyrelu_warmup_epochs={trainer['dyrelu_warmup_epochs']} (lambda ramp; not in the paper)")
    ts = trainer.get("tau_schedule") or {}
    if has_c and (ts.get("start") is not None or ts.get("end") is not None):
        out.append(f"trainer.tau_schedule start={ts.get('start')} end={ts.get('end')} (the paper: 10 early, no schedule given)")
    return out


def departure_notes(table: "Table", cells: dict) -> list:
    """One line per departure the table's runs used, naming the entries that used it."""
    used: dict = {}
    entries = [rid for rid in table.runs() if cells[rid].status == "done"]
    for rid in entries:
        for cfg in cells[rid].configs:
            for text in departures(cfg or {}):
                used.setdefault(text, [])
                if rid not in used[text]:
                    used[text].append(rid)
    return [f"`{text}`: " + ("every entry" if len(rids) == len(entries) else ", ".join(rids)) for text, rids in used.items()]


def gather(dirs) -> list:
    """Every run under ``dirs``: finished ones (results.json) and incomplete ones (.hydra/config.yaml only)."""
    runs, seen = [], set()
    for d in dirs:
        d = Path(d)
        if not d.exists():
            print(f"warning: {d} does not exist", file=sys.stderr)
            continue
        for p in sorted(d.rglob("results.json")):
            if ".submitit" in p.parts:
                continue
            run_dir = p.parent.resolve()
            if run_dir in seen:
                continue
            seen.add(run_dir)
            try:
                res = json.loads(p.read_text())
            except (OSError, ValueError) as exc:
                print(f"warning: skipping unreadable {p}: {exc}", file=sys.stderr)
                continue
            cfg = _read_config(run_dir)
            if res.get("status", "completed") != "completed":
                print(f"note: {run_dir} {res.get('status')} ({res.get('reason', 'no reason given')}); skipped", file=sys.stderr)
                res = None  # shown as incomplete, never as a number
            elif (run_dir / "error.json").is_file():
                print(f"note: {run_dir} failed (see its error.json); skipped", file=sys.stderr)
                res = None
            table, row = (res or {}).get("table"), (res or {}).get("row")
            if (table is None or row is None) and cfg:
                table, row = table or cfg.get("table"), row or cfg.get("row")
            seed = res.get("seed") if res else (cfg or {}).get("seed")
            runs.append(Run(run_dir, table, row, seed, res, p.stat().st_mtime, cfg))
        for p in sorted(d.rglob("config.yaml")):
            if p.parent.name != ".hydra" or ".submitit" in p.parts:
                continue
            run_dir = p.parent.parent.resolve()
            if run_dir in seen:
                continue
            seen.add(run_dir)
            cfg = _read_config(run_dir) or {}
            runs.append(Run(run_dir, cfg.get("table"), cfg.get("row"), cfg.get("seed"), None, p.stat().st_mtime, cfg))
    return runs


@dataclass
class Cell:
    """What we have for one (table, run id): finished seeds and their metrics."""
    status: str  # "done" | "incomplete" | "not run"
    seeds: list = field(default_factory=list)
    values: dict = field(default_factory=dict)  # metric -> list of values (one per seed)
    dirs: list = field(default_factory=list)
    reused: Optional[str] = None  # "<table>/<row>" of the runs borrowed with --reuse
    configs: list = field(default_factory=list)  # each seed's resolved config (departures from the paper)

    def mean(self, metric):
        vals = [v for v in self.values.get(metric, []) if v is not None]
        return sum(vals) / len(vals) if vals else None

    def std(self, metric):
        vals = [v for v in self.values.get(metric, []) if v is not None]
        if len(vals) < 2:
            return None
        m = sum(vals) / len(vals)
        return math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


# --reuse: a row without runs of its own borrows the runs of an identical experiment of another
# table (e.g. Table 7's all-three row is Table 2's DY-ReLU-B). Identical means: the row's model,
# activation(s) and positions as its entry sets them, and the same recipe (data, optim, sched, aug,
# task, trainer, model kwargs) as the table's own finished runs. Off by default.
_PRESENTATION = ("device", "progress", "log_every", "val_every", "compile")


def _recipe(cfg: dict) -> str:
    c = {k: cfg.get(k) for k in ("optim", "sched", "aug", "task")}
    c["data"] = {k: v for k, v in (cfg.get("data") or {}).items() if k not in ("root", "num_workers")}
    c["trainer"] = {k: v for k, v in (cfg.get("trainer") or {}).items() if k not in _PRESENTATION}
    c["model"] = {k: v for k, v in (cfg.get("model") or {}).items() if k not in ("name", "positions")}
    return json.dumps(c, sort_keys=True, default=str)


def _group_defaults(group: str, name: str) -> dict:
    p = ROOT / "configs" / group / f"{name}.yaml"
    return (yaml.safe_load(p.read_text()) or {}) if p.is_file() else {}


def _act_defaults(name: str, cfg: dict) -> dict:
    """configs/act/<name>.yaml with its ``${recipe.*}`` values as the run's recipe set them (an older
    run without a recipe node had our default recipe's values)."""
    recipe = cfg.get("recipe") if isinstance(cfg.get("recipe"), dict) else _group_defaults("recipe", "ours")
    return _resolved({"recipe": recipe, "act": _group_defaults("act", name)})["act"]


def _matches_row(cfg: dict, row: Row) -> bool:
    """Whether a run's resolved config is the experiment of ``row`` (ignoring the recipe)."""
    if (cfg.get("task") or {}).get("name") != row.task or (cfg.get("model") or {}).get("name") != row.model:
        return False
    act = {**_act_defaults(row.act, cfg), **row.act_overrides}
    if (cfg.get("act") or {}) != act:
        return False
    if row.head_act is not None and (cfg.get("head_act") or {}) != _act_defaults(row.head_act, cfg):
        return False
    if row.head_act is None and row.task == "kpt":
        return False
    positions = row.positions if row.positions is not None else (_group_defaults("model", row.model).get("model") or {}).get("positions")
    return (cfg.get("model") or {}).get("positions") == positions


def _borrow(runs, table: Table, run_id: str):
    """Finished runs of another table that are this row's experiment with this table's recipe."""
    own = [r for r in runs if r.table == table.id and r.results is not None and r.config]
    recipes = {_recipe(r.config) for r in own}
    if len(recipes) != 1:  # no run of this table yet (recipe unknown) or mixed recipes: do not guess
        return None, []
    row = table.row_for_run(run_id)
    cands = [r for r in runs if r.results is not None and r.config and r.table != table.id
             and _recipe(r.config) in recipes and _matches_row(r.config, row)]
    if not cands:
        return None, []
    src = sorted({f"{r.table}/{r.row}" for r in cands})[0]
    cands = [r for r in cands if f"{r.table}/{r.row}" == src]
    return src, [r for r in cands if r.seed in table.seeds] or cands  # this table's seeds where there are


def collect(runs, table: Table, best: bool = False, reuse: bool = False) -> dict:
    """run id -> Cell. Several results for one seed (e.g. a sweep run twice): the newest counts."""
    cells = {}
    for run_id in table.runs():
        mine = [r for r in runs if r.table == table.id and r.row == run_id]
        done = [r for r in mine if r.results is not None]
        src = None
        if not done and reuse:
            src, done = _borrow(runs, table, run_id)
        if not done:
            cells[run_id] = Cell("incomplete" if mine else "not run", dirs=[str(r.dir) for r in mine])
            continue
        by_seed = {}
        for r in sorted(done, key=lambda r: r.mtime):
            if r.seed in by_seed:
                print(f"note: {table.id}/{run_id} seed {r.seed}: using {r.dir} (newer than {by_seed[r.seed].dir})", file=sys.stderr)
            by_seed[r.seed] = r
        cell = Cell("done", reused=src)
        for seed in sorted(by_seed, key=lambda s: (s is None, s)):
            r = by_seed[seed]
            cell.seeds.append(seed)
            cell.dirs.append(str(r.dir))
            cell.configs.append(r.config)
            for metric in table.metrics:
                key = BEST_KEY.get(metric, metric) if best else metric
                key = _comparable_key(key, r.results)
                v = r.results.get(key, r.results.get(metric))
                if v is not None and metric in COMPLEXITY:
                    v = float(v) / 1e6
                cell.values.setdefault(metric, []).append(None if v is None else float(v))
        cells[run_id] = cell
    return cells


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------
def _fmt_paper(v) -> str:
    s = f"{float(v):.2f}".rstrip("0")
    return s + "0" if s.endswith(".") else s


def _fmt_ours(metric, v) -> str:
    return f"{v:.1f}" if metric == "madds" else f"{v:.2f}"


def _ours(cell: Cell, metric: str) -> str:
    if cell.status != "done":
        return cell.status
    m = cell.mean(metric)
    if m is None:
        return "—"
    s = _fmt_ours(metric, m)
    sd = cell.std(metric)
    return f"{s} ± {sd:.2f}" if sd is not None and metric not in COMPLEXITY else s


def _paper(row: Row, metric: str) -> str:
    v = row.paper.get(metric)
    if v is None:
        return row.note or "—"
    sd = row.paper.get(f"{metric}_std")
    return f"{_fmt_paper(v)} ± {_fmt_paper(sd)}" if sd is not None else _fmt_paper(v)


def _delta(cell: Cell, row: Row, metric: str) -> str:
    v, m = row.paper.get(metric), cell.mean(metric) if cell.status == "done" else None
    if v is None or m is None:
        return "—"
    return f"{m - float(v):+.2f}"


def _md_table(header, lines) -> list:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return out


DEMO_NOTE = ("Demo data (`data=demo` / `coco_demo`): a generated stand-in that tests the pipeline. Its numbers are "
             "not comparable with the paper's ImageNet / COCO results, so the paper's column and Δ are left out.")


def render_table(table: Table, cells: dict, best: bool = False, demo: bool = False) -> str:
    """The table in the paper's layout; ``demo``: runs on demo data, our columns alone."""
    metric_note = " (best epoch)" if best else " (final epoch)"
    done = sum(1 for r in table.runs() if cells[r].status == "done")
    lines = [f"## {table.title}" + (" — demo data" if demo else ""), "",
             f"Runs found: {done}/{len(table.runs())} entries (configs/experiment/{table.id}/); "
             f"sweep: `bash scripts/{table.id}.sh`; seeds per entry: {','.join(map(str, table.seeds))}. "
             f"Accuracy/AP in %{metric_note}; params and MAdds in millions" + ("." if demo else "; Δ = ours − paper."), ""]
    if demo:
        lines += [f"**{DEMO_NOTE}**", ""]
    elif table.notes:
        lines += [f"- {n}" for n in table.notes] + [""]
    if table.layout == "matrix":
        heads = list(dict.fromkeys(r.labels["Head"] for r in table.rows))
        backs = list(dict.fromkeys(r.labels["Backbone"] for r in table.rows))
        body = []
        for b in backs:
            line = [b]
            for h in heads:
                r = next(x for x in table.rows if x.labels["Backbone"] == b and x.labels["Head"] == h)
                c = cells[r.run]
                cell = _ours(c, "ap") if demo else f"{_ours(c, 'ap')} / {_paper(r, 'ap')} ({_delta(c, r, 'ap')})"
                line.append(cell + (f" [from {c.reused}]" if c.reused else ""))
            body.append(line)
        lines += _md_table(["Backbone \\ Head"] + heads, body) + [""]
        return "\n".join(lines + _departures_block(table, cells, demo))
    sections = list(dict.fromkeys(r.section for r in table.rows))
    for sec in sections:
        rows = [r for r in table.rows if r.section == sec]
        if sec:
            lines += [f"**{sec}**", ""]
        header = list(rows[0].labels)
        cols = []
        for metric in table.metrics:
            has_paper = any(r.paper.get(metric) is not None or (r.note and metric in r.paper) for r in rows)
            name = METRIC_NAMES[metric]
            cols.append((metric, "ours", f"{name} ours"))
            if has_paper and not demo:
                cols.append((metric, "paper", f"{name} paper"))
                if metric not in COMPLEXITY:
                    cols.append((metric, "delta", f"Δ {name}"))
        header += [c[2] for c in cols] + ["seeds"]
        body = []
        for r in rows:
            c = cells[r.run]
            line = [r.labels[k] for k in rows[0].labels]
            first = True
            for metric, kind, _ in cols:
                if kind == "ours":  # a missing run says so once, then "—"
                    line.append(_ours(c, metric) if (first or c.status == "done") else "—")
                    first = False
                else:
                    line.append(_paper(r, metric) if kind == "paper" else _delta(c, r, metric))
            line.append((",".join(str(s) for s in c.seeds) if c.seeds else "—") + (f" (from {c.reused})" if c.reused else ""))
            body.append(line)
        lines += _md_table(header, body) + [""]
    return "\n".join(lines + _departures_block(table, cells, demo))


def _departures_block(table: Table, cells: dict, demo: bool) -> list:
    """Under a table set beside the paper's numbers: every departure from the paper its runs used."""
    notes = [] if demo else departure_notes(table, cells)
    if not notes:
        return []
    return ["Departures from the paper in these runs (ours; `recipe=paper` runs the paper's setting):", ""] + \
        [f"- {n}" for n in notes] + [""]


def table_json(table: Table, cells: dict) -> dict:
    out = []
    for r in table.rows:
        c = cells[r.run]
        out.append({"row": r.id, "run": r.run, "section": r.section, "labels": r.labels, "status": c.status,
                    "seeds": c.seeds, "dirs": c.dirs, "paper": r.paper,
                    "departures": sorted({d for cfg in c.configs for d in departures(cfg or {})}),
                    "ours": {m: {"mean": c.mean(m), "std": c.std(m), "values": c.values.get(m, [])} for m in table.metrics}})
    return {"table": table.id, "title": table.title, "rows": out}


# ---------------------------------------------------------------------------------------------
# W&B
# ---------------------------------------------------------------------------------------------
def _logged_to_wandb(cfg) -> bool:
    lg = (cfg or {}).get("logger") or {}
    return "wandb" in (lg.get("backends") or []) and (lg.get("wandb") or {}).get("mode") != "disabled"


def log_wandb(tables, texts, data, runs, out_dir: Path, project=None, entity=None, mode=None) -> None:
    """One W&B run per table (job_type make_tables) in the table's group, beside that table's training
    runs: the markdown as an artifact and a W&B Table with our number beside the paper's per row and
    metric. Mode: --wandb-mode, else $WANDB_MODE, else online with an API key, offline without."""
    import wandb

    from engine.loggers import wandb_mode, wandb_sync_hint

    mode = mode or wandb_mode("auto")
    offline_dirs = []
    for table in tables:
        cfgs = [r.config for r in runs if r.table == table.id and r.config]
        wcfg = ((cfgs[0].get("logger") or {}).get("wandb") or {}) if cfgs else {}
        group = wcfg.get("group") or table.id
        path = out_dir / f"{table.id}.md"
        path.write_text(texts[table.id])
        run = wandb.init(project=project or wcfg.get("project") or "dyrelu", entity=entity or wcfg.get("entity"),
                         group=group, job_type="make_tables", name=f"{table.id}-tables", dir=str(out_dir), mode=mode,
                         tags=[table.id, "tables"], reinit="finish_previous")
        art = wandb.Artifact(f"{table.id}-tables", type="tables")
        art.add_file(str(path), name="tables.md")
        run.log_artifact(art)
        wt = wandb.Table(columns=["row", "metric", "ours", "ours_std", "paper", "delta", "status", "seeds"])
        for r in data[table.id]["rows"]:
            for m, o in r["ours"].items():
                paper = r["paper"].get(m)
                delta = o["mean"] - paper if o["mean"] is not None and isinstance(paper, (int, float)) else None
                wt.add_data(r["row"], m, o["mean"], o["std"], paper, delta, r["status"],
                            ",".join(map(str, r["seeds"])))
        run.log({f"{table.id}/table": wt})
        if mode == "offline":
            offline_dirs.append(Path(run.dir).parent)
        run.finish()
    if offline_dirs:
        print(wandb_sync_hint(offline_dirs), file=sys.stderr)


# ---------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="*", help="sweep folders (searched recursively for results.json)")
    ap.add_argument("--out", default="tables.md", help="markdown file to write (default: tables.md)")
    ap.add_argument("--tables", default=None, help="comma-separated table ids (default: tables with runs)")
    ap.add_argument("--all", action="store_true", help="print every table, also those without any run")
    ap.add_argument("--best", action="store_true", help="best-epoch top-1/AP (best_top1, best_ap) instead of the final epoch")
    ap.add_argument("--reuse", action="store_true", help="fill a row without runs from an identical experiment of another "
                    "table (same model, activations, positions and recipe), marked 'from <table>/<row>'")
    ap.add_argument("--json", default=None, help="also write the cells as JSON here")
    ap.add_argument("--paper", default=str(PAPER_YAML), help="the paper's numbers (default: configs/paper/tables.yaml)")
    ap.add_argument("--list-runs", metavar="TABLE", help="print the experiment entries of TABLE, one a line, and exit")
    ap.add_argument("--wandb", action=argparse.BooleanOptionalAction, default=None,
                    help="log each table to W&B (artifact tables.md in the table's group); default: on for the "
                    "tables whose runs logged to W&B (logger=wandb), off otherwise")
    ap.add_argument("--wandb-project", default=None)
    ap.add_argument("--wandb-entity", default=None)
    ap.add_argument("--wandb-mode", default=None, choices=["online", "offline", "disabled"])
    args = ap.parse_args(argv)

    specs = load_specs(args.paper)
    if args.list_runs:
        if args.list_runs not in specs:
            ap.error(f"unknown table {args.list_runs!r}; valid: {', '.join(specs)}")
        print("\n".join(specs[args.list_runs].runs()))
        return 0
    if not args.dirs:
        ap.error("give at least one sweep folder")
    runs = gather(args.dirs)
    known = {(t.id, r) for t in specs.values() for r in t.runs()}
    for r in runs:
        if r.table is not None and (r.table, r.row) not in known:
            print(f"note: {r.dir}: table={r.table} row={r.row} is not a row of the paper's tables", file=sys.stderr)
    paper_runs = [r for r in runs if not r.is_demo]
    demo_runs = [r for r in runs if r.is_demo]
    other_runs = [r for r in runs if (r.table, r.row) not in known]
    if args.tables:
        wanted = [t.strip() for t in args.tables.split(",") if t.strip()]
        bad = [t for t in wanted if t not in specs]
        if bad:
            ap.error(f"unknown tables {bad}; valid: {', '.join(specs)}")
    elif args.all:
        wanted = list(specs)
    else:
        wanted = [t for t in specs if any(r.table == t for r in paper_runs)]
    wanted_demo = [t for t in (wanted if args.tables else specs) if any(r.table == t for r in demo_runs)]
    if not runs:
        print(f"no runs under {', '.join(args.dirs)} (no results.json or .hydra/config.yaml found)", file=sys.stderr)
        return 1

    texts, js = {}, []
    for tid in wanted:
        cells = collect(paper_runs, specs[tid], best=args.best, reuse=args.reuse)
        texts[tid] = render_table(specs[tid], cells, best=args.best)
        js.append(table_json(specs[tid], cells))
    parts = [texts[t] for t in wanted]
    for tid in wanted_demo:
        cells = collect(demo_runs, specs[tid], best=args.best, reuse=args.reuse)
        parts.append(render_table(specs[tid], cells, best=args.best, demo=True))
        js.append({**table_json(specs[tid], cells), "demo": True})
    if other_runs and not args.tables:
        parts.append(render_other_runs(other_runs))
    md = ("# DY-ReLU: our runs beside the paper" if wanted else "# DY-ReLU: our runs") + "\n\nSweep folders: " + ", ".join(f"`{d}`" for d in args.dirs) + "\n\n"
    md += "\n".join(parts)
    print(md)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(md)
    if args.json:
        Path(args.json).write_text(json.dumps(js, indent=2))
    to_wandb = wanted if args.wandb else [] if args.wandb is False else [t for t in wanted if any(
        _logged_to_wandb(r.config) for r in paper_runs if r.table == t)]
    if to_wandb:
        log_wandb([specs[t] for t in to_wandb], texts, {j["table"]: j for j in js if not j.get("demo")}, paper_runs,
                  out.resolve().parent, args.wandb_project, args.wandb_entity, args.wandb_mode)
    return 0


OTHER_HINT = ("These runs are of no paper table (they carry no `table`/`row` of configs/paper/tables.yaml), so they are "
              "shown with our columns alone. To put runs beside the paper, run a table's sweep: "
              "`bash scripts/table2.sh data.root=$IMAGENET` (docs/tables.md lists every table's command).")


def render_other_runs(runs) -> str:
    """Runs that fill no paper table: the sweep summary's columns (engine/sweep.py), and a hint."""
    from engine.sweep import read_run, render_markdown

    rows = [read_run(r.dir) for r in sorted(runs, key=lambda r: str(r.dir))]
    md = render_markdown(rows, "Runs of no paper table")
    head, _, rest = md.partition("\n\n")
    return f"{head}\n\n{OTHER_HINT}\n\n{rest}"

if __name__ == "__main__":
    sys.exit(main())

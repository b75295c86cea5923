#!/usr/bin/env python
"""Params and MAdds of a model zoo network, counted with fvcore (eval mode, batch 1).

    python scripts/complexity.py model=mbv2_100 act=dyrelu_b
    python scripts/complexity.py model=mbv2_035 act=dyrelu_b act.k=3 act.reduction=16
    python scripts/complexity.py model=mbv2_035 act=dyrelu_b model.positions=[a1,a2]
    python scripts/complexity.py task=kpt model=mbv2_050 act=dyrelu_c act@head_act=dyrelu_c
    python scripts/complexity.py model=resnet50 --input-size 160 160
    python scripts/complexity.py --paper-table --out complexity.md

The arguments are ``train.py``'s overrides: the config is composed with Hydra's compose API
(engine.config.compose) and the network is built by the task as training builds it, so an
override that ``train.py`` rejects is rejected here with the same message.

    --input-size H W       default 224 224 (cls), 256 192 (task=kpt): the paper's sizes, whatever the data
    --num-classes N        classifier width (default 1000, ImageNet)

The last stdout line is one JSON object: model, act, task, input_size, params, madds (plain ints),
plus params_no_classifier, madds_paper, madds_base, madds_dynamic, fvcore_default (and head_act).
``madds`` counts DY-ReLU's own work (pooling, the K-segment apply, max, normalisation, attention);
``madds_paper`` counts only its multiplies (the paper's convention); see dyrelu/flops.py.

``--paper-table`` counts every row of the paper's Tables 4, 5, 8, 10 and supplementary Table 1 and
prints a markdown table beside the paper's numbers (from configs/paper/tables.yaml); ``--out F``
writes it to F, between ``<!-- complexity-table:begin -->`` / ``<!-- complexity-table:end -->``
markers when F has them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from _bootstrap import ROOT  # the checkout on sys.path (the framework is not installed)

CONFIGS = ROOT / "configs"
TABLES = CONFIGS / "paper" / "tables.yaml"
BEGIN, END = "<!-- complexity-table:begin -->", "<!-- complexity-table:end -->"

# paper model names (tables.yaml) -> model zoo names
PAPER_MODELS = {
    "mobilenetv2_100": "mbv2_100", "mobilenetv2_075": "mbv2_075", "mobilenetv2_050": "mbv2_050",
    "mobilenetv2_035": "mbv2_035", "mobilenetv3_large": "mbv3_large", "mobilenetv3_small": "mbv3_small",
    "resnet50": "resnet50", "resnet34": "resnet34", "resnet18": "resnet18", "resnet10": "resnet10",
}
PAPER_SIZES = {"cls": (224, 224), "kpt": (256, 192)}


def build(overrides: Sequence[str], input_size: Optional[Sequence[int]] = None, num_classes: int = 1000):
    """(module, description) for ``train.py``'s overrides."""
    from engine.config import compose
    from engine.tasks import build_task

    cfg = compose(overrides)
    task = build_task(cfg)
    if cfg.task.name == "cls":
        task.num_classes = int(num_classes)  # what the datasets would set; none is built here
    net = task.build_model()
    desc: Dict[str, Any] = dict(model=str(cfg.model.name), act=str(cfg.act.name), task=str(cfg.task.name))
    if cfg.task.name == "kpt":
        desc["head_act"] = str(cfg.head_act.name)
    size = tuple(int(s) for s in (input_size or PAPER_SIZES[cfg.task.name]))
    desc["input_size"] = list(size)
    desc["overrides"] = list(overrides)
    return net, desc


def count(overrides: Sequence[str], input_size: Optional[Sequence[int]] = None, num_classes: int = 1000) -> Dict[str, Any]:
    import torch
    from dyrelu.flops import count_complexity

    torch.manual_seed(0)
    net, desc = build(overrides, input_size, num_classes)
    r = count_complexity(net, tuple(desc["input_size"]))
    keys = ("params", "params_no_classifier", "madds", "madds_paper", "madds_base", "madds_dynamic", "fvcore_default")
    desc.update({k: int(r[k]) for k in keys})
    return desc


# ---- the paper's tables -------------------------------------------------------------------------
def _act(act: str) -> str:
    return "relu" if act == "relu_se_hswish" else act  # MobileNetV3's standard ReLU/SE/h-swish network is act=relu


def _act_ovr(act: str, k: Optional[int] = None, reduction: Optional[int] = None) -> List[str]:
    act = _act(act)
    out = [f"act={act}"]
    if k is not None and act in ("maxout", "dyrelu_a", "dyrelu_b", "dyrelu_c"):
        out.append(f"act.k={int(k)}")
    if reduction is not None:
        out.append(f"act.reduction={int(reduction)}")
    return out


def paper_rows(tables: Dict[str, Any]) -> List[Tuple[str, str, List[str], float, float]]:
    """(table, label, overrides, paper params M, paper madds M) for every row with params/MAdds."""
    rows = []
    for r in tables["table4"]["rows"]:
        cfg = [f"model={PAPER_MODELS[r['model']]}", *_act_ovr(r["act"])]
        rows.append(("Table 4", f"{r['model']} {r['act']}", cfg, r["params"], r["madds"]))
    for r in tables["table5"]["rows"]:
        for width, model in (("x035", "mbv2_035"), ("x100", "mbv2_100")):
            cfg = [f"model={model}", *_act_ovr(r["act"], k=r.get("k"))]
            k = f" K={r['k']}" if r["act"] in ("maxout", "dyrelu_b") else ""
            rows.append(("Table 5", f"{model} {r['act']}{k}", cfg, r[width]["params"], r[width]["madds"]))
    for r in tables["table8"]["rows"]:
        cfg = ["model=mbv2_035", *_act_ovr(r["act"], reduction=r.get("reduction"))]
        red = f" R={r['reduction']}" if r.get("reduction") else ""
        rows.append(("Table 8", f"mbv2_035 {r['act']}{red}", cfg, r["params"], r["madds"]))
    for r in tables["table10"]["rows"]:
        act = _act(r["act"])
        cfg = ["task=kpt", f"model={PAPER_MODELS[r['backbone']]}", f"act={act}", f"act@head_act={act}"]
        rows.append(("Table 10", f"{r['backbone']} {r['act']} (kpt 256x192)", cfg, r["params"], r["madds"]))
    for r in tables["supplementary_table1"]["rows"]:
        cfg = ["model=mbv2_100", *_act_ovr(r["act"], k=r.get("k"))]
        k = f" K={r['k']}" if r["act"] in ("maxout", "dyrelu_b") else ""
        rows.append(("Supp. Table 1", f"mbv2_100 {r['act']}{k}", cfg, r["params"], r["madds"]))
    return rows


def _pct(ours: float, paper: float) -> str:
    return f"{100.0 * (ours - paper) / paper:+.1f}%"


def paper_table(out: Optional[str], only: Optional[List[str]] = None) -> Dict[str, Any]:
    tables = yaml.safe_load(TABLES.read_text())
    cache: Dict[str, Dict[str, Any]] = {}
    lines = [
        "| table | row | paper params (M) | ours (M) | diff | paper MAdds (M) | ours, paper convention (M) | diff | ours, full count (M) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    t0 = time.time()
    rows = paper_rows(tables)
    for table, label, cfg, p_params, p_madds in rows:
        if only and not any(o.lower() in table.lower() for o in only):
            continue
        key = " ".join(cfg)
        if key not in cache:
            cache[key] = count(cfg)
            print(f"[{time.time() - t0:6.0f}s] {label}: {cache[key]['params'] / 1e6:.2f} M, "
                  f"{cache[key]['madds_paper'] / 1e6:.1f} M MAdds", file=sys.stderr)
        r = cache[key]
        resnet = r["model"].startswith("resnet")
        params = (r["params_no_classifier"] if resnet else r["params"]) / 1e6
        lines.append(
            f"| {table} | {label}{' (no FC)' if resnet else ''} | {p_params:.1f} | {params:.2f} | {_pct(params, p_params)} | "
            f"{p_madds:.1f} | {r['madds_paper'] / 1e6:.1f} | {_pct(r['madds_paper'] / 1e6, p_madds)} | {r['madds'] / 1e6:.1f} |"
        )
    cmd = "python scripts/complexity.py --paper-table --out complexity.md"
    when = time.strftime("%Y-%m-%d")
    text = "\n".join([f"Generated on {when} by `{cmd}` (fvcore, eval mode, batch 1; 224x224, keypoints 256x192).", ""]
                     + lines) + "\n"
    if out:
        write_markdown(out, text)
    print(text)
    return {"rows": len(lines) - 2, "unique_models": len(cache), "out": out, "seconds": round(time.time() - t0, 1)}


def write_markdown(out: str, text: str) -> None:
    """Write ``text`` to ``out``, between the BEGIN/END markers when the file has them."""
    path = Path(out)
    old = path.read_text() if path.is_file() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        path.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")
    else:
        path.write_text(text)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="train.py's overrides (model=, act=, act.k=, model.positions=, task=, ...)")
    ap.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), default=None,
                    help="default 224 224 (cls), 256 192 (task=kpt)")
    ap.add_argument("--num-classes", type=int, default=1000)
    ap.add_argument("--paper-table", action="store_true", help="count every row of Tables 4, 5, 8, 10, supp. 1")
    ap.add_argument("--out", default=None, help="with --paper-table: markdown file to write")
    ap.add_argument("--only", nargs="*", default=None, help="with --paper-table: only these tables (e.g. 'Table 4')")
    args = ap.parse_intermixed_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import warnings

    warnings.filterwarnings("ignore")
    from engine.errors import exit_on_user_error

    with exit_on_user_error():
        if args.paper_table:
            result = paper_table(args.out, args.only)
        else:
            result = count(args.overrides, args.input_size, args.num_classes)
            for k in ("params", "params_no_classifier", "madds", "madds_paper"):
                print(f"{k:>22}: {result[k]:>14,d}")
        print(json.dumps(result, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

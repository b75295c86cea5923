#!/usr/bin/env python
"""Params and MAdds of a model zoo network, counted with fvcore (eval mode, batch 1).

    python scripts/complexity.py model=mbv2_100 act=dyrelu_b
    python scripts/complexity.py model=mbv2_035 act=dyrelu_b act.k=3 act.reduction=16
    python scripts/complexity.py model=mbv2_035 act=dyrelu_b model.positions=[a1,a2]
    python scripts/complexity.py model=mbv2_050 act=dyrelu_c task=kpt head_act=dyrelu_c
    python scripts/complexity.py model=resnet50 input_size=[160,160]
    python scripts/complexity.py --paper-table --out complexity.md

Overrides are Hydra-style ``key=value`` (values parsed as YAML: 3, 0.5, [a1,a2], null, true), but
parsed here without composing the Hydra app, so the script works on its own:

    model=<name>           models.list_models()                       (default mbv2_100)
    act=<name>             dyrelu activation name; the base spec is configs/act/<name>.yaml when it
                           exists (what training uses), else {"name": <name>}   (default relu)
    act.<kw>=<v>           override one key of the act spec (k, reduction, variant defaults, ...)
    model.<kw>=<v>         model kwarg (positions, dropout, hyper_sizing, hyper_min, se, ...); the base
                           kwargs are configs/model/<name>.yaml's ``model:`` keys when that file exists
    task=cls|kpt           kpt builds models.build_pose_model(model, act, head_act, ...)   (default cls)
    head_act=<name>, head_act.<kw>=<v>   the keypoint head's activation (default relu)
    input_size=[H,W] | N   default 224x224 (cls), 256x192 (kpt)
    num_classes=<n>        default 1000

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
from typing import Any, Dict, List, Optional, Tuple

import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIGS = ROOT / "configs"
TABLES = CONFIGS / "paper" / "tables.yaml"
BEGIN, END = "<!-- complexity-table:begin -->", "<!-- complexity-table:end -->"

# paper model names (tables.yaml) -> model zoo names
PAPER_MODELS = {
    "mobilenetv2_100": "mbv2_100", "mobilenetv2_075": "mbv2_075", "mobilenetv2_050": "mbv2_050",
    "mobilenetv2_035": "mbv2_035", "mobilenetv3_large": "mbv3_large", "mobilenetv3_small": "mbv3_small",
    "resnet50": "resnet50", "resnet34": "resnet34", "resnet18": "resnet18", "resnet10": "resnet10",
}


# ---- overrides ----------------------------------------------------------------------------------
def parse_overrides(args: List[str]) -> Dict[str, Any]:
    """['model=mbv2_100', 'act.k=3', ...] -> {'model': 'mbv2_100', 'act.k': 3, ...} (YAML values)."""
    out: Dict[str, Any] = {}
    for arg in args:
        if "=" not in arg:
            raise SystemExit(f"override {arg!r} is not key=value")
        key, value = arg.split("=", 1)
        key = key.lstrip("+~")
        out[key.strip()] = yaml.safe_load(value) if value != "" else None
    return out


def _yaml(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return data if isinstance(data, dict) else {}


def _plain(d: Dict[str, Any]) -> Dict[str, Any]:
    """Drop Hydra-only keys and unresolved interpolations."""
    return {k: v for k, v in d.items() if not str(k).startswith("_") and not (isinstance(v, str) and "${" in v)}


def act_spec(name: Optional[str], overrides: Dict[str, Any], prefix: str) -> Any:
    name = name or "relu"
    spec = _plain(_yaml(CONFIGS / "act" / f"{name}.yaml"))
    spec["name"] = spec.get("name", name)
    for k, v in overrides.items():
        if k.startswith(prefix + "."):
            spec[k[len(prefix) + 1:]] = v
    return spec if len(spec) > 1 else spec["name"]


def model_kwargs(name: str, overrides: Dict[str, Any]) -> Dict[str, Any]:
    kw = _plain((_yaml(CONFIGS / "model" / f"{name}.yaml").get("model") or {}))
    kw.pop("name", None)
    for k, v in overrides.items():
        if k.startswith("model."):
            kw[k[len("model."):]] = v
    return kw


def build(cfg: Dict[str, Any]):
    """(module, description) from parsed overrides."""
    from models import build_model, build_pose_model

    task = str(cfg.get("task", "cls"))
    name = str(cfg.get("model", "mbv2_100"))
    act = act_spec(cfg.get("act"), cfg, "act")
    kw = model_kwargs(name, cfg)
    desc: Dict[str, Any] = dict(model=name, act=act if isinstance(act, str) else act["name"], task=task)
    if not isinstance(act, str):
        desc["act_spec"] = act
    if kw:
        desc["model_kwargs"] = kw
    if task == "kpt":
        head = act_spec(cfg.get("head_act"), cfg, "head_act")
        desc["head_act"] = head if isinstance(head, str) else head["name"]
        kw.pop("dropout", None)
        net = build_pose_model(name, act=act, head_act=head, **kw)
        default_size = (256, 192)
    elif task == "cls":
        net = build_model(name, act=act, num_classes=int(cfg.get("num_classes", 1000)), **kw)
        default_size = (224, 224)
    else:
        raise SystemExit(f"task={task!r} is not one of cls, kpt")
    size = cfg.get("input_size") or default_size
    size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
    desc["input_size"] = list(size)
    return net, desc


def count(cfg: Dict[str, Any]) -> Dict[str, Any]:
    import torch
    from dyrelu.flops import count_complexity

    torch.manual_seed(0)
    net, desc = build(cfg)
    r = count_complexity(net, tuple(desc["input_size"]))
    keys = ("params", "params_no_classifier", "madds", "madds_paper", "madds_base", "madds_dynamic", "fvcore_default")
    desc.update({k: int(r[k]) for k in keys})
    return desc


# ---- the paper's tables -------------------------------------------------------------------------
def _act_cfg(act: str, k: Optional[int] = None, reduction: Optional[int] = None) -> Dict[str, Any]:
    if act == "relu_se_hswish":
        act = "relu"  # MobileNetV3's standard ReLU/SE/h-swish network is built from act=relu
    cfg: Dict[str, Any] = {"act": act}
    if k is not None and act in ("maxout", "dyrelu_a", "dyrelu_b", "dyrelu_c"):
        cfg["act.k"] = int(k)
    if reduction is not None:
        cfg["act.reduction"] = int(reduction)
    return cfg


def paper_rows(tables: Dict[str, Any]) -> List[Tuple[str, str, Dict[str, Any], float, float]]:
    """(table, label, overrides, paper params M, paper madds M) for every row with params/MAdds."""
    rows = []
    for r in tables["table4"]["rows"]:
        cfg = dict(model=PAPER_MODELS[r["model"]], **_act_cfg(r["act"]))
        rows.append(("Table 4", f"{r['model']} {r['act']}", cfg, r["params"], r["madds"]))
    for r in tables["table5"]["rows"]:
        for width, model in (("x035", "mbv2_035"), ("x100", "mbv2_100")):
            cfg = dict(model=model, **_act_cfg(r["act"], k=r.get("k")))
            k = f" K={r['k']}" if r["act"] in ("maxout", "dyrelu_b") else ""
            rows.append(("Table 5", f"{model} {r['act']}{k}", cfg, r[width]["params"], r[width]["madds"]))
    for r in tables["table8"]["rows"]:
        cfg = dict(model="mbv2_035", **_act_cfg(r["act"], reduction=r.get("reduction")))
        red = f" R={r['reduction']}" if r.get("reduction") else ""
        rows.append(("Table 8", f"mbv2_035 {r['act']}{red}", cfg, r["params"], r["madds"]))
    for r in tables["table10"]["rows"]:
        act = _act_cfg(r["act"])["act"]
        cfg = dict(model=PAPER_MODELS[r["backbone"]], act=act, head_act=act, task="kpt")
        rows.append(("Table 10", f"{r['backbone']} {r['act']} (kpt 256x192)", cfg, r["params"], r["madds"]))
    for r in tables["supplementary_table1"]["rows"]:
        cfg = dict(model="mbv2_100", **_act_cfg(r["act"], k=r.get("k")))
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
        key = json.dumps(cfg, sort_keys=True)
        if key not in cache:
            cache[key] = count(cfg)
            print(f"[{time.time() - t0:6.0f}s] {label}: {cache[key]['params'] / 1e6:.2f} M, "
                  f"{cache[key]['madds_paper'] / 1e6:.1f} M MAdds", file=sys.stderr)
        r = cache[key]
        resnet = cfg["model"].startswith("resnet")
        params = (r["params_no_classifier"] if resnet else r["params"]) / 1e6
        lines.append(
            f"| {table} | {label}{' (no FC)' if resnet else ''} | {p_params:.1f} | {params:.2f} | {_pct(params, p_params)} | "
            f"{p_madds:.1f} | {r['madds_paper'] / 1e6:.1f} | {_pct(r['madds_paper'] / 1e6, p_madds)} | {r['madds'] / 1e6:.1f} |"
        )
    cmd = "python scripts/complexity.py --paper-table --out complexity.md"
    text = "\n".join([f"Generated by `{cmd}` (fvcore, eval mode, batch 1; 224x224, keypoints 256x192).", ""] + lines) + "\n"
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
    ap.add_argument("overrides", nargs="*", help="key=value overrides (model=, act=, act.k=, model.positions=, task=, ...)")
    ap.add_argument("--paper-table", action="store_true", help="count every row of Tables 4, 5, 8, 10, supp. 1")
    ap.add_argument("--out", default=None, help="with --paper-table: markdown file to write")
    ap.add_argument("--only", nargs="*", default=None, help="with --paper-table: only these tables (e.g. 'Table 4')")
    args = ap.parse_args(argv)
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    import warnings

    warnings.filterwarnings("ignore")
    if args.paper_table:
        result = paper_table(args.out, args.only)
    else:
        result = count(parse_overrides(args.overrides))
        for k in ("params", "params_no_classifier", "madds", "madds_paper"):
            print(f"{k:>22}: {result[k]:>14,d}")
    print(json.dumps(result, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())

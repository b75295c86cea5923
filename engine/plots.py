"""metrics.csv as a picture: ``metrics.png`` in the run folder, loss on the left, accuracy / AP on the right.

Written at the end of every run (engine/loggers.py ``RunLogger.finish``), also of one that stopped
early, from whatever epochs metrics.csv holds. Matplotlib's Agg backend draws without a display.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Mapping, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

#: (column, label) drawn in each panel when metrics.csv has them
LOSSES = (("train_loss", "train loss"), ("val_loss", "val loss"), ("val_loss_ema", "val loss (EMA)"))
SCORES = (("top1", "top-1"), ("top5", "top-5"), ("top1_ema", "top-1 (EMA)"), ("ap", "AP"), ("ap_ema", "AP (EMA)"))


def _column(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in rows:
        try:
            x, y = int(r["epoch"]), float(r.get(key) or "nan")
        except (KeyError, ValueError):
            continue
        if math.isfinite(y):
            xs.append(x)
            ys.append(y)
    return xs, ys


def run_title(config: Mapping) -> str:
    """What ran, for a picture's title: model, activation (and the head's), data, seed."""
    def name(group: str) -> Optional[str]:
        node = config.get(group)
        return str(node.get("name")) if isinstance(node, Mapping) and node.get("name") is not None else None

    parts = [name("model"), f"act={name('act')}" if name("act") else None,
             f"head_act={name('head_act')}" if name("head_act") else None,
             f"data={name('data')}" if name("data") else None,
             f"seed={config['seed']}" if config.get("seed") is not None else None]
    return "  ".join(p for p in parts if p)


def plot_metrics(csv_path: Path, out: Optional[Path] = None, config: Optional[Mapping] = None) -> Optional[Path]:
    """Draw ``csv_path`` (a run's metrics.csv) into ``out`` (default: metrics.png beside it), titled
    with what ran (``config``: the run's config; else the folder's name, which for the default run
    folders is only a time); returns the picture's path, or None when the file has no epoch yet."""
    csv_path = Path(csv_path)
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    out = Path(out) if out is not None else csv_path.with_name("metrics.png")
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 4))
    score_title = "AP (%)" if any(r.get("ap") for r in rows) else "accuracy (%)"
    for ax, series, title in ((ax_loss, LOSSES, "loss"), (ax_score, SCORES, score_title)):
        for key, label in series:
            xs, ys = _column(rows, key)
            if xs:
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    name = run_title(config) if config else csv_path.parent.name
    fig.suptitle(name if len(name) <= 110 else name[:107] + "...", fontsize=9)
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out

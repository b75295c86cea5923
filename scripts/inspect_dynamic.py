#!/usr/bin/env python
r"""Is DY-ReLU dynamic? Fig. 3 and supplementary Fig. 1 of the paper, the two statistics of Sec. 5.2,
and each layer's spread across images.

    python scripts/inspect_dynamic.py <run>/checkpoints/best.pt [--max-images 50000] [--out <dir>] \
        [--wandb auto|true|false] [data=imagenet] [data.root=/path/to/imagenet] [data.batch_size=256] \
        [trainer.device=cuda]

The model is rebuilt from the config stored in the checkpoint (as eval.py does) and run over the
validation set (the first ``--max-images`` images; default all). The other arguments are
``train.py``'s overrides, applied to the stored config (engine.config.apply_overrides): a group
(``data=imagenet``) is replaced by its config, a key (``data.root=...``) is set, and an unknown key
fails with ``train.py``'s message. Forward hooks capture the input
and output of every DY-ReLU; ``DyReLU.coefficients(x)`` gives its per-image coefficients a, b.

Writes into ``out`` (default <run>/inspect_dynamic/):
  fig3_top_scatter.png      input vs output of the DY-ReLU after the depthwise conv (MobileNetV2's A2)
                            in every other block (1, 3, ..., 17), a grid of 3-inch panels, the lines
                            y = x and y = -x drawn light and under the points
  supp_fig1_scatter.png     the same for every block (supplementary Fig. 1)
  fig3_bottom_slope_diff.png  slope difference |a1 - a2| per block (mean, 10-90 % band), all A2 blocks
  fig3_band.png             Fig. 3's band per block: the 10-90 % range over images of y at x = +0.5 and -0.5
  stats.json                the statistics below, per DY-ReLU, per A2 block and pooled, with their definitions
and prints one JSON object (the summary) as its last stdout line. Static twins (act=dyrelu_*_static)
are inspected as DY-ReLUs.

Statistics (dyrelu/dynamics.py has the code; stats.json's "definitions" the exact wording):
  unit: one activation function = one (DY-ReLU layer, validation image, channel) triple for
        DY-ReLU-B/C (one per image and layer for DY-ReLU-A, whose function is shared by the channels).
        The coefficients are a_c^k, b_c^k of Eq. 3 (for DY-ReLU-C before the spatial attention pi,
        which only rescales the whole function by pi in [0, 1]).
  Sec. 5.2's statistics with a stated margin, so that a DY-ReLU at its initial function scores 0:
  share_slope_margin:      units with some a_c^k < -0.05 or a_c^k > 1.05 (the paper: "51% of DY-ReLU have
                           segments with either negative slope or slope above 1", without a margin)
  share_intercept_gt_0.05: units with some b_c^k > 0.05 (the paper: 37 %)
  share_abs_intercept_gt_0.05: the same with |b_c^k| > 0.05 (the other reading of the sentence)
  Shares are pooled over the units of every DY-ReLU ("all", including the K=1 ones after projection
  convs) and of those with K >= 2 ("k2plus"); the other measures pooled as medians over layers.
  slope difference: max_k a_c^k - min_k a_c^k, which is |a_c^1 - a_c^2| for K = 2.
  a_spread / b_spread: std over images of every a_c^k (b_c^k), averaged over channels and segments
        (0: one static function for every input); a_spread_rel / b_spread_rel: divided by lambda_a / lambda_b.
  a_dist / b_dist: |mean over images of a_c^k - alpha^k| (b_c^k, beta^k), averaged: how far the mean
        function moved from the initial one.
  band_x_pos / band_x_neg: per channel the 10-90 % range over images of y = max_k(a^k x + b^k) at
        x = +0.5 / -0.5, median over channels (over the first --band-images images).
  pi_flatness (DY-ReLU-C): std of pi over positions, averaged over images (0: flat).
  pi_input_var (DY-ReLU-C): per position std over images / mean over images of pi, averaged over
        positions (0: the same attention for every image).
Scatter points are a seeded random sample of ``--points-per-image`` elements per image and layer
(at most ``--max-points`` per layer); the statistics use every unit, not the sample.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

import _bootstrap  # noqa: F401  the checkout on sys.path (the framework is not installed)

#: stats.json's definitions: what every key means, exactly (the code is dyrelu/dynamics.py)
DEFINITIONS = {
    "unit": "one (DY-ReLU layer, image, channel) function; (layer, image) for DY-ReLU-A; a, b of Eq. 3, "
            "for DY-ReLU-C before pi",
    "share_slope_margin": "units with some a^k < -0.05 or a^k > 1.05 (Sec. 5.2's 'negative slope or slope above 1' "
                          "with a 0.05 margin: a DY-ReLU at its initial function scores 0)",
    "share_intercept_gt_0.05": "units with some b^k > 0.05",
    "share_abs_intercept_gt_0.05": "units with some |b^k| > 0.05",
    "slope_diff": "max_k a^k - min_k a^k (= |a^1 - a^2| for K = 2)",
    "a_spread": "std over images of each a_c^k, averaged over channels and segments (0: a static function)",
    "b_spread": "the same for b_c^k",
    "a_spread_rel": "a_spread / lambda_a", "b_spread_rel": "b_spread / lambda_b",
    "a_dist": "|mean over images of a_c^k - alpha^k|, averaged over channels and segments (0: the mean function "
              "is the initial one)",
    "b_dist": "the same for b_c^k and beta^k",
    "band_x_pos": "per channel the 10-90 % range over images of y = max_k(a^k x + b^k) at x = +0.5; median over "
                  "channels (Fig. 3's band; first --band-images images; before pi for DY-ReLU-C)",
    "band_x_neg": "the same at x = -0.5",
    "pi_flatness": "DY-ReLU-C: std of pi over positions, averaged over images (0: a flat attention)",
    "pi_input_var": "DY-ReLU-C: at each position std of pi over images / mean of pi over images, averaged over "
                    "positions (0: the same attention map for every image)",
    "pooled.all": "every DY-ReLU layer, including the K=1 ones after projection convs: shares over all units, "
                  "*_median: the median over layers",
    "pooled.k2plus": "DY-ReLU layers with K >= 2 only",
    "per_block": "the DY-ReLU after the depthwise conv (A2) of each block, by block number",
}

A2_NAME = re.compile(r"^(.*?)blocks\.(\d+)\.conv_dw\.act$")


def find_a2_blocks(names) -> dict:
    """{module name: block number (1 = lowest)} of the DY-ReLUs after a depthwise conv
    (``<prefix>blocks.<i>.conv_dw.act``) of the backbone: the prefix with the most blocks, so a
    pose model's head blocks (``head.blocks.<i>``) are not mixed with its backbone's."""
    by_prefix: dict = {}
    for n in names:
        m = A2_NAME.match(n)
        if m:
            by_prefix.setdefault(m.group(1), {})[n] = int(m.group(2)) + 1
    return max(by_prefix.values(), key=len) if by_prefix else {}


def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="inspect_dynamic.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("ckpt", help="<run>/checkpoints/best.pt (or last.pt)")
    ap.add_argument("overrides", nargs="*", help="train.py's overrides of the stored config (data.root=...)")
    ap.add_argument("--out", default=None, help="default <run>/inspect_dynamic")
    ap.add_argument("--max-images", type=int, default=None, help="default: the whole validation set")
    ap.add_argument("--points-per-image", type=int, default=64)
    ap.add_argument("--max-points", type=int, default=100000)
    ap.add_argument("--blocks", choices=["every_other", "all"], default="every_other")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--band-images", type=int, default=2000,
                    help="Fig. 3's band (y at x = +-0.5) over the first this many images")
    ap.add_argument("--wandb", choices=["auto", "true", "false"], default="auto",
                    help="auto: when the run logged to W&B (logger=wandb)")
    return ap.parse_intermixed_args(argv)


def load_run(ckpt: str, overrides):
    """(run_cfg, task, val_ds, model, state): the checkpoint's model and validation set, the stored
    config changed by ``overrides`` as ``train.py`` would change it."""
    from engine.evaluate import load_run as load_checkpoint_run

    run = load_checkpoint_run(ckpt, overrides)
    # The fused BN + DY-ReLU op computes the same function without calling DyReLU.forward, which
    # the recorder's hooks need: inspect the unfused pair.
    from models import set_fuse_bn_act

    set_fuse_bn_act(run.model, False)
    return run.cfg, run.task, run.val_ds, run.model, run.state


class Recorder:
    """Forward hooks on every DY-ReLU (and static twin): one ``dyrelu.dynamics.LayerDynamics`` per
    layer, a sample of slope differences for Fig. 3's bottom band, and scatter samples."""

    def __init__(self, model, scatter_names, points_per_image, max_points, seed, band_images=2000):
        import torch

        from dyrelu import DyReLU
        from dyrelu.dynamics import LayerDynamics

        self.torch = torch
        self.mods = [(n, m) for n, m in model.named_modules() if isinstance(m, DyReLU)]
        if not self.mods:
            raise ValueError("this model has no DY-ReLU (a static-activation run?): nothing to inspect")
        self.scatter_names = set(scatter_names)
        self.ppi, self.max_points = int(points_per_image), int(max_points)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.acc = {n: LayerDynamics.for_module(m, band_images) for n, m in self.mods}
        self.info = {n: {"k": int(m.k), "variant": m.variant, "channels": int(m.channels),
                         "static": type(m).__name__ != "DyReLU", "diff_sample": []} for n, m in self.mods}
        self.points = {n: ([], []) for n in self.scatter_names}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.mods]

    def _hook(self, name):
        torch = self.torch

        def hook(mod, inputs, output):
            x = inputs[0]
            c = mod.coefficients(x)
            self.acc[name].update(c.a, c.b, c.pi)
            sample = self.info[name]["diff_sample"]
            if len(sample) < 20000:
                a = c.a.float()
                diff = (a.max(dim=1).values - a.min(dim=1).values).flatten().double()
                take = torch.randperm(diff.numel(), generator=self.gen)[: min(diff.numel(), 512)]
                sample += diff[take].tolist()
            if name in self.points and len(self.points[name][0]) < self.max_points:
                xs, ys = x.detach().float().flatten(1).cpu(), output.detach().float().flatten(1).cpu()
                n_el = xs.shape[1]
                for i in range(xs.shape[0]):
                    idx = torch.randint(n_el, (min(self.ppi, n_el),), generator=self.gen)
                    self.points[name][0].extend(xs[i, idx].tolist())
                    self.points[name][1].extend(ys[i, idx].tolist())

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


#: measures summarised by their median over layers (the shares are pooled over units instead)
MEDIAN_KEYS = ("a_spread", "b_spread", "a_spread_rel", "b_spread_rel", "a_dist", "b_dist", "band_x_pos", "band_x_neg",
               "pi_flatness", "pi_input_var")
SHARE_KEYS = ("share_slope_margin", "share_intercept_gt_0.05", "share_abs_intercept_gt_0.05")


def _share(num, den):
    return num / den if den else None


def summarize(rec: Recorder, a2_blocks: dict) -> dict:
    """per_layer (every measure of dyrelu.dynamics per DY-ReLU), per_block (the A2 layers by block
    number) and pooled: shares over every unit, the other measures as medians over layers."""
    per = []
    for name, acc in rec.acc.items():
        info = rec.info[name]
        per.append({"name": name, "k": info["k"], "variant": info["variant"], "channels": info["channels"],
                    "static_twin": info["static"], **acc.result(), "block": a2_blocks.get(name)})
    pooled = {}
    for scope, keep in (("all", lambda r: True), ("k2plus", lambda r: r["k"] >= 2)):
        rows = [r for r in per if keep(r) and r["units"]]
        n = sum(r["units"] for r in rows)
        pooled[scope] = {"layers": len(rows), "units": n,
                         **{key: _share(sum(r[key] * r["units"] for r in rows), n) for key in SHARE_KEYS},
                         **{f"{key}_median": _median([r[key] for r in rows if r.get(key) is not None]) for key in MEDIAN_KEYS}}
    by_block = {str(r["block"]): {key: r.get(key) for key in ("name",) + SHARE_KEYS + MEDIAN_KEYS + ("slope_diff_mean",)}
                for r in sorted((r for r in per if r["block"] is not None), key=lambda r: r["block"])}
    return {"pooled": pooled, "per_block": by_block, "per_layer": per}


def _median(values):
    return statistics.median(values) if values else None


def _percentile(values, q):
    if not values:
        return None
    v = sorted(values)
    i = min(len(v) - 1, max(0, int(round(q / 100 * (len(v) - 1)))))
    return v[i]


def _grid(n: int, cols: int = 3, panel_in: float = 3.0):
    """A rows x cols figure of ``panel_in``-inch panels for n panels (the unused ones switched off)."""
    import matplotlib.pyplot as plt

    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(panel_in * cols, panel_in * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def plot(rec: Recorder, scatter: list, supp: list, a2_blocks: dict, out: Path, title: str, summary: dict) -> dict:
    """fig3_top_scatter (``scatter``'s layers), supp_fig1_scatter (``supp``'s), fig3_bottom_slope_diff
    and fig3_band (Fig. 3's band at x = +-0.5 per block); returns {name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}

    def panel(ax, name, label):
        xs, ys = rec.points[name]
        if xs:
            lo, hi = _percentile(xs, 0.5), _percentile(xs, 99.5)
            r = max(abs(lo), abs(hi), 1e-3) * 1.05
            ax.set_xlim(-r, r)
            ylo, yhi = _percentile(ys, 0.5), _percentile(ys, 99.5)
            ax.set_ylim(min(-r * 0.25, ylo * 1.05), max(r, yhi * 1.05))
        lim = ax.get_xlim()
        # the references under the data and lighter, so the band the points draw stays visible
        ax.plot(lim, lim, color="0.65", lw=0.8, ls="--", zorder=1)
        ax.plot(lim, (-lim[0], -lim[1]), color="0.65", lw=0.8, ls="--", zorder=1)
        ax.scatter(xs, ys, s=1.0, c="tab:blue", alpha=0.3, linewidths=0, rasterized=True, zorder=2)
        ax.set_xlim(lim)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("input x", fontsize=8)
        ax.set_ylabel("output y", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.2, zorder=0)

    def label(n):
        return f"Block {a2_blocks[n]}" if n in a2_blocks else n

    for key, names, what in (("fig3_top_scatter", scatter, "Fig. 3 top"), ("supp_fig1_scatter", supp, "supp. Fig. 1")):
        if not names:
            continue
        fig, axes = _grid(len(names))
        for ax, n in zip(axes, names):
            panel(ax, n, label(n))
        fig.suptitle(f"{what}: DY-ReLU input vs output; grey dashed: y = x and y = -x\n({title})", fontsize=10)
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.55 / fig.get_figheight()))  # room for the two-line title
        files[key] = out / f"{key}.png"
        fig.savefig(files[key], dpi=110)
        plt.close(fig)

    diff_names = sorted(a2_blocks, key=a2_blocks.get) if a2_blocks else [n for n, _ in rec.mods if rec.info[n]["k"] >= 2]
    if diff_names:
        per = {r["name"]: r for r in summary["per_layer"]}
        ticks = [a2_blocks.get(n, i) for i, n in enumerate(diff_names, 1)]
        xlabel = "block" if a2_blocks else "DY-ReLU layer (K >= 2)"
        fig, ax = plt.subplots(figsize=(6.5, 3.2))
        lo = [_percentile(rec.info[n]["diff_sample"], 10) for n in diff_names]
        hi = [_percentile(rec.info[n]["diff_sample"], 90) for n in diff_names]
        ax.fill_between(ticks, lo, hi, color="tab:blue", alpha=0.2, label="10-90 %")
        ax.plot(ticks, [per[n]["slope_diff_mean"] for n in diff_names], "o-", color="tab:blue", label="mean")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("|a1 - a2|")
        ax.set_title(f"slope difference between the two segments ({title})", fontsize=9)
        ax.set_xticks(ticks)
        ax.legend(fontsize=7)
        fig.tight_layout()
        files["fig3_bottom_slope_diff"] = out / "fig3_bottom_slope_diff.png"
        fig.savefig(files["fig3_bottom_slope_diff"], dpi=130)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6.5, 3.2))
        for key, x, color in (("band_x_pos", "+0.5", "tab:red"), ("band_x_neg", "-0.5", "tab:green")):
            ax.plot(ticks, [per[n][key] for n in diff_names], "o-", color=color, label=f"x = {x}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("10-90 % range of y over images")
        ax.set_title(f"Fig. 3's band: spread of y at a fixed x, median over channels\n({title})", fontsize=9)
        ax.set_xticks(ticks)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
        fig.tight_layout()
        files["fig3_band"] = out / "fig3_band.png"
        fig.savefig(files["fig3_band"], dpi=130)
        plt.close(fig)
    return files


def _wandb_on(opt: str, run_cfg) -> bool:
    if opt in ("true", "false"):
        return opt == "true"
    lg = run_cfg.get("logger") or {}
    return "wandb" in list(lg.get("backends") or []) and (lg.get("wandb") or {}).get("mode") != "disabled"


def log_wandb(run_cfg, files, summary, out: Path, run_dir: Path) -> None:
    """The plots as W&B images in the run's group (the table), beside its training runs."""
    import wandb

    from engine.loggers import wandb_mode

    w = (run_cfg.get("logger") or {}).get("wandb") or {}
    run = wandb.init(project=w.get("project") or "dyrelu", entity=w.get("entity"), group=w.get("group") or run_cfg.get("table"),
                     job_type="inspect_dynamic", name=f"{run_dir.name}-inspect", dir=str(out), mode=wandb_mode(w.get("mode")),
                     tags=list(w.get("tags") or []) + ["inspect_dynamic"], reinit="finish_previous")
    run.log({k: wandb.Image(str(p)) for k, p in files.items()})
    run.summary.update({f"{scope}/{k}": v for scope, d in summary["pooled"].items() for k, v in d.items()})
    run.finish()


def run_images(model, task, val_ds, run_cfg, device, max_images=None, seed=0) -> int:
    """The model (hooks attached) over the first ``max_images`` validation images; how many it saw."""
    import torch

    from engine.loaders import make_loader

    n_images = len(val_ds) if max_images is None else min(len(val_ds), max_images)
    loader = make_loader(val_ds, list(range(n_images)), int(run_cfg.data.batch_size), int(run_cfg.data.num_workers),
                         seed, task.collate_fn())
    seen = 0
    with torch.no_grad():
        for b in loader:
            images = task.to_device(b, device, False)[0]
            model(images)
            seen += images.shape[0]
    return seen


def measure_model(model, task, val_ds, run_cfg, max_images=None, seed: int = 0) -> dict:
    """``summarize``'s per_layer / per_block / pooled measures of ``model`` on its validation images,
    without plots (for checks: the health test's)."""
    from dyrelu import DyReLU

    model.eval()
    rec = Recorder(model, [], 1, 0, seed)
    try:
        run_images(model, task, val_ds, run_cfg, next(model.parameters()).device, max_images, seed)
    finally:
        rec.remove()
    return summarize(rec, find_a2_blocks([n for n, m in model.named_modules() if isinstance(m, DyReLU)]))


def measure(ckpt: str, overrides=(), max_images=None, seed: int = 0) -> dict:
    """``measure_model`` on a checkpoint's model (its stored config changed by ``overrides``)."""
    run_cfg, task, val_ds, model, _ = load_run(ckpt, overrides)
    return measure_model(model, task, val_ds, run_cfg, max_images, seed)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import logging

    from engine.errors import exit_on_user_error
    from engine.runtime import resolve_device

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    log = logging.getLogger("dyrelu.inspect")
    with exit_on_user_error():
        run_cfg, task, val_ds, model, state = load_run(args.ckpt, args.overrides)
        device = resolve_device(str(run_cfg.trainer.device))
        model.to(device).eval()
        ckpt = Path(args.ckpt).resolve()
        run_dir = ckpt.parent.parent
        out = Path(args.out) if args.out else run_dir / "inspect_dynamic"
        out.mkdir(parents=True, exist_ok=True)

        from dyrelu import DyReLU

        names = [n for n, m in model.named_modules() if isinstance(m, DyReLU)]  # static twins included
        a2_blocks = find_a2_blocks(names)
        if a2_blocks:
            supp = sorted(a2_blocks, key=a2_blocks.get)
        else:  # no DY-ReLU after a depthwise conv (e.g. ResNet, or Table 7 without A2): every (other) DY-ReLU
            log.warning("no DY-ReLU after a depthwise conv (blocks.<i>.conv_dw.act); plotting %s DY-ReLU layer instead",
                        "every other" if args.blocks == "every_other" else "every")
            supp = names
        scatter = supp[::2] if args.blocks == "every_other" else supp
        rec = Recorder(model, supp, args.points_per_image, args.max_points, args.seed, args.band_images)

        seen = run_images(model, task, val_ds, run_cfg, device, args.max_images, args.seed)
        rec.remove()
        log.info("inspected %d validation images, %d DY-ReLU layers", seen, len(rec.mods))

        summary = summarize(rec, a2_blocks)
        model_name = run_cfg.model.name
        title = f"{model_name}, {run_cfg.act.name}, {seen} val images"
        files = plot(rec, scatter, supp, a2_blocks, out, title, summary)
        stats = {
            "ckpt": str(ckpt), "task": run_cfg.task.name, "model": model_name, "act": run_cfg.act.name,
            "table": run_cfg.get("table"), "row": run_cfg.get("row"), "epoch": state.get("epoch"),
            "data": run_cfg.data.name, "images": seen, "scatter_layers": scatter,
            "slope_diff_per_block": {b: r["slope_diff_mean"] for b, r in summary["per_block"].items()},
            "paper": {"share_slope_margin": 0.51, "share_intercept_gt_0.05": 0.37,
                      "note": "MobileNetV2 x0.35 DY-ReLU-B on 50,000 ImageNet val images (Sec. 5.2); the paper's "
                              "slope statistic is a < 0 or a > 1, without a margin"},
            "definitions": DEFINITIONS,
            **summary,
            "files": {k: str(v) for k, v in files.items()},
        }
        (out / "stats.json").write_text(json.dumps(stats, indent=2))
        files["stats"] = out / "stats.json"
        if _wandb_on(args.wandb, run_cfg):
            log_wandb(run_cfg, {k: v for k, v in files.items() if k != "stats"}, summary, out, run_dir)
        line = {"ckpt": str(ckpt), "images": seen, "layers": len(rec.mods), **{
            f"{scope}.{k}": v for scope, d in summary["pooled"].items() for k, v in d.items()
            if k.startswith("share") or k.endswith("_median")},
            "slope_diff_per_block": stats["slope_diff_per_block"], "stats": str(out / "stats.json"),
            "files": {k: str(v) for k, v in files.items()}}
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
                            in every other block (1, 3, ..., 17), with the lines y = x and y = -x
  supp_fig1_scatter.png     the same panels as a grid (supplementary Fig. 1)
  fig3_bottom_slope_diff.png  slope difference |a1 - a2| per block (mean, 10-90 % band), all A2 blocks
  stats.json                the statistics below, per DY-ReLU and pooled
and prints one JSON object (the summary) as its last stdout line.

Statistics (Sec. 5.2), with the exact definitions used here:
  unit: one activation function = one (DY-ReLU layer, validation image, channel) triple for
        DY-ReLU-B/C (one per image and layer for DY-ReLU-A, whose function is shared by the channels).
        The coefficients are a_c^k, b_c^k of Eq. 3 (for DY-ReLU-C before the spatial attention pi,
        which only rescales the whole function by pi in [0, 1]).
  share_slope_neg_or_gt1:  units with at least one segment k with a_c^k < 0 or a_c^k > 1
                           ("51% of DY-ReLU have segments with either negative slope or slope above 1")
  share_intercept_gt_0.05: units with at least one segment with b_c^k > 0.05
                           ("37% of DY-ReLU have at least one segment with intercept more than 0.05")
  share_abs_intercept_gt_0.05: the same with |b_c^k| > 0.05 (the other reading of the sentence)
  pooled over every DY-ReLU of the network ("all", including the K=1 ones after projection convs)
  and over those with K >= 2 only ("k2plus"); per-layer shares are in stats.json.
  slope difference: max_k a_c^k - min_k a_c^k, which is |a_c^1 - a_c^2| for K = 2.
  a_spread / b_spread: how dynamic each layer is -- the std over images of every a_c^k (b_c^k),
        averaged over channels and segments; 0 means the layer computes one static function for
        every input. pi_spread (DY-ReLU-C): the std of pi over positions, averaged over images.
        Per layer in stats.json; the median over layers in the printed line.
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
    """Forward hooks on every DY-ReLU: pooled statistics of the coefficients, and scatter samples."""

    def __init__(self, model, scatter_names, points_per_image, max_points, seed):
        import torch

        from dyrelu import DyReLU

        self.torch = torch
        self.mods = [(n, m) for n, m in model.named_modules() if isinstance(m, DyReLU)]
        if not self.mods:
            raise ValueError("this model has no DY-ReLU (a static-activation run?): nothing to inspect")
        self.scatter_names = set(scatter_names)
        self.ppi, self.max_points = int(points_per_image), int(max_points)
        self.gen = torch.Generator().manual_seed(int(seed))
        self.stats = {n: {"units": 0, "slope": 0, "int_pos": 0, "int_abs": 0, "diff_sum": 0.0, "diff_sq": 0.0,
                          "diff_sample": [], "k": int(m.k), "variant": m.variant, "channels": int(m.channels),
                          "images": 0, "a_sum": 0.0, "a_sq": 0.0, "b_sum": 0.0, "b_sq": 0.0, "pi_std_sum": 0.0}
                      for n, m in self.mods}
        self.points = {n: ([], []) for n in self.scatter_names}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.mods]

    def _hook(self, name):
        torch = self.torch

        def hook(mod, inputs, output):
            x = inputs[0]
            c = mod.coefficients(x)
            a, b = c.a.float(), c.b.float()  # (N, K, W)
            s = self.stats[name]
            s["units"] += a.shape[0] * a.shape[2]
            s["slope"] += int(((a < 0) | (a > 1)).any(dim=1).sum())
            s["int_pos"] += int((b > 0.05).any(dim=1).sum())
            s["int_abs"] += int((b.abs() > 0.05).any(dim=1).sum())
            diff = (a.max(dim=1).values - a.min(dim=1).values).flatten().double()
            # across-sample spread: running sums per (segment, channel) over images
            s["images"] += a.shape[0]
            for key, t in (("a", a), ("b", b)):
                s[key + "_sum"] = s[key + "_sum"] + t.double().sum(dim=0)
                s[key + "_sq"] = s[key + "_sq"] + (t.double() ** 2).sum(dim=0)
            if c.pi is not None:
                s["pi_std_sum"] += float(c.pi.float().flatten(1).std(dim=1, correction=0).sum())
            s["diff_sum"] += float(diff.sum())
            s["diff_sq"] += float((diff * diff).sum())
            if len(s["diff_sample"]) < 20000:
                take = torch.randperm(diff.numel(), generator=self.gen)[: min(diff.numel(), 512)]
                s["diff_sample"] += diff[take].tolist()
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


def _share(num, den):
    return num / den if den else None


def _spread(s: dict, key: str):
    """Std over images of each coefficient (segment, channel), averaged over them: 0 is a static function."""
    n = s["images"]
    if not n:
        return None
    var = (s[key + "_sq"] / n - (s[key + "_sum"] / n) ** 2).clamp(min=0.0)
    return float(var.sqrt().mean())


def summarize(rec: Recorder, a2_blocks: dict) -> dict:
    per = []
    for name, s in rec.stats.items():
        n = s["units"]
        mean = s["diff_sum"] / n if n else None
        std = math.sqrt(max(s["diff_sq"] / n - mean * mean, 0.0)) if n else None
        per.append({"name": name, "k": s["k"], "variant": s["variant"], "channels": s["channels"], "units": n,
                    "share_slope_neg_or_gt1": _share(s["slope"], n), "share_intercept_gt_0.05": _share(s["int_pos"], n),
                    "share_abs_intercept_gt_0.05": _share(s["int_abs"], n), "slope_diff_mean": mean, "slope_diff_std": std,
                    "a_spread": _spread(s, "a"), "b_spread": _spread(s, "b"),
                    "pi_spread": s["pi_std_sum"] / s["images"] if s["variant"] == "C" and s["images"] else None,
                    "block": a2_blocks.get(name)})
    pooled = {}
    for scope, keep in (("all", lambda s: True), ("k2plus", lambda s: s["k"] >= 2)):
        ss = [s for s in rec.stats.values() if keep(s)]
        n = sum(s["units"] for s in ss)
        pooled[scope] = {"layers": len(ss), "units": n,
                         "share_slope_neg_or_gt1": _share(sum(s["slope"] for s in ss), n),
                         "share_intercept_gt_0.05": _share(sum(s["int_pos"] for s in ss), n),
                         "share_abs_intercept_gt_0.05": _share(sum(s["int_abs"] for s in ss), n),
                         **{f"{key}_median": _median([r[key] for r in per if r[key] is not None and keep(rec.stats[r["name"]])])
                            for key in ("a_spread", "b_spread", "pi_spread")}}
    return {"pooled": pooled, "per_layer": per}


def _median(values):
    return statistics.median(values) if values else None


def _percentile(values, q):
    if not values:
        return None
    v = sorted(values)
    i = min(len(v) - 1, max(0, int(round(q / 100 * (len(v) - 1)))))
    return v[i]


def plot(rec: Recorder, scatter: list, a2_blocks: dict, out: Path, title: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = {}

    def panel(ax, name, label):
        xs, ys = rec.points[name]
        ax.scatter(xs, ys, s=0.3, c="tab:blue", alpha=0.25, linewidths=0, rasterized=True)
        if xs:
            lo, hi = _percentile(xs, 0.5), _percentile(xs, 99.5)
            r = max(abs(lo), abs(hi), 1e-3) * 1.05
            ax.set_xlim(-r, r)
            ylo, yhi = _percentile(ys, 0.5), _percentile(ys, 99.5)
            ax.set_ylim(min(-r * 0.25, ylo * 1.05), max(r, yhi * 1.05))
        lim = ax.get_xlim()
        ax.plot(lim, lim, "r-", lw=0.8)
        ax.plot(lim, (-lim[0], -lim[1]), "r-", lw=0.8)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("input x", fontsize=7)
        ax.set_ylabel("output y", fontsize=7)
        ax.tick_params(labelsize=6)

    labels = [(n, f"Block {a2_blocks[n]}" if n in a2_blocks else n) for n in scatter]
    if labels:
        fig, axes = plt.subplots(1, len(labels), figsize=(2.2 * len(labels), 2.4), squeeze=False)
        for ax, (n, lab) in zip(axes[0], labels):
            panel(ax, n, lab)
        fig.suptitle(f"DY-ReLU input vs output ({title})", fontsize=9)
        fig.tight_layout()
        files["fig3_top_scatter"] = out / "fig3_top_scatter.png"
        fig.savefig(files["fig3_top_scatter"], dpi=130)
        plt.close(fig)

        cols = min(3, len(labels))
        rows = math.ceil(len(labels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
        for ax in axes.flat[len(labels):]:
            ax.axis("off")
        for ax, (n, lab) in zip(axes.flat, labels):
            panel(ax, n, lab)
        fig.suptitle(f"DY-ReLU input vs output, red: y = x and y = -x ({title})", fontsize=9)
        fig.tight_layout()
        files["supp_fig1_scatter"] = out / "supp_fig1_scatter.png"
        fig.savefig(files["supp_fig1_scatter"], dpi=130)
        plt.close(fig)

    diff_names = sorted(a2_blocks, key=a2_blocks.get) if a2_blocks else [n for n, _ in rec.mods if rec.stats[n]["k"] >= 2]
    if diff_names:
        xs = list(range(1, len(diff_names) + 1))
        means, lo, hi = [], [], []
        for n in diff_names:
            s = rec.stats[n]
            means.append(s["diff_sum"] / s["units"] if s["units"] else float("nan"))
            lo.append(_percentile(s["diff_sample"], 10))
            hi.append(_percentile(s["diff_sample"], 90))
        fig, ax = plt.subplots(figsize=(6, 3))
        ticks = [a2_blocks.get(n, i) for i, n in zip(xs, diff_names)]
        ax.fill_between(ticks, lo, hi, color="tab:blue", alpha=0.2, label="10-90 %")
        ax.plot(ticks, means, "o-", color="tab:blue", label="mean")
        ax.set_xlabel("block" if a2_blocks else "DY-ReLU layer (K >= 2)")
        ax.set_ylabel("|a1 - a2|")
        ax.set_title(f"slope difference between the two segments ({title})", fontsize=9)
        ax.set_xticks(ticks)
        ax.legend(fontsize=7)
        fig.tight_layout()
        files["fig3_bottom_slope_diff"] = out / "fig3_bottom_slope_diff.png"
        fig.savefig(files["fig3_bottom_slope_diff"], dpi=130)
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


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    import logging

    import torch

    from engine.errors import exit_on_user_error
    from engine.loaders import make_loader
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

        names = [n for n, m in model.named_modules() if type(m).__name__ == "DyReLU"]
        a2_blocks = find_a2_blocks(names)
        if a2_blocks:
            scatter = sorted(a2_blocks, key=a2_blocks.get)
            if args.blocks == "every_other":
                scatter = [n for n in scatter if a2_blocks[n] % 2 == 1]
        else:  # no DY-ReLU after a depthwise conv (e.g. ResNet, or Table 7 without A2): every (other) DY-ReLU
            log.warning("no DY-ReLU after a depthwise conv (blocks.<i>.conv_dw.act); plotting %s DY-ReLU layer instead",
                        "every other" if args.blocks == "every_other" else "every")
            scatter = names[::2] if args.blocks == "every_other" else names
        rec = Recorder(model, scatter, args.points_per_image, args.max_points, args.seed)

        n_images = len(val_ds) if args.max_images is None else min(len(val_ds), args.max_images)
        batch = int(run_cfg.data.batch_size)
        loader = make_loader(val_ds, list(range(n_images)), batch, int(run_cfg.data.num_workers), args.seed,
                             task.collate_fn())
        seen = 0
        with torch.no_grad():
            for b in loader:
                images = task.to_device(b, device, False)[0]
                model(images)
                seen += images.shape[0]
        rec.remove()
        log.info("inspected %d validation images, %d DY-ReLU layers", seen, len(rec.mods))

        summary = summarize(rec, a2_blocks)
        model_name = run_cfg.model.name
        title = f"{model_name}, {run_cfg.act.name}, {seen} val images"
        files = plot(rec, scatter, a2_blocks, out, title)
        stats = {
            "ckpt": str(ckpt), "task": run_cfg.task.name, "model": model_name, "act": run_cfg.act.name,
            "table": run_cfg.get("table"), "row": run_cfg.get("row"), "epoch": state.get("epoch"),
            "data": run_cfg.data.name, "images": seen, "scatter_layers": scatter,
            "slope_diff_per_block": {str(a2_blocks[n]): rec.stats[n]["diff_sum"] / max(rec.stats[n]["units"], 1)
                                     for n in sorted(a2_blocks, key=a2_blocks.get)},
            "paper": {"share_slope_neg_or_gt1": 0.51, "share_intercept_gt_0.05": 0.37,
                      "note": "MobileNetV2 x0.35 DY-ReLU-B on 50,000 ImageNet val images (Sec. 5.2)"},
            "definitions": {
                "unit": "one (DY-ReLU layer, image, channel) function; (layer, image) for DY-ReLU-A",
                "share_slope_neg_or_gt1": "units with some a^k < 0 or a^k > 1",
                "share_intercept_gt_0.05": "units with some b^k > 0.05",
                "share_abs_intercept_gt_0.05": "units with some |b^k| > 0.05",
                "slope_diff": "max_k a^k - min_k a^k (= |a^1 - a^2| for K = 2)",
                "a_spread": "std over images of each a_c^k, averaged over channels and segments (0: a static function)",
                "b_spread": "the same for b_c^k",
                "pi_spread": "DY-ReLU-C: std of pi over positions, averaged over images (0: a flat attention)",
                "pooled.all": "every DY-ReLU layer, including the K=1 ones after projection convs",
                "pooled.k2plus": "DY-ReLU layers with K >= 2 only",
            },
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

"""Where metrics go: metrics.csv in the run folder always; W&B and TensorBoard on request. Rank 0 only."""
from __future__ import annotations

import csv
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)


class CsvLogger:
    """One row per epoch (numbered from 1). On resume after ``completed`` epochs, rows of
    epochs that will be run again are dropped."""

    def __init__(self, path: Path, completed: int = 0):
        self.path = Path(path)
        self.rows: list[dict] = []
        if self.path.exists() and completed > 0:
            with open(self.path, newline="") as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["epoch"]) <= completed]
        self._write()

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        self.rows.append(dict(row))
        self._write()

    def _write(self) -> None:
        fields: list[str] = []
        for r in self.rows:
            fields += [k for k in r if k not in fields]
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields or ["epoch"])
            w.writeheader()
            w.writerows(self.rows)
        os.replace(tmp, self.path)


def wandb_mode(mode: str | None = "auto") -> str:
    """$WANDB_MODE wins; else ``mode``; auto (or None): online only when an API key is configured (env or
    ~/.netrc), so a run never waits on a login. Shared by training, make_tables.py and inspect_dynamic.py."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode not in (None, "auto"):
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "online" if "api.wandb.ai" in netrc.read_text() else "offline"
    except OSError:
        return "offline"


def wandb_sync_hint(folders) -> str:
    """What to run to upload offline W&B runs (training and make_tables.py print it)."""
    return "W&B ran offline; to upload: wandb sync " + " ".join(str(f) for f in folders)


class RunLogger:
    def __init__(self, cfg, run_dir: Path, resume_epoch: int, enabled: bool, config_dict: dict):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.config = config_dict  # metrics.png's title names what ran
        self.csv = CsvLogger(run_dir / "metrics.csv", resume_epoch) if enabled else None
        self.wandb = None
        self.tb = None
        if not enabled:
            return
        backends = list(cfg.logger.backends)
        unknown = set(backends) - {"wandb", "tensorboard"}
        if unknown:
            raise ValueError(f"logger.backends has unknown {sorted(unknown)}; valid: ['wandb', 'tensorboard']")
        if "wandb" in backends and cfg.logger.wandb.mode != "disabled":
            import wandb

            wcfg = cfg.logger.wandb
            mode = wandb_mode(wcfg.mode)
            os.environ.setdefault("WANDB_SILENT", "true")
            # A fixed id per run folder: a resumed or requeued run continues the same W&B run.
            # One table's runs share a group (the table id) and their job_type is the row, so the
            # W&B project groups a table's runs and colours them by row.
            id_file = run_dir / ".wandb_id"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.wandb = wandb.init(
                project=wcfg.project, entity=wcfg.entity, group=wcfg.group or cfg.get("table"),
                job_type=cfg.get("row") or "train", tags=list(wcfg.tags),
                config=config_dict, dir=str(run_dir), mode=mode, id=run_id, resume="allow",
                name=run_dir.name, settings=wandb.Settings(init_timeout=60),
            )
            log.info("W&B run %s (%s)", run_id, mode)
        if "tensorboard" in backends:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log_step(self, metrics: Mapping[str, float], step: int) -> None:
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in metrics.items()}, step=step)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"train/{k}", v, step)

    def log_epoch(self, row: Mapping[str, Any], step: int) -> None:
        if not self.enabled:
            return
        self.csv.log_epoch(row)
        if self.wandb is not None:
            self.wandb.log({f"epoch/{k}": v for k, v in row.items()}, step=step)
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(f"epoch/{k}", v, row["epoch"])

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(dict(values))

    def log_artifact(self, path: Path, name: str, kind: str) -> None:
        if self.wandb is not None:
            import wandb

            art = wandb.Artifact(name, type=kind)
            art.add_file(str(path))
            self.wandb.log_artifact(art)

    def finish(self, exit_code: int = 0) -> None:
        """End of the run (also a stopped or failed one): metrics.png from metrics.csv, close the backends."""
        if self.csv is not None and self.csv.path.exists():
            from .plots import plot_metrics

            try:
                plot_metrics(self.csv.path, config=self.config)
            except Exception as exc:  # a picture must never hide how the run ended
                log.warning("could not draw %s: %s", self.csv.path.with_name("metrics.png"), exc)
        if self.wandb is not None:
            offline = self.wandb.settings.mode == "offline" or bool(getattr(self.wandb, "offline", False))
            sync_dir = Path(self.wandb.dir).parent  # <run>/wandb/offline-run-<time>-<id>
            self.wandb.finish(exit_code=exit_code)  # lets a multirun start its next W&B run
            self.wandb = None
            if offline:
                log.info(wandb_sync_hint([sync_dir]))
        if self.tb is not None:
            self.tb.close()
            self.tb = None

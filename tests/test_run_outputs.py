"""What a run leaves for people to look at: metrics.png, the validation progress bar, and the
`wandb sync` command after an offline W&B run."""
from __future__ import annotations

import logging

import torch

from engine.plots import plot_metrics


def test_metrics_csv_is_drawn_into_metrics_png(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    csv_path.write_text("epoch,train_loss,lr,val_loss,top1,top5\n1,2.3,0.1,2.2,10.0,50.0\n2,2.1,0.05,nan,12.5,55.0\n")
    out = plot_metrics(csv_path)
    assert out == tmp_path / "metrics.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "empty.csv").write_text("epoch\n")
    assert plot_metrics(tmp_path / "empty.csv") is None  # a run stopped before its first epoch


def test_validation_shows_a_progress_bar_when_asked(capsys):
    from engine.loop import evaluate

    class Task:
        def evaluate(self, model, loader, device, autocast, channels_last):
            return {"batches": sum(1 for _ in loader)}

    loader = [torch.zeros(1)] * 3
    assert evaluate(torch.nn.Identity(), Task(), loader, device="cpu", autocast=None, channels_last=False,
                    progress=True, desc="val 1") == {"batches": 3}
    assert "val 1" in capsys.readouterr().err
    evaluate(torch.nn.Identity(), Task(), loader, device="cpu", autocast=None, channels_last=False)
    assert capsys.readouterr().err == ""


def test_an_offline_wandb_run_ends_with_the_sync_command(tmp_path, monkeypatch, caplog):
    from engine.config import compose
    from engine.loggers import RunLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    lg = RunLogger(compose(["logger=wandb"]), tmp_path, 0, True, {"seed": 0})
    lg.log_epoch({"epoch": 1, "train_loss": 2.0, "top1": 12.5}, step=1)
    with caplog.at_level(logging.INFO, logger="engine.loggers"):
        lg.finish()
    (offline,) = tmp_path.glob("wandb/offline-run-*")
    assert f"wandb sync {offline}" in caplog.text
    assert (tmp_path / "metrics.png").is_file()

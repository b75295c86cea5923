"""Evaluate a checkpoint: `python eval.py ckpt=<run>/checkpoints/best.pt [overrides.data.root=...]`.

The model, activation and task are rebuilt from the config stored in the checkpoint; keys
under `overrides.` change that stored config (e.g. a new data root or a detector file).
Writes eval.json into the checkpoint's run folder.
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from engine.errors import exit_on_known_error
    from engine.evaluate import evaluate_checkpoint

    with exit_on_known_error():
        evaluate_checkpoint(cfg)


if __name__ == "__main__":
    sys.exit(main())

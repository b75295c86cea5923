"""Train one run: `python train.py model=mbv2_035 act=dyrelu_b` (see README). Thin Hydra entry point."""
from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from engine.errors import exit_on_known_error
    from engine.loop import run

    hydra_cfg = HydraConfig.get()
    # In a sweep a bad job is reported and skipped; the other jobs still run.
    with exit_on_known_error(keep_going=hydra_cfg.mode == RunMode.MULTIRUN):
        results = run(cfg, hydra_cfg.runtime.output_dir)
        return results.get(f"best_{'top1' if results['task'] == 'cls' else 'ap'}")  # for Hydra sweepers
    return None


if __name__ == "__main__":
    sys.exit(main())

"""Train one run: `python train.py model=mbv2_035 act=dyrelu_b` (see README). Thin Hydra entry point."""
from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

log = logging.getLogger("dyrelu.train")


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from engine.errors import exit_on_known_error
    from engine.loop import run

    with exit_on_known_error():
        results = run(cfg, HydraConfig.get().runtime.output_dir)
    primary = results.get(f"best_{'top1' if results['task'] == 'cls' else 'ap'}")
    return primary  # Hydra sweepers (e.g. Optuna) read the return value


if __name__ == "__main__":
    sys.exit(main())

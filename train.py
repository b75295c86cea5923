"""Train one run: `python train.py model=mbv2_035 act=dyrelu_b` (see README). Thin Hydra entry point.

A mistake in the command (bad value, unknown name or key, missing path) ends in one line on stderr
and exit code 2; a sweep (`-m`) runs every job, then prints a table of them (summary.md in the sweep
folder), names each failed one and exits non-zero (see docs/bad-input.md).
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig


def _train(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> float | None:
    from engine.cli import check_added_keys
    from engine.errors import check_mandatory

    check_added_keys(cfg, overrides)
    check_mandatory(cfg, "python train.py")
    from engine.loop import run  # run() validates the config before it builds anything

    results = run(cfg, run_dir)
    return results.get(f"best_{'top1' if results['task'] == 'cls' else 'ap'}")  # for Hydra sweepers


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    from engine.errors import exit_on_user_error
    from engine.sweep import run_sweep_job

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        return run_sweep_job(lambda: _train(cfg, run_dir, overrides), run_dir, hydra_cfg.job.num,
                             hydra_cfg.job.override_dirname, overrides)
    with exit_on_user_error(run_dir):
        return _train(cfg, run_dir, overrides)


if __name__ == "__main__":
    from engine.cli import cli

    sys.exit(cli(main))

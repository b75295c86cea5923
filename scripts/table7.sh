#!/usr/bin/env bash
# Table 7: DY-ReLU-B at A1/A2/A3 (model.positions) on ImageNet, MobileNetV2 x0.35.
# Entries: configs/experiment/table7/<row>.yaml. Options (ROWS, SEEDS, TORCHRUN, SLURM): docs/tables.md.
#
#   bash scripts/table7.sh data.root=/path/to/imagenet   # the real thing, local
#   bash scripts/table7.sh data.root=/path/to/imagenet hydra/launcher=submitit_slurm hydra.launcher.partition=<p>
#   TORCHRUN="torchrun --nproc_per_node=8" bash scripts/table7.sh data.root=/path/to/imagenet
#   bash scripts/table7.sh data=demo trainer=smoke   # smoke test of the whole table
#   python scripts/make_tables.py multirun/table7/<date_time>   # the table beside the paper's
TABLE=table7
SEEDS_DEFAULT=0
ROWS_DEFAULT="none a1 a2 a3 \
    a1_a2 a1_a3 a2_a3 a1_a2_a3"
source "$(dirname "${BASH_SOURCE[0]}")/_sweep_common.sh"
run_sweep "$@"

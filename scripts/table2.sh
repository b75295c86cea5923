#!/usr/bin/env bash
# Table 2: DY-ReLU-A/B/C vs ReLU on ImageNet, MobileNetV2 x0.35, 3 seeds.
# Entries: configs/experiment/table2/<row>.yaml. Options (ROWS, SEEDS, TORCHRUN, SLURM): docs/tables.md.
#
#   bash scripts/table2.sh data.root=/path/to/imagenet   # the real thing, local
#   bash scripts/table2.sh data.root=/path/to/imagenet hydra/launcher=submitit_slurm hydra.launcher.partition=<p>
#   TORCHRUN="torchrun --nproc_per_node=8" bash scripts/table2.sh data.root=/path/to/imagenet
#   bash scripts/table2.sh data=demo trainer=smoke   # smoke test of the whole table
#   python scripts/make_tables.py multirun/table2/<date_time>   # the table beside the paper's
TABLE=table2
SEEDS_DEFAULT=0,1,2
ROWS_DEFAULT="relu dyrelu_a dyrelu_b dyrelu_c"
source "$(dirname "${BASH_SOURCE[0]}")/_sweep_common.sh"
run_sweep "$@"

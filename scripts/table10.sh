#!/usr/bin/env bash
# Table 10: ReLU (ReLU/SE/HS) vs DY-ReLU-C K=2 in backbone and head on COCO keypoints.
# Entries: configs/experiment/table10/<row>.yaml. Options (ROWS, SEEDS, TORCHRUN, SLURM): docs/tables.md.
#
#   bash scripts/table10.sh data.root=/path/to/coco   # the real thing, local
#   bash scripts/table10.sh data.root=/path/to/coco hydra/launcher=submitit_slurm hydra.launcher.partition=<p>
#   TORCHRUN="torchrun --nproc_per_node=8" bash scripts/table10.sh data.root=/path/to/coco
#   bash scripts/table10.sh data=coco_demo trainer=smoke   # smoke test of the whole table
#   python scripts/make_tables.py multirun/table10/<date_time>   # the table beside the paper's
TABLE=table10
SEEDS_DEFAULT=0
ROWS_DEFAULT="mbv2_100-relu mbv2_100-dyrelu_c mbv2_050-relu mbv2_050-dyrelu_c \
    mbv3_large-relu mbv3_large-dyrelu_c mbv3_small-relu mbv3_small-dyrelu_c"
source "$(dirname "${BASH_SOURCE[0]}")/_sweep_common.sh"
run_sweep "$@"

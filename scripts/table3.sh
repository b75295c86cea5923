#!/usr/bin/env bash
# Table 3: backbone/head DY-ReLU variants on COCO keypoints, MobileNetV2 x0.5, 3 seeds.
# Entries: configs/experiment/table3/<row>.yaml. Options (ROWS, SEEDS, TORCHRUN, SLURM): docs/tables.md.
#
#   bash scripts/table3.sh data.root=/path/to/coco   # the real thing, local
#   bash scripts/table3.sh data.root=/path/to/coco hydra/launcher=submitit_slurm hydra.launcher.partition=<p>
#   TORCHRUN="torchrun --nproc_per_node=8" bash scripts/table3.sh data.root=/path/to/coco
#   bash scripts/table3.sh data=coco_demo trainer=smoke   # smoke test of the whole table
#   python scripts/make_tables.py multirun/table3/<date_time>   # the table beside the paper's
TABLE=table3
SEEDS_DEFAULT=0,1,2
ROWS_DEFAULT="relu-relu dyrelu_a-relu dyrelu_b-relu dyrelu_c-relu \
    relu-dyrelu_a relu-dyrelu_b relu-dyrelu_c dyrelu_c-dyrelu_c"
source "$(dirname "${BASH_SOURCE[0]}")/_sweep_common.sh"
run_sweep "$@"

#!/usr/bin/env bash
# Supplementary Table 2: all 16 backbone x head combinations on COCO keypoints, MobileNetV2 x0.5.
# Entries: configs/experiment/supp_table2/<row>.yaml. Options (ROWS, SEEDS, TORCHRUN, SLURM): docs/tables.md.
#
#   bash scripts/supp_table2.sh data.root=/path/to/coco   # the real thing, local
#   bash scripts/supp_table2.sh data.root=/path/to/coco hydra/launcher=submitit_slurm hydra.launcher.partition=<p>
#   TORCHRUN="torchrun --nproc_per_node=8" bash scripts/supp_table2.sh data.root=/path/to/coco
#   bash scripts/supp_table2.sh data=coco_demo trainer=smoke   # smoke test of the whole table
#   python scripts/make_tables.py multirun/supp_table2/<date_time>   # the table beside the paper's
TABLE=supp_table2
SEEDS_DEFAULT=0
ROWS_DEFAULT="relu-relu relu-dyrelu_a relu-dyrelu_b relu-dyrelu_c \
    dyrelu_a-relu dyrelu_a-dyrelu_a dyrelu_a-dyrelu_b dyrelu_a-dyrelu_c \
    dyrelu_b-relu dyrelu_b-dyrelu_a dyrelu_b-dyrelu_b dyrelu_b-dyrelu_c \
    dyrelu_c-relu dyrelu_c-dyrelu_a dyrelu_c-dyrelu_b dyrelu_c-dyrelu_c"
source "$(dirname "${BASH_SOURCE[0]}")/_sweep_common.sh"
run_sweep "$@"

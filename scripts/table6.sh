#!/usr/bin/env bash
# Table 6: dynamic piecewise functions (dynamic segments, intercepts, K) on ImageNet, MobileNetV2 x0.35.
# Entries: configs/experiment/table6/<row>.yaml. Options (ROWS, SEEDS, TORCHRUN, SLURM): docs/tables.md.
#
#   bash scripts/table6.sh data.root=/path/to/imagenet   # the real thing, local
#   bash scripts/table6.sh data.root=/path/to/imagenet hydra/launcher=submitit_slurm hydra.launcher.partition=<p>
#   TORCHRUN="torchrun --nproc_per_node=8" bash scripts/table6.sh data.root=/path/to/imagenet
#   bash scripts/table6.sh data=demo trainer=smoke   # smoke test of the whole table
#   python scripts/make_tables.py multirun/table6/<date_time>   # the table beside the paper's
TABLE=table6
SEEDS_DEFAULT=0
ROWS_DEFAULT="relu k2_seg1_noint k2_seg1 k2_noint \
    k2 k3_noint k3"
source "$(dirname "${BASH_SOURCE[0]}")/_sweep_common.sh"
run_sweep "$@"

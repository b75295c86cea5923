#!/usr/bin/env bash
# Table 8: reduction ratio R (act.reduction) on ImageNet, MobileNetV2 x0.35.
# Entries: configs/experiment/table8/<row>.yaml. Options (ROWS, SEEDS, TORCHRUN, SLURM): docs/tables.md.
#
#   bash scripts/table8.sh data.root=/path/to/imagenet   # the real thing, local
#   bash scripts/table8.sh data.root=/path/to/imagenet hydra/launcher=submitit_slurm hydra.launcher.partition=<p>
#   TORCHRUN="torchrun --nproc_per_node=8" bash scripts/table8.sh data.root=/path/to/imagenet
#   bash scripts/table8.sh data=demo trainer=smoke   # smoke test of the whole table
#   python scripts/make_tables.py multirun/table8/<date_time>   # the table beside the paper's
TABLE=table8
SEEDS_DEFAULT=0
ROWS_DEFAULT="relu r64 r32 r16 \
    r8 r4"
source "$(dirname "${BASH_SOURCE[0]}")/_sweep_common.sh"
run_sweep "$@"

#!/usr/bin/env bash
# Table 9: DY-ReLU-B hyper-parameters (init_a, init_b, lambda_a) on ImageNet, MobileNetV2 x0.35.
# The default setting is one run ('default') shown in all three sub-tables. init_a_0_0 is expected
# to diverge (the paper: 'not converge'); it runs last so that its failure cannot cut the sweep short.
# Entries: configs/experiment/table9/<row>.yaml. Options (ROWS, SEEDS, TORCHRUN, SLURM): docs/tables.md.
#
#   bash scripts/table9.sh data.root=/path/to/imagenet   # the real thing, local
#   bash scripts/table9.sh data.root=/path/to/imagenet hydra/launcher=submitit_slurm hydra.launcher.partition=<p>
#   TORCHRUN="torchrun --nproc_per_node=8" bash scripts/table9.sh data.root=/path/to/imagenet
#   bash scripts/table9.sh data=demo trainer=smoke   # smoke test of the whole table
#   python scripts/make_tables.py multirun/table9/<date_time>   # the table beside the paper's
TABLE=table9
SEEDS_DEFAULT=0
ROWS_DEFAULT="default init_a_1p5_0 init_a_0p5_0 init_a_1_m0p5 \
    init_a_1_0p5 init_a_1_1 init_b_m0p1_0 init_b_0p1_0 \
    init_b_0_m0p1 init_b_0_0p1 lambda_a_0p5 lambda_a_2 \
    lambda_a_3 init_a_0_0"
source "$(dirname "${BASH_SOURCE[0]}")/_sweep_common.sh"
run_sweep "$@"

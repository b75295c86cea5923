#!/usr/bin/env bash
# Supplementary Table 1: related activations on ImageNet, MobileNetV2 x1.0 (PReLU channel-wise and channel-shared).
# Entries: configs/experiment/supp_table1/<row>.yaml. Options (ROWS, SEEDS, TORCHRUN, SLURM): docs/tables.md.
#
#   bash scripts/supp_table1.sh data.root=/path/to/imagenet   # the real thing, local
#   bash scripts/supp_table1.sh data.root=/path/to/imagenet hydra/launcher=submitit_slurm hydra.launcher.partition=<p>
#   TORCHRUN="torchrun --nproc_per_node=8" bash scripts/supp_table1.sh data.root=/path/to/imagenet
#   bash scripts/supp_table1.sh data=demo trainer=smoke   # smoke test of the whole table
#   python scripts/make_tables.py multirun/supp_table1/<date_time>   # the table beside the paper's
TABLE=supp_table1
SEEDS_DEFAULT=0
ROWS_DEFAULT="relu rrelu leaky_relu prelu \
    prelu_shared se_relu maxout_k2 maxout_k3 \
    dyrelu_b_k2 dyrelu_b_k3"
source "$(dirname "${BASH_SOURCE[0]}")/_sweep_common.sh"
run_sweep "$@"

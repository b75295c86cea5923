#!/usr/bin/env bash
# Table 5: related activations (RReLU, LeakyReLU, PReLU, SE+ReLU, Maxout, DY-ReLU-B K=2,3) on ImageNet, MobileNetV2 x0.35 and x1.0.
# Entries: configs/experiment/table5/<row>.yaml. Options (ROWS, SEEDS, TORCHRUN, SLURM): docs/tables.md.
#
#   bash scripts/table5.sh data.root=/path/to/imagenet   # the real thing, local
#   bash scripts/table5.sh data.root=/path/to/imagenet hydra/launcher=submitit_slurm hydra.launcher.partition=<p>
#   TORCHRUN="torchrun --nproc_per_node=8" bash scripts/table5.sh data.root=/path/to/imagenet
#   bash scripts/table5.sh data=demo trainer=smoke   # smoke test of the whole table
#   python scripts/make_tables.py multirun/table5/<date_time>   # the table beside the paper's
TABLE=table5
SEEDS_DEFAULT=0
ROWS_DEFAULT="x035-relu x035-rrelu x035-leaky_relu x035-prelu_shared \
    x035-se_relu x035-maxout_k2 x035-maxout_k3 x035-dyrelu_b_k2 \
    x035-dyrelu_b_k3 x100-relu x100-rrelu x100-leaky_relu \
    x100-prelu_shared x100-se_relu x100-maxout_k2 x100-maxout_k3 \
    x100-dyrelu_b_k2 x100-dyrelu_b_k3"
source "$(dirname "${BASH_SOURCE[0]}")/_sweep_common.sh"
run_sweep "$@"

#!/usr/bin/env bash
# Table 4: ReLU (ReLU/SE/HS) vs DY-ReLU-B K=2 on ImageNet: MobileNetV2 x0.35-1.0, MobileNetV3, ResNet-10..50.
# Entries: configs/experiment/table4/<row>.yaml. Options (ROWS, SEEDS, TORCHRUN, SLURM): docs/tables.md.
#
#   bash scripts/table4.sh data.root=/path/to/imagenet   # the real thing, local
#   bash scripts/table4.sh data.root=/path/to/imagenet hydra/launcher=submitit_slurm hydra.launcher.partition=<p>
#   TORCHRUN="torchrun --nproc_per_node=8" bash scripts/table4.sh data.root=/path/to/imagenet
#   bash scripts/table4.sh data=demo trainer=smoke   # smoke test of the whole table
#   python scripts/make_tables.py multirun/table4/<date_time>   # the table beside the paper's
TABLE=table4
SEEDS_DEFAULT=0
ROWS_DEFAULT="mbv2_100-relu mbv2_100-dyrelu_b mbv2_075-relu mbv2_075-dyrelu_b \
    mbv2_050-relu mbv2_050-dyrelu_b mbv2_035-relu mbv2_035-dyrelu_b \
    mbv3_large-relu mbv3_large-dyrelu_b mbv3_small-relu mbv3_small-dyrelu_b \
    resnet50-relu resnet50-dyrelu_b resnet34-relu resnet34-dyrelu_b \
    resnet18-relu resnet18-dyrelu_b resnet10-relu resnet10-dyrelu_b"
source "$(dirname "${BASH_SOURCE[0]}")/_sweep_common.sh"
run_sweep "$@"

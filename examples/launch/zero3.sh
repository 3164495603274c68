#!/usr/bin/env bash
# zero3: accelerate launch with ds_configs/accelerate_zero3.yaml (2 processes), LoRA adapters.
source "$(dirname "$0")/_common.sh"
accelerate launch --config_file "$(config accelerate_zero3.yaml "${1:-}")" --num_processes 2 "$(which etu-hf)" unlearn \
    "${ETU_ARGS[@]}" $CPU_FLAG --use_lora --lora_r 16 --lora_alpha 32 --lora_dropout 0 \
    --output_dir etu-zero3-output

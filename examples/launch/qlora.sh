#!/usr/bin/env bash
# QLoRA: nf4 4-bit base weights (bitsandbytes) + LoRA, one process (ds_configs/accelerate_single.yaml).
source "$(dirname "$0")/_common.sh"
accelerate launch --config_file "$(config accelerate_single.yaml "${1:-}")" "$(which etu-hf)" unlearn \
    "${ETU_ARGS[@]}" $CPU_FLAG --use_qlora --lora_r 16 --lora_alpha 32 --lora_dropout 0 \
    --gradient_checkpointing --output_dir etu-qlora-output

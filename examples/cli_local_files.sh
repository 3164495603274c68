#!/usr/bin/env bash
# etu-hf unlearn on local text files, with the original ETU tool's flag names.
#   bash examples/cli_local_files.sh <folder with forget.txt and retain.txt> <output_dir>
# With no model given, the embedded demo model is used; add --model_name_or_path for your own.
set -euo pipefail
DATA=${1:-etu-demo-output/demo_data}
OUT=${2:-cli-output}
etu-hf unlearn \
  --forget_corpora "$DATA/forget.txt" \
  --retain_corpora "$DATA/retain.txt" \
  --epsilon 0.05 \
  --use_lora --lora_r 16 --lora_alpha 32 --lora_dropout 0.0 \
  --batch_size 8 --max_length 128 --learning_rate 3e-3 --max_steps 150 \
  --pmi_top_k 64 --log_every 25 --save_strategy no --report_to none \
  --output_dir "$OUT"

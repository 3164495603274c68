#!/usr/bin/env bash
# LoRA-rank comparison: the same unlearning run at several ranks; each output
# folder gets its suppression_report.json. Usage: bash examples/lora_rank_sweep.sh [ranks...]
set -euo pipefail
DATA="${DATA:-etu-demo-output/demo_data}"
RANKS=("${@:-4 8 16 32}")
for rank in ${RANKS[@]}; do
  etu-hf unlearn --forget_corpora "$DATA/forget.txt" --retain_corpora "$DATA/retain.txt" \
    --use_lora --lora_r "$rank" --lora_alpha $((2 * rank)) --lora_dropout 0 \
    --max_length 128 --batch_size 8 --learning_rate 3e-3 --max_steps 150 --pmi_top_k 64 \
    --report_to none --save_strategy no --disable_tqdm true --output_dir "etu-rank-$rank"
done
python - "${RANKS[@]}" <<'PY'
import json, sys
print("rank  updated_p_S  wilson_upper  perplexity_ratio")
for r in sys.argv[1:]:
    rep = json.load(open(f"etu-rank-{r}/suppression_report.json"))
    print(f"{r:>4}  {rep['updated_p_S']:11.4f}  {rep['updated_p_S_wilson_upper']:12.4f}  {rep['perplexity_ratio']:16.3f}")
PY

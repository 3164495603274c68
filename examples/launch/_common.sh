# Shared by the recipes: pick the config (adapted for CPU when asked) and the demo data.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DATA="${DATA:-etu-demo-output/demo_data}"
[ -f "$DATA/forget.txt" ] || { echo "no $DATA/forget.txt: run 'etu-hf demo' first (or set DATA)"; exit 1; }
config() {  # config <file> [cpu]
    if [ "${2:-}" = "cpu" ]; then
        sed 's/use_cpu: false/use_cpu: true/' "$ROOT/ds_configs/$1" > "/tmp/etu-$1"; echo "/tmp/etu-$1"
    else
        echo "$ROOT/ds_configs/$1"
    fi
}
CPU_FLAG=""; [ "${1:-}" = "cpu" ] && CPU_FLAG="--use_cpu"
ETU_ARGS=(--forget_corpora "$DATA/forget.txt" --retain_corpora "$DATA/retain.txt" --max_length 128
          --batch_size 8 --learning_rate 3e-3 --max_steps 150 --pmi_top_k 64 --report_to none --save_strategy no)

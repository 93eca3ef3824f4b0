#!/usr/bin/env bash
# Self-Evolve Distillation, N iterations on one 8-GPU node (or a Slurm allocation, via slurm/selfevolve.sbatch):
# SFT the teacher on D_T -> serve it with vLLM -> `masksearch-rl selfevolve iterate` (fresh RAMP items, judge
# filter, merge) -> the next iteration trains on the new D_T.
#
# Usage (repo root; retrieval server and judge endpoint already running):
#   ITEMS=runs/ramp/items.jsonl SEED_SET=runs/cot/ramp.jsonl JUDGE_URL=http://judge:8000/v1 JUDGE_MODEL=Qwen2.5-72B \
#     recipes/launch/selfevolve_loop.sh <iterations> [sft recipe, default stage1_ramp/qwen2.5-7b_8gpu]
# Environment:
#   NUM_ITEMS (2000), WORK_DIR (runs/selfevolve), RETRIEVAL_URL (http://127.0.0.1:8000), PYTHON (python)
#   VLLM_PORT (8100), VLLM_START_TIMEOUT (1800 s), VLLM_TP (tensor parallel size; default N_GPUS, else 8)
#   SFT_LAUNCHER    runs the teacher's SFT: recipes/launch/sft_torchrun.sh (this node; default), or
#                   recipes/launch/slurm/sft.sbatch inside an allocation (every node; slurm/selfevolve.sbatch does)
#   SFT_LOGGER      trainer.logger of the SFT step (default [console,wandb])
#   SFT_TOKENIZER   the teacher's tokenizer: trajectories longer than SFT_MAX_TOKENS (8192, the recipes'
#                   data.max_length) are dropped at export instead of being cut before their answer
#   WANDB_PROJECT   also log each iteration's stats and teacher trajectories
#   DRY_RUN=1       print the steps
set -euo pipefail
[[ $# -ge 1 && $1 != -h ]] || { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }
iterations=$1
recipe=${2:-stage1_ramp/qwen2.5-7b_8gpu}
repo=${MASKSEARCH_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
sft_launcher=${SFT_LAUNCHER:-$repo/recipes/launch/sft_torchrun.sh}
vllm_tp=${VLLM_TP:-${N_GPUS:-8}}
work=${WORK_DIR:-runs/selfevolve}
py=${PYTHON:-python}
port=${VLLM_PORT:-8100}
run() { if [[ ${DRY_RUN:-0} == 1 ]]; then echo "+ $*"; else "$@"; fi; }
dataset=${SEED_SET:?set SEED_SET to the agent-built trajectories (masksearch-rl cot build output)}
for ((i = 1; i <= iterations; i++)); do
    sft_dir=$work/iter_$i/teacher_sft
    run "$py" -m masksearch_rl.cli sft export "$dataset" --out-dir "$work/iter_$i/teacher_data" --val-fraction 0.02 \
        ${SFT_TOKENIZER:+--tokenizer "$SFT_TOKENIZER" --max-tokens "${SFT_MAX_TOKENS:-8192}"}
    run env MASKSEARCH_DATA_DIR="$work/iter_$i/teacher_data/.." "$sft_launcher" "$recipe" \
        data.train_files="$work/iter_$i/teacher_data/train.parquet" data.val_files="$work/iter_$i/teacher_data/val.parquet" \
        trainer.default_local_dir="$sft_dir" trainer.logger="${SFT_LOGGER:-[console,wandb]}" \
        trainer.experiment_name="selfevolve-iter$i"
    # masksearch_rl.sft.train leaves the trained model (either backend) at <default_local_dir>/hf_model.
    hf_model=$sft_dir/hf_model
    [[ ${DRY_RUN:-0} == 1 || -f $hf_model/config.json ]] || { echo "error: SFT left no model at $hf_model" >&2; exit 1; }
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        echo "+ vllm serve $hf_model --port $port --served-model-name teacher --tensor-parallel-size $vllm_tp &"
    else
        vllm serve "$hf_model" --port "$port" --served-model-name teacher --tensor-parallel-size "$vllm_tp" &
        vllm_pid=$!
        trap 'kill $vllm_pid 2>/dev/null || true' EXIT
        deadline=$((SECONDS + ${VLLM_START_TIMEOUT:-1800}))
        until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
            kill -0 "$vllm_pid" 2>/dev/null || { echo "error: vLLM exited before serving $hf_model" >&2; exit 1; }
            ((SECONDS < deadline)) || { echo "error: vLLM not healthy after ${VLLM_START_TIMEOUT:-1800}s" >&2; exit 1; }
            sleep 5
        done
    fi
    run "$py" -m masksearch_rl.cli selfevolve iterate --iteration "$i" --items "${ITEMS:?set ITEMS}" \
        --work-dir "$work" --dataset "$dataset" --teacher-url "http://127.0.0.1:$port/v1" --teacher-model teacher \
        --judge-url "${JUDGE_URL:?}" --judge-model "${JUDGE_MODEL:?}" --num-items "${NUM_ITEMS:-2000}" \
        --retrieval-url "${RETRIEVAL_URL:-http://127.0.0.1:8000}" --no-progress \
        ${WANDB_PROJECT:+--wandb-project "$WANDB_PROJECT" --wandb-name "selfevolve-iter$i"}
    [[ ${DRY_RUN:-0} == 1 ]] || { kill "$vllm_pid"; wait "$vllm_pid" 2>/dev/null || true; trap - EXIT; }
    dataset=$work/iter_$i/dataset.jsonl
    echo "iteration $i done: $(cat "$work/iter_$i/stats.json" 2>/dev/null | head -c 400)"
done

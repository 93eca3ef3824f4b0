#!/usr/bin/env bash
# SFT one recipe on this node with torchrun through masksearch_rl.sft.train: verl's FSDP sft_trainer, or our
# DeepSpeed ZeRO-3 runner when the composed config says masksearch_sft.backend=deepspeed (sft_backend=deepspeed).
# Either way the trained model ends up at <trainer.default_local_dir>/hf_model.
#
# Usage (from the repo root):
#   recipes/launch/sft_torchrun.sh <stage>/<recipe> [hydra overrides ...]
#     <stage>/<recipe>  a file under recipes/configs/sft/ without .yaml, e.g. stage1_ramp/qwen2.5-7b_8gpu
#   recipes/launch/sft_torchrun.sh stage1_ramp/qwen2.5-1.5b_8gpu sft_backend=deepspeed trainer.total_epochs=2
#
# Environment (all optional):
#   N_GPUS        processes on this node (default 8)
#   NNODES        nodes in the job (default 1); with NODE_RANK (default 0), MASTER_ADDR, MASTER_PORT (default 29500),
#                 run the same command on every node
#   MASKSEARCH_DATA_DIR / MASKSEARCH_CKPT_DIR   parquet root (holds sft/) and checkpoint root
#   PYTHON        interpreter with verl + masksearch-rl installed (default: python)
#   DRY_RUN=1     print the command instead of running it
set -euo pipefail

[[ $# -ge 1 && $1 != -h && $1 != --help ]] || { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2; exit 2; }
recipe=${1%.yaml}
shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [[ ! -f $repo/recipes/configs/sft/$recipe.yaml ]]; then
    echo "error: no SFT recipe '$recipe'; available:" >&2
    (cd "$repo/recipes/configs/sft" && ls -1 stage*/*.yaml | sed 's|\.yaml$||') >&2
    exit 2
fi
nnodes=${NNODES:-1}
n_gpus=${N_GPUS:-8}
cmd=("${PYTHON:-python}" -m torch.distributed.run --nnodes="$nnodes" --nproc_per_node="$n_gpus"
     --node_rank="${NODE_RANK:-0}" --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}"
     -m masksearch_rl.sft.train --config-path "$repo/recipes/configs/sft/${recipe%%/*}" --config-name "${recipe#*/}"
     trainer.nnodes="$nnodes" trainer.n_gpus_per_node="$n_gpus" "$@")
if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "${cmd[@]}"; echo
    exit 0
fi
exec "${cmd[@]}"

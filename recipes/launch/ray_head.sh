#!/usr/bin/env bash
# Start the Ray head of a multi-node cluster on this node (step 1 of 3; then ray_worker.sh on every other node,
# then ray_submit.sh from anywhere that reaches the dashboard).
#
# Usage:
#   recipes/launch/ray_head.sh
#
# Environment (all optional):
#   N_GPUS          GPUs Ray may use on this node; default 8
#   RAY_PORT        GCS port the workers join; default 6379
#   DASHBOARD_PORT  dashboard / job submission port; default 8265
#   RAY             the ray CLI; default: ray
#
# Every node needs the same software (pip install -e ".[gpu]" from this repo, so verl finds our plugins), the
# data and checkpoint directories on a shared file system, and network access to the retrieval server.
# W&B: run `wandb login` (or export WANDB_API_KEY / WANDB_MODE=offline) *before* this script: Ray workers inherit
# the environment of `ray start`.
set -euo pipefail

[[ ${1:-} != -h && ${1:-} != --help ]] || { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0; }

ray_bin=${RAY:-ray}
n_gpus=${N_GPUS:-8}
port=${RAY_PORT:-6379}
dashboard_port=${DASHBOARD_PORT:-8265}

"$ray_bin" start --head --port="$port" --num-gpus="$n_gpus" \
    --dashboard-host=0.0.0.0 --dashboard-port="$dashboard_port"

head_ip=$(hostname -I 2>/dev/null | awk '{print $1}')
head_ip=${head_ip:-HEAD_IP}
cat >&2 <<EOF

Ray head is up. Next:
  on every other node:  HEAD_ADDRESS=$head_ip RAY_PORT=$port recipes/launch/ray_worker.sh
  then, to train:       RAY_ADDRESS=http://$head_ip:$dashboard_port NNODES=<nodes> \\
                          recipes/launch/ray_submit.sh ramp_dapo/qwen2.5-7b_8gpu
EOF

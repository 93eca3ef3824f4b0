#!/usr/bin/env bash
# Start the Ray head of a multi-node cluster on this node (step 1 of 3; then ray_worker.sh on every other node,
# then ray_submit.sh from anywhere that reaches the dashboard; ray_down.sh takes a node down again).
#
# Usage:
#   recipes/launch/ray_head.sh
#
# Environment (all optional):
#   N_GPUS          GPUs Ray may use on this node; default 8 (logical slots on a CPU machine, see docs/cpu.md)
#   NUM_CPUS        CPUs Ray may schedule on this node; default: Ray's count of this node's cores
#   RAY_PORT        GCS port the workers join; default 6379
#   DASHBOARD_PORT  dashboard / job submission port; default 8265
#   DASHBOARD_HOST  address the dashboard binds; default 0.0.0.0 (every interface)
#   NODE_IP         this node's address as the other nodes see it; default: Ray's choice
#   RAY_TEMP_DIR    Ray's temp/log/socket root on this node; default: Ray's (/tmp/ray)
#   RAY_RESOURCES   extra logical resources, as JSON, e.g. '{"head": 1}'
#   RAY_START_ARGS  more `ray start` options, split on spaces (ports: --node-manager-port=..., --min-worker-port=...)
#   RAY             the ray CLI; default: ray
#   DRY_RUN=1       print the `ray start` command instead of running it
#
# Every node needs the same software (pip install -e ".[gpu]" from this repo, so verl finds our plugins), the
# data and checkpoint directories on a shared file system, and network access to the retrieval server.
# W&B: run `wandb login` (or export WANDB_API_KEY / WANDB_MODE=offline) *before* this script: Ray workers inherit
# the environment of `ray start`. Ray >= 2.5x turns token authentication on for the head when a token exists
# (~/.ray/auth_token, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH); the workers then need the same token
# (ray_worker.sh switches token mode on when it finds one).
set -euo pipefail

[[ ${1:-} != -h && ${1:-} != --help ]] || { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0; }

ray_bin=${RAY:-ray}
n_gpus=${N_GPUS:-8}
port=${RAY_PORT:-6379}
dashboard_port=${DASHBOARD_PORT:-8265}

cmd=("$ray_bin" start --head --port="$port" --num-gpus="$n_gpus"
    --dashboard-host="${DASHBOARD_HOST:-0.0.0.0}" --dashboard-port="$dashboard_port")
[[ -n ${NUM_CPUS:-} ]] && cmd+=(--num-cpus="$NUM_CPUS")
[[ -n ${NODE_IP:-} ]] && cmd+=(--node-ip-address="$NODE_IP")
[[ -n ${RAY_TEMP_DIR:-} ]] && cmd+=(--temp-dir="$RAY_TEMP_DIR")
[[ -n ${RAY_RESOURCES:-} ]] && cmd+=(--resources="$RAY_RESOURCES")
# shellcheck disable=SC2206  # intentionally split: a list of options
[[ -n ${RAY_START_ARGS:-} ]] && cmd+=($RAY_START_ARGS)

if [[ -n ${DRY_RUN:-} ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi
echo "+ ${cmd[*]}" >&2
"${cmd[@]}"

head_ip=${NODE_IP:-$(hostname -I 2>/dev/null | awk '{print $1}')}
head_ip=${head_ip:-HEAD_IP}
cat >&2 <<EOT

Ray head is up. Next:
  on every other node:  HEAD_ADDRESS=$head_ip RAY_PORT=$port recipes/launch/ray_worker.sh
  then, to train:       RAY_ADDRESS=http://$head_ip:$dashboard_port NNODES=<nodes> \\
                          recipes/launch/ray_submit.sh ramp_dapo/qwen2.5-7b_8gpu
  to stop this node:    ${RAY_TEMP_DIR:+RAY_TEMP_DIR=$RAY_TEMP_DIR }recipes/launch/ray_down.sh
EOT

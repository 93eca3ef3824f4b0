#!/usr/bin/env bash
# Join this node to a Ray cluster started with ray_head.sh (step 2 of 3; run on every node but the head).
#
# Usage:
#   HEAD_ADDRESS=10.0.0.1 recipes/launch/ray_worker.sh
#   recipes/launch/ray_worker.sh 10.0.0.1
#
# Environment:
#   HEAD_ADDRESS    the head node's IP or host name (or the first argument); required
#   N_GPUS          GPUs Ray may use on this node; default 8 (logical slots on a CPU machine, see docs/cpu.md)
#   NUM_CPUS        CPUs Ray may schedule on this node; default: Ray's count of this node's cores
#   RAY_PORT        the head's GCS port; default 6379
#   NODE_IP         this node's address as the other nodes see it; default: Ray's choice
#   RAY_TEMP_DIR    Ray's temp/log/socket root on this node; default: Ray's (/tmp/ray)
#   RAY_RESOURCES   extra logical resources, as JSON, e.g. '{"worker": 1}'
#   RAY_START_ARGS  more `ray start` options, split on spaces (ports: --node-manager-port=..., --min-worker-port=...)
#   RAY             the ray CLI; default: ray
#   DRY_RUN=1       print the `ray start` command instead of running it
#
# Authentication: a head that found a Ray token runs in token mode and turns away nodes that do not send it
# ("InvalidAuthToken"), while `ray start --address` does not look for a token on its own. With a token here
# (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, the head's) and RAY_AUTH_MODE unset, this script
# sets RAY_AUTH_MODE=token.
# Export W&B / Hugging Face settings (WANDB_MODE, HF_HOME, ...) before running this: Ray workers inherit them.
set -euo pipefail

[[ ${1:-} != -h && ${1:-} != --help ]] || { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0; }

head=${1:-${HEAD_ADDRESS:-}}
if [[ -z $head ]]; then
    echo "error: set HEAD_ADDRESS (or pass the head's address as the first argument)" >&2
    exit 2
fi

if [[ -z ${RAY_AUTH_MODE:-} ]] && [[ -n ${RAY_AUTH_TOKEN:-} || -s ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token} ]]; then
    export RAY_AUTH_MODE=token
fi

ray_bin=${RAY:-ray}
cmd=("$ray_bin" start --address="$head:${RAY_PORT:-6379}" --num-gpus="${N_GPUS:-8}")
[[ -n ${NUM_CPUS:-} ]] && cmd+=(--num-cpus="$NUM_CPUS")
[[ -n ${NODE_IP:-} ]] && cmd+=(--node-ip-address="$NODE_IP")
[[ -n ${RAY_TEMP_DIR:-} ]] && cmd+=(--temp-dir="$RAY_TEMP_DIR")
[[ -n ${RAY_RESOURCES:-} ]] && cmd+=(--resources="$RAY_RESOURCES")
# shellcheck disable=SC2206  # intentionally split: a list of options
[[ -n ${RAY_START_ARGS:-} ]] && cmd+=($RAY_START_ARGS)

if [[ -n ${DRY_RUN:-} ]]; then
    printf '%s' "${RAY_AUTH_MODE:+RAY_AUTH_MODE=$RAY_AUTH_MODE }"
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi
echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"

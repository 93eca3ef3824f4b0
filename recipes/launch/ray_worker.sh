#!/usr/bin/env bash
# Join this node to a Ray cluster started with ray_head.sh (step 2 of 3; run on every node but the head).
#
# Usage:
#   HEAD_ADDRESS=10.0.0.1 recipes/launch/ray_worker.sh
#   recipes/launch/ray_worker.sh 10.0.0.1
#
# Environment:
#   HEAD_ADDRESS    the head node's IP or host name (or the first argument); required
#   N_GPUS          GPUs Ray may use on this node; default 8
#   RAY_PORT        the head's GCS port; default 6379
#   RAY             the ray CLI; default: ray
#
# Export W&B / Hugging Face settings (WANDB_MODE, HF_HOME, ...) before running this: Ray workers inherit them.
set -euo pipefail

[[ ${1:-} != -h && ${1:-} != --help ]] || { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0; }

head=${1:-${HEAD_ADDRESS:-}}
if [[ -z $head ]]; then
    echo "error: set HEAD_ADDRESS (or pass the head's address as the first argument)" >&2
    exit 2
fi

ray_bin=${RAY:-ray}
"$ray_bin" start --address="$head:${RAY_PORT:-6379}" --num-gpus="${N_GPUS:-8}"

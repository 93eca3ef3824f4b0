#!/usr/bin/env bash
# Submit a data-generation command (ramp generate, cot build, selfevolve iterate) to a running Ray cluster with
# --engine ray (after ray_head.sh and ray_worker.sh; the training counterpart is ray_submit.sh). The command's driver
# runs on the head as a Ray job and its workers spread over the cluster; logs stream here (Ctrl-C stops following,
# not the job: `ray job stop <id>`). A rerun of the same command resumes: finished items are skipped, failed ones
# retried.
#
# Usage:
#   recipes/launch/ray_data_submit.sh <command> <subcommand> [options ...]
#   RAY_ADDRESS=http://10.0.0.5:8265 recipes/launch/ray_data_submit.sh ramp generate \
#       --corpus /shared/runs/passages.jsonl --out /shared/runs/ramp/items.jsonl --extractor llm \
#       --llm-base-url http://10.0.0.7:8000/v1 --llm-concurrency 256 --ray-workers 32
#   recipes/launch/ray_data_submit.sh cot build --input /shared/runs/ramp/items.jsonl \
#       --out /shared/runs/cot/ramp.jsonl llm.default.base_url=http://10.0.0.7:8000/v1 \
#       llm.default.concurrency=512 search.backend.url=http://10.0.0.5:8000 ray.workers=32
#   recipes/launch/ray_data_submit.sh selfevolve iterate -i 1 --items ... --ray-workers 16
#
# Paths must be on a file system every node sees: the input, --out and the work directory next to it (<out>.ray)
# hold the shards, Ray Data's checkpoint and the workers' failure logs. The LLM configs' concurrency (and rate_per_s)
# bound each endpoint over all workers together.
#
# Environment:
#   RAY_ADDRESS  the head's dashboard; default http://127.0.0.1:8265
#   PYTHON       interpreter on the head node; default python3
#   RAY          the ray CLI; default: ray
#   DRY_RUN=1    print the command instead of submitting it
# Forwarded to the job when set: WANDB_MODE WANDB_ENTITY WANDB_DIR WANDB_PROJECT HF_HOME HF_HUB_OFFLINE. Secrets (the
# LLM endpoint's key, WANDB_API_KEY) are not: export them on every node before `ray start`, where the workers read
# them (the configs name the variable, e.g. --api-key-env).
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[[ $# -ge 2 && $1 != -h && $1 != --help ]] || usage
case "$1 $2" in
    "ramp generate" | "cot build" | "selfevolve iterate") ;;
    *)
        echo "error: '$1 $2' has no Ray engine; one of: ramp generate, cot build, selfevolve iterate" >&2
        exit 2
        ;;
esac
for arg in "$@"; do
    [[ $arg != --engine && $arg != --engine=* ]] || { echo "error: --engine is set to ray by this script" >&2; exit 2; }
done

address=${RAY_ADDRESS:-http://127.0.0.1:8265}
python_bin=${PYTHON:-python3}
ray_bin=${RAY:-ray}

runtime_env=$("$python_bin" - <<'EOF'
import json, os
names = ["WANDB_MODE", "WANDB_ENTITY", "WANDB_DIR", "WANDB_PROJECT", "HF_HOME", "HF_HUB_OFFLINE"]
env_vars = {"PYTHONUNBUFFERED": "1", **{n: os.environ[n] for n in names if os.environ.get(n)}}
print(json.dumps({"env_vars": env_vars}))
EOF
)

command=$1 subcommand=$2
shift 2
# A token-mode head (Ray 2.60 turns it on when a token exists) refuses clients that do not use token mode too.
if [[ -z ${RAY_AUTH_MODE:-} ]] && [[ -n ${RAY_AUTH_TOKEN:-} || -s ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token} ]]; then
    export RAY_AUTH_MODE=token
fi
cmd=("$ray_bin" job submit --address="$address" --runtime-env-json="$runtime_env" --
    "$python_bin" -m masksearch_rl.cli "$command" "$subcommand" --engine ray "$@")

if [[ -n ${DRY_RUN:-} ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi

echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"

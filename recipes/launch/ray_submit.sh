#!/usr/bin/env bash
# Submit one MaskSearch recipe to a running Ray cluster (step 3 of 3, after ray_head.sh and ray_worker.sh).
# The trainer's driver runs on the head node as a Ray job; logs stream here (Ctrl-C stops following, not the job:
# `ray job stop <id>`).
#
# Usage:
#   NNODES=4 recipes/launch/ray_submit.sh <recipe> [hydra overrides ...]
#     <recipe>   a file under recipes/configs/ without .yaml, e.g. ramp_dapo/qwen2.5-7b_8gpu
#   NNODES=2 MASKSEARCH_RETRIEVAL_URL=http://10.0.0.5:8000 recipes/launch/ray_submit.sh \
#       hotpotqa_dapo/qwen2.5-3b_8gpu paths.stage1_model=/shared/ckpt/ramp-3b/hf
#
# Environment:
#   NNODES                    nodes in the cluster (trainer.nnodes); default 1
#   N_GPUS                    GPUs per node (trainer.n_gpus_per_node); default 8
#   VAL_MAX_SAMPLES           prompts per validation pass (data.val_max_samples); default: the recipe's (512)
#   RAY_ADDRESS               the head's dashboard; default http://127.0.0.1:8265
#   MASKSEARCH_RETRIEVAL_URL  retrieval server every node can reach; default http://127.0.0.1:8000
#                             (127.0.0.1 works across nodes only if each node runs its own server)
#   MASKSEARCH_DATA_DIR       parquet root on a file system every node sees; default $PWD/data
#   MASKSEARCH_CKPT_DIR       checkpoint root on a shared file system; default $PWD/checkpoints
#   PYTHON                    interpreter on the head node; default python3
#   RAY                       the ray CLI; default: ray
#   DRY_RUN=1                 print the command instead of submitting it
# Forwarded to the job when set: WANDB_MODE WANDB_ENTITY WANDB_DIR WANDB_PROJECT HF_HOME HF_HUB_OFFLINE VERL_PLATFORM
# MASKSEARCH_LOG_LEVEL (INFO: each agent-loop worker logs the search backend it reached). Secrets (WANDB_API_KEY)
# are not: put them in the nodes' environment before `ray start`, or run `wandb login` on the head node.
# Resources come from the cluster (`ray start --num-gpus/--num-cpus` on each node): a recipe's
# ray_kwargs.ray_init.num_cpus/num_gpus (the CPU recipes' logical slots) are set to null here, because Ray refuses
# them when the driver joins a running cluster. With a Ray token here (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
# ~/.ray/auth_token) and RAY_AUTH_MODE unset, RAY_AUTH_MODE=token is set, as a token-mode head requires.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
    exit 2
}

[[ $# -ge 1 && $1 != -h && $1 != --help ]] || usage
recipe=${1%.yaml}
shift

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
if [[ $recipe != */* || ! -f $repo/recipes/configs/$recipe.yaml ]]; then
    echo "error: no recipe '$recipe' (expected recipes/configs/<group>/<name>.yaml); available:" >&2
    (cd "$repo/recipes/configs" && ls -1 ./*/*.yaml | sed 's|^\./||; s|\.yaml$||' | grep -v '^curriculum/\|^platform/') >&2
    exit 2
fi
group=${recipe%%/*}
name=${recipe#*/}

nnodes=${NNODES:-1}
n_gpus=${N_GPUS:-8}
address=${RAY_ADDRESS:-http://127.0.0.1:8265}
url=${MASKSEARCH_RETRIEVAL_URL:-http://127.0.0.1:8000}
python_bin=${PYTHON:-python3}
ray_bin=${RAY:-ray}

absolute() { case $1 in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }
data_dir=$(absolute "${MASKSEARCH_DATA_DIR:-data}")
ckpt_dir=$(absolute "${MASKSEARCH_CKPT_DIR:-checkpoints}")

if [[ $nnodes -gt 1 && $url =~ ^https?://(127\.0\.0\.1|localhost)([:/]|$) ]]; then
    echo "warning: MASKSEARCH_RETRIEVAL_URL=$url is node-local; rollouts run on all $nnodes nodes," >&2
    echo "  so each node needs its own server there (or point the URL at one server every node reaches)" >&2
fi

# Job environment: only variables verl does not set itself (Ray refuses to merge duplicate env var keys).
runtime_env=$("$python_bin" - <<'EOF'
import json, os
names = ["WANDB_MODE", "WANDB_ENTITY", "WANDB_DIR", "WANDB_PROJECT", "HF_HOME", "HF_HUB_OFFLINE",
         "VERL_PLATFORM", "MASKSEARCH_LOG_LEVEL"]
env_vars = {"PYTHONUNBUFFERED": "1", **{n: os.environ[n] for n in names if os.environ.get(n)}}
print(json.dumps({"env_vars": env_vars}))
EOF
)

cmd=("$ray_bin" job submit --address="$address" --runtime-env-json="$runtime_env" --
    "$python_bin" -m verl.trainer.main_ppo
    --config-path "pkg://recipes.configs.$group" --config-name "$name"
    "trainer.nnodes=$nnodes" "trainer.n_gpus_per_node=$n_gpus"
    "paths.data_dir=$data_dir" "paths.ckpt_dir=$ckpt_dir" "search_env.backend.url=$url"
    "++ray_kwargs.ray_init.num_cpus=null" "++ray_kwargs.ray_init.num_gpus=null"
    ${VAL_MAX_SAMPLES:+"data.val_max_samples=$VAL_MAX_SAMPLES"}
    "$@")

if [[ -z ${RAY_AUTH_MODE:-} ]] && [[ -n ${RAY_AUTH_TOKEN:-} || -s ${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token} ]]; then
    export RAY_AUTH_MODE=token
fi

if [[ -n ${DRY_RUN:-} ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi

echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"

#!/usr/bin/env bash
# Train one MaskSearch recipe on this machine: python -m verl.trainer.main_ppo, which starts a local Ray itself.
#
# Usage (from the repo root: the recipes' relative paths data/, checkpoints/, runs/ are relative to the working
# directory; the repo must be installed with `pip install -e ".[gpu]"`):
#   recipes/launch/single_node.sh <recipe> [hydra overrides ...]
#     <recipe>   a file under recipes/configs/ without .yaml, e.g. ramp_dapo/qwen2.5-1.5b_8gpu,
#                hotpotqa_dapo/qwen2.5-7b_8gpu, quickstart/qwen2.5-0.5b_cpu
#   recipes/launch/single_node.sh ramp_dapo/qwen2.5-1.5b_8gpu curriculum=adaptive actor_rollout_ref.rollout.n=16
#
# Environment (all optional):
#   MASKSEARCH_RETRIEVAL_URL  retrieval server, default http://127.0.0.1:8000 (GET /health is checked first)
#   MASKSEARCH_DATA_DIR       parquet root (holds ramp/, hotpotqa/); default: the recipe's paths.data_dir
#   MASKSEARCH_CKPT_DIR       checkpoint root; default: the recipe's paths.ckpt_dir
#   N_GPUS                    GPUs to use on this node (trainer.n_gpus_per_node); default: the recipe's (8)
#   VAL_MAX_SAMPLES           prompts per validation pass (data.val_max_samples); default: the recipe's (512);
#                             -1 validates on the whole split (masksearch-rl eval scores full benchmarks)
#   PYTHON                    interpreter with verl + masksearch-rl installed; default: python
#   WANDB_MODE=offline        log to ./wandb without network; `wandb sync wandb/offline-run-*` later
#   SKIP_HEALTH_CHECK=1       do not check the retrieval server before starting
#   DRY_RUN=1                 print the command instead of running it
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

python_bin=${PYTHON:-python}
url=${MASKSEARCH_RETRIEVAL_URL:-http://127.0.0.1:8000}

# Absolute paths: verl's Ray workers need not share the launching shell's working directory.
absolute() { case $1 in /*) printf '%s' "$1" ;; *) printf '%s/%s' "$PWD" "$1" ;; esac; }

overrides=("search_env.backend.url=$url")
[[ -n ${MASKSEARCH_DATA_DIR:-} ]] && overrides+=("paths.data_dir=$(absolute "$MASKSEARCH_DATA_DIR")")
[[ -n ${MASKSEARCH_CKPT_DIR:-} ]] && overrides+=("paths.ckpt_dir=$(absolute "$MASKSEARCH_CKPT_DIR")")
[[ -n ${N_GPUS:-} ]] && overrides+=("trainer.n_gpus_per_node=$N_GPUS")
[[ -n ${VAL_MAX_SAMPLES:-} ]] && overrides+=("data.val_max_samples=$VAL_MAX_SAMPLES")

cmd=("$python_bin" -m verl.trainer.main_ppo
    --config-path "pkg://recipes.configs.$group" --config-name "$name"
    trainer.nnodes=1 "${overrides[@]}" "$@")

if [[ -n ${DRY_RUN:-} ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi

if [[ -z ${SKIP_HEALTH_CHECK:-} ]]; then
    if ! command -v curl >/dev/null; then
        echo "warning: curl not found; retrieval server at $url not checked" >&2
    elif ! curl -fsS --max-time 5 "$url/health" >/dev/null; then
        echo "error: no retrieval server answers at $url/health" >&2
        echo "  start one: masksearch-rl serve --index <index dir> --port 8000   (or set MASKSEARCH_RETRIEVAL_URL)" >&2
        echo "  or skip this check: SKIP_HEALTH_CHECK=1" >&2
        exit 1
    fi
fi

echo "+ ${cmd[*]}" >&2
exec "${cmd[@]}"

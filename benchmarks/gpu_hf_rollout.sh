#!/usr/bin/env bash
# verl on one GPU with our HF rollout backend: a few DAPO steps (quickstart recipe) per model shape, then a few steps
# of verl's SFT trainer on oracle trajectories; logs and a metrics JSON go to $OUT.
#
# Made for the device machine (Python 3.12 + CUDA torch, no verl/ray/hydra, no internet). What it needs travels in
# .whl/ (carry it):
#   .whl/site312.tar.xz   verl 0.9.1, ray 2.60 (slimmed), hydra, tensordict, TransferQueue, transformers 5.10.4, ...
#                         installed for cp312 x86-64 (see docs/benchmarks.md for how it was made)
#   .whl/bench/           ramp/{train,val}.parquet, index/ (BM25), model_tiny/, corpus.jsonl, sft/{train,val}.parquet
# Device:  bash benchmarks/gpu_hf_rollout.sh
# CPU dry run of the same logic (this repo's venv; no unpacking):
#   SKIP_INSTALL=1 PY=.venv/bin/python VERL_PLATFORM=cpu DEVICE=cpu MODELS=tiny STEPS=1 OUT=/tmp/gpu_out \
#       bash benchmarks/gpu_hf_rollout.sh
# Knobs: STEPS (PPO steps per model, 3), MODELS ("tiny qwen2.5-0.5b"), SFT_STEPS (5, 0 = skip),
#        PPO_TIMEOUT (tiny) / PPO_TIMEOUT_BIG (other shapes) / SFT_TIMEOUT (seconds per run), BENCH (.whl/bench).
set -u
REPO=$(pwd)
OUT=${OUT:-/tmp/gpu_out}
W=${W:-/tmp/gpubench}
PY=$(command -v "${PY:-python3}")
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # absolute (not resolved: a venv's link must stay)
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-3}
MODELS=${MODELS-"tiny qwen2.5-0.5b"}  # MODELS= (empty): SFT only
SFT_STEPS=${SFT_STEPS:-5}
PPO_TIMEOUT=${PPO_TIMEOUT:-240}  # Ray + workers take ~100 s to come up on the H100 before step 1
PPO_TIMEOUT_BIG=${PPO_TIMEOUT_BIG:-300}  # for the shapes other than tiny
SFT_TIMEOUT=${SFT_TIMEOUT:-150}
BENCH=${BENCH:-$REPO/.whl/bench}
mkdir -p "$OUT" "$W"
exec > >(tee -a "$OUT/driver.log") 2>&1
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

if [ -z "${SKIP_INSTALL:-}" ]; then
  mkdir -p /tmp/site && tar -xJf .whl/site312.tar.xz -C /tmp/site || { echo "unpack failed"; exit 1; }
  # Pure-Python packages that have no wheel (antlr4-python3-runtime 4.9.3, omegaconf's pin) and late
  # additions (cachetools; openai + httpx2/httpcore2/jiter/anyio/idna/distro/sniffio/truststore) lie unpacked here.
  [ -d .whl/overlay ] && rm -rf /tmp/site/antlr4 && cp -r .whl/overlay/* /tmp/site/
  export PYTHONPATH=/tmp/site:$REPO
else
  export PYTHONPATH=$REPO
fi
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
stamp "packages ready"
$PY - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("verl", "ray", "transformers", "tokenizers", "tensordict", "hydra", "transfer_queue", "bm25s"):
    mod = importlib.import_module(name)
    print(name, getattr(mod, "__version__", "?"))
import verl  # loads our plugins through the verl.plugins entry point
from verl.plugin.platform import get_platform
print("platform", type(get_platform()).__name__)
# Fail here, not inside a Ray actor: every module the PPO path imports in its workers.
import masksearch_rl.verl_ext.trainer, masksearch_rl.verl_ext.hf_rollout, verl.trainer.main_ppo
import reward.masksearch_reward, reward.manager, envs.agent_loop
EOF
[ $? -eq 0 ] || { echo "import check failed"; exit 1; }
if $PY -c "import flash_attn" 2>/dev/null; then ATTN=flash_attention_2; else ATTN=sdpa; fi
stamp "attention: $ATTN"

# Data: everything under $W (paths.data_dir), with the models next to it.
cp -r "$BENCH/ramp" "$BENCH/index" "$W/" && cp -r "$BENCH/model_tiny" "$W/model_tiny"
$PY -m masksearch_rl.cli serve --index "$W/index" --port 8000 > "$OUT/server.log" 2>&1 &
SERVER=$!
for shape in $MODELS; do
  [ "$shape" = tiny ] && continue
  $PY benchmarks/gpu_bench.py build-model --out "$W/model_$shape" --corpus "$BENCH/corpus.jsonl" --shape "$shape" \
    || { echo "model build $shape failed"; exit 1; }
done
stamp "models ready"

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 2 > "$OUT/smi.csv" 2>&1 &
  SMI=$!
fi
$PY benchmarks/gpu_bench.py wait-server --timeout 90 || { echo "no retrieval server"; tail -20 "$OUT/server.log"; }

RUNS=()
for shape in $MODELS; do
  log="$OUT/ppo_$shape.log"
  stamp "PPO $shape: $STEPS steps"
  s=$(date +%s)
  limit=$PPO_TIMEOUT; [ "$shape" = tiny ] || limit=$PPO_TIMEOUT_BIG
  timeout "$limit" $PY -m verl.trainer.main_ppo \
    --config-path "$REPO/recipes/configs/quickstart" --config-name qwen2.5-0.5b_cpu \
    actor_rollout_ref.model.path="$W/model_$shape" paths.data_dir="$W" paths.ckpt_dir="$W/ckpt" \
    actor_rollout_ref.rollout.name=hf trainer.device="$DEVICE" trainer.total_training_steps="$STEPS" \
    ++actor_rollout_ref.model.override_config.attn_implementation=$ATTN \
    ++ray_kwargs.ray_init.num_cpus=16 ++ray_kwargs.ray_init.num_gpus=1 > "$log" 2>&1
  rc=$?
  RUNS+=("ppo_$shape=$log:$(( $(date +%s) - s ))")
  stamp "PPO $shape rc=$rc"
  [ $rc -eq 0 ] || grep -v "^\s*$" "$log" | grep -B2 -A25 "Traceback" | tail -40
  $PY -m ray.scripts.scripts stop --force > /dev/null 2>&1
done
kill $SERVER 2>/dev/null

if [ "$SFT_STEPS" -gt 0 ]; then
  log="$OUT/sft_tiny.log"
  stamp "SFT tiny: $SFT_STEPS steps"
  s=$(date +%s)
  (cd "$W" && timeout "$SFT_TIMEOUT" $PY -m torch.distributed.run --nproc_per_node=1 -m verl.trainer.sft_trainer \
    --config-path "$REPO/recipes/configs/sft/stage1_ramp" --config-name qwen2.5-1.5b_8gpu \
    model.path="$W/model_tiny" data.train_files="$BENCH/sft/train.parquet" data.val_files="$BENCH/sft/val.parquet" \
    ++model.override_config.attn_implementation=$ATTN model.use_remove_padding=false \
    model.enable_gradient_checkpointing=false trainer.n_gpus_per_node=1 trainer.device="$DEVICE" \
    trainer.logger=[console] trainer.total_training_steps="$SFT_STEPS" data.train_batch_size=32 \
    data.micro_batch_size_per_gpu=8 data.max_length=2048 data.max_token_len_per_gpu=16384 data.num_workers=0 \
    trainer.default_local_dir="$W/sft_ckpt" trainer.save_freq=-1 trainer.test_freq=-1 \
    trainer.resume_mode=disable) > "$log" 2>&1
  rc=$?
  RUNS+=("sft_tiny=$log:$(( $(date +%s) - s ))")
  stamp "SFT rc=$rc"
  [ $rc -eq 0 ] || grep -v "^\s*$" "$log" | grep -B2 -A25 "Traceback\|Error" | tail -40
fi
[ -n "${SMI:-}" ] && kill "$SMI" 2>/dev/null
$PY benchmarks/gpu_bench.py metrics --out "$OUT/metrics.json" "${RUNS[@]}"
stamp "done"

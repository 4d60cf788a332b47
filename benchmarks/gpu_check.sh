#!/usr/bin/env bash
# The GPU check in one go, most valuable numbers first, within 9 minutes on one H100/H200, offline
# (installs nothing; needs python3 with jax, flax, optax, torch, transformers, peft):
#
#   bash benchmarks/gpu_check.sh "$OUT"                # OUT defaults to benchmarks/results/gpu_check
#   bash benchmarks/gpu_check.sh --cpu_smoke "$OUT"    # every stage at tiny shapes on the CPU
#
# What comes back: OUT holds four files, no folders (benchmarks/README.md, "The GPU check"):
#   summary.md, summary.json  the run so far (paths, targets, tables), rewritten after every stage
#   logs.tar.gz               every stage's stdout/stderr, record log (JSONL) and JSON, rewritten
#                             after every stage
#   console.log               everything the script printed, as it printed it
# so a run killed at any point keeps everything up to its last finished stage, and console.log has
# the running stage's lines too. Stages, in this order, each its own process (JAX first, its
# PyTorch counterpart after it, so no JAX crash can lose a PyTorch number and PyTorch never shares
# a GPU with JAX's preallocated memory):
#   preflight                  gpt2 b2 x 1024 with configs/gpt2_hh.py's settings on every attention
#                              path ('auto', 'cudnn', 'cudnn' causal, 'xla') and the sampler
#   xla_attention[_autotune0]  the XLA attention compile A/B, without / with --xla_gpu_autotune_level=0
#   gpt2_b16_user              gpt2 b16 x 1024 train step as configs/gpt2_hh.py runs it
#   gpt2_b16_like_peft         the same at PEFT's setting (LoRA r8, no dropout, no remat, unscanned)
#   gpt2_decode                the sampler at batch 1 and 64 (128 new tokens)
#   attention_check            every attention path against fp32 XLA at 16 x 1024
#   gpt2_b16_torch             PEFT eager, PEFT + torch.compile, transformers generate, the scorer
#   gpt2-xl_b8_user, gpt2-xl_b8_like_peft, gpt2-xl_b8_torch   the same for gpt2-xl at batch 8
#   flag_*                     gpt2 b16 (user setting) again under one XLA flag each
# Each stage gets min(its cap, the time left before TOTAL_S less a reserve); one that would get less
# than its minimum is skipped and says so. Every JAX stage writes a stack dump of all its threads
# to its stderr every 30 s (faulthandler), so a stall shows where it sits.
# Knobs (environment): PYTHON (default python3), ATTENTION (the like_peft stages' attention_impl,
# default auto), TOTAL_S (default 540), GPU_CHECK_STAGES (comma-separated stage names to run;
# default all), TORCH_TIMEOUT_S (each gpt2 PyTorch child, default 80), TORCH_TIMEOUT_XL_S (default
# 190: gpt2-xl's torch.compile took 178 s on an H200, DESIGN.md), GPU_CHECK_KILL_AFTER
# (bench/records.py: a stage kills itself after N records, to test that nothing is lost).
set -uo pipefail
SMOKE="${GPU_CHECK_CPU_SMOKE:-0}"
if [ "${1:-}" = "--cpu_smoke" ]; then SMOKE=1; shift; fi
OUT_DIR="${1:-benchmarks/results/gpu_check}"
PYTHON="${PYTHON:-python3}"
ATTENTION="${ATTENTION:-auto}"
TOTAL_S="${TOTAL_S:-540}"
CAP_SCALE=1  # smoke mode: a shared CPU runs even tiny shapes slower than the GPU runs real ones
RESERVE_S=15  # the last summary and archive, and `timeout --kill-after=10` slack
TORCH_TIMEOUT_S="${TORCH_TIMEOUT_S:-80}"
TORCH_TIMEOUT_XL_S="${TORCH_TIMEOUT_XL_S:-190}"
START=$(date +%s)
RUN_ID="$(date -u +%Y%m%dT%H%M%SZ)-$$"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"  # absolute, before the cd below
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_${RUN_ID}_XXXX")"  # archived into OUT_DIR/logs.tar.gz
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
rm -f "$OUT_DIR/summary.md" "$OUT_DIR/summary.json" "$OUT_DIR/logs.tar.gz" "$OUT_DIR/console.log"
exec > >(tee -a "$OUT_DIR/console.log") 2>&1

if [ "$SMOKE" = 1 ]; then
  export JAX_PLATFORMS=cpu
  CAP_SCALE=4 TOTAL_S="${GPU_CHECK_SMOKE_TOTAL_S:-2400}"
  SHAPE=(--n_layer=1 --n_embd=32 --n_head=2 --vocab_size=256)
  PREFLIGHT=("${SHAPE[@]}" --seq_len=32 --max_segments=8 --prompt_len=8 --new_tokens=2 --dtype=float32)
  XLA_ATTN=(--seq_len=32 --heads=2 --head_dim=16 --repeats=1)
  CHECK=(--batch_size=2 --seq_len=32 --heads=2 --head_dim=16 --max_segments=8 --repeats=1)
  BENCH=("${SHAPE[@]}" --seq_len=32 --max_segments=8 --warmup_steps=0 --timed_steps=1 --matmul_n=64)
  B16=(--batch_size=2) XL8=(--batch_size=2)
  DECODE=(--decode_batch_sizes=1,2 --decode_prompt_len=4 --decode_new_tokens=2 --decode_repeats=1)
  TORCH=(--no_compile --score_pairs=2 --score_words=8)
else
  SHAPE=() PREFLIGHT=() XLA_ATTN=() CHECK=()
  BENCH=(--seq_len=1024 --matmul_n=8192)
  B16=(--batch_size=16) XL8=(--batch_size=8 --timed_steps=5)
  DECODE=(--decode_batch_sizes=1,64 --decode_new_tokens=128 --decode_repeats=2)
  TORCH=()
fi
BENCH+=(--segments=hh --out_dir="$WORK" --run_id="$RUN_ID" --tag=gpu_check --stall_dump_s=30)
JAX_TRAIN=(--side=jax --parts=train)

PLANNED="preflight,xla_attention,xla_attention_autotune0,gpt2_b16_user,gpt2_b16_like_peft,gpt2_decode,attention_check"
PLANNED+=",gpt2_b16_torch,gpt2-xl_b8_user,gpt2-xl_b8_like_peft,gpt2-xl_b8_torch"
PLANNED+=",flag_autotune0,flag_no_command_buffer,flag_no_triton_gemm"
if [ -n "${GPU_CHECK_STAGES:-}" ]; then
  PLANNED="$(tr ',' '\n' <<< "$PLANNED" | grep -Fx -f <(tr ',' '\n' <<< "$GPU_CHECK_STAGES") | paste -sd, -)"
fi

finish() {  # the summary and the archive, as the run stands now
  timeout 60 "$PYTHON" -m gpt2_lora_jax.bench.summary --work "$WORK" --out "$OUT_DIR" --run_id "$RUN_ID" \
    --planned "$PLANNED" "$@" || echo "!! the summary failed (see above); the logs are in logs.tar.gz"
  tar -czf "$OUT_DIR/.logs.tar.gz.part" -C "$WORK" . && mv -f "$OUT_DIR/.logs.tar.gz.part" "$OUT_DIR/logs.tar.gz"
}
STAGE_PID="" STAGE_NAME="" STAGE_T0=0 STAGE_LIMIT=0
on_signal() {
  echo "!! gpu_check.sh stopped by a signal: ending the running stage, writing the summary"
  if [ -n "$STAGE_PID" ]; then
    kill -TERM "$STAGE_PID" 2> /dev/null
    printf '%s\tsignal\t%s\t%s\n' "$STAGE_NAME" "$(( $(date +%s) - STAGE_T0 ))" "$STAGE_LIMIT" >> "$WORK/stages.tsv"
  fi
  finish --quiet
  exit 143
}
trap on_signal TERM INT HUP

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$WORK/nvidia-smi.csv" 2>&1 || true
if [ "$SMOKE" != 1 ]; then  # (the smoke run skips these imports' seconds; its stages report their versions)
  timeout 120 "$PYTHON" -c "import jax, torch, transformers, peft, flax, optax; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)" \
    > "$WORK/versions.txt" 2>&1
  cat "$WORK/versions.txt"
fi
echo "run $RUN_ID: stages $PLANNED; working folder $WORK"

status=0
stage() {  # name, cap s, minimum s, command...
  local name="$1" cap=$(( $2 * CAP_SCALE )) min="$3"; shift 3
  if [[ ",$PLANNED," != *",$name,"* ]]; then return; fi
  local left=$(( START + TOTAL_S - RESERVE_S - $(date +%s) ))
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt "$min" ]; then
    echo "== $name skipped: ${left}s left, it needs ${min}s"
    printf '%s\tskip\t0\t%s\n' "$name" "$limit" >> "$WORK/stages.tsv"
    status=1
    return
  fi
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
  local t0; t0=$(date +%s)
  GPU_CHECK_STAGE="$name" GPU_CHECK_RECORDS="$WORK/$name.jsonl" \
    timeout --kill-after=10 "$limit" "$@" > >(tee "$WORK/$name.out") 2> "$WORK/$name.err" &
  STAGE_PID=$! STAGE_NAME="$name" STAGE_T0="$t0" STAGE_LIMIT="$limit"
  wait "$STAGE_PID"
  local rc=$?
  STAGE_PID=""
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" >> "$WORK/stages.tsv"
  if [ $rc -ne 0 ]; then echo "!! $name exited $rc; tail of its stderr:"; tail -20 "$WORK/$name.err"; status=1; fi
  finish --quiet
}

P="$PYTHON"
stage preflight 90 30 "$P" -m gpt2_lora_jax.bench.preflight --case_timeout_s=$(( 30 * CAP_SCALE )) "${PREFLIGHT[@]}"
stage xla_attention 45 15 "$P" -m gpt2_lora_jax.bench.xla_attention --case_timeout_s=$(( 20 * CAP_SCALE )) "${XLA_ATTN[@]}"
stage xla_attention_autotune0 45 15 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" \
  "$P" -m gpt2_lora_jax.bench.xla_attention --case_timeout_s=$(( 20 * CAP_SCALE )) "${XLA_ATTN[@]}"
stage gpt2_b16_user 60 30 "$P" -m gpt2_lora_jax.bench --preset=gpt2 --setting=user "${JAX_TRAIN[@]}" "${BENCH[@]}" "${B16[@]}"
stage gpt2_b16_like_peft 60 30 "$P" -m gpt2_lora_jax.bench --preset=gpt2 --setting=like_peft --attention="$ATTENTION" \
  "${JAX_TRAIN[@]}" "${BENCH[@]}" "${B16[@]}"
stage gpt2_decode 50 20 "$P" -m gpt2_lora_jax.bench --preset=gpt2 --setting=user --side=jax --parts=decode \
  "${BENCH[@]}" "${B16[@]}" "${DECODE[@]}"
stage attention_check 60 20 "$P" -m gpt2_lora_jax.bench.attention_check --out_dir="$WORK" --run_id="$RUN_ID" \
  --stall_dump_s=30 "${CHECK[@]}"
stage gpt2_b16_torch 200 40 "$P" -m gpt2_lora_jax.bench --preset=gpt2 --setting=like_peft --side=torch \
  --parts=train,decode,score --torch_timeout_s="$TORCH_TIMEOUT_S" "${BENCH[@]}" "${B16[@]}" "${DECODE[@]}" "${TORCH[@]}"
stage gpt2-xl_b8_user 90 45 "$P" -m gpt2_lora_jax.bench --preset=gpt2-xl --setting=user "${JAX_TRAIN[@]}" "${BENCH[@]}" "${XL8[@]}"
stage gpt2-xl_b8_like_peft 90 45 "$P" -m gpt2_lora_jax.bench --preset=gpt2-xl --setting=like_peft --attention="$ATTENTION" \
  "${JAX_TRAIN[@]}" "${BENCH[@]}" "${XL8[@]}"
stage gpt2-xl_b8_torch 250 60 "$P" -m gpt2_lora_jax.bench --preset=gpt2-xl --setting=like_peft --side=torch \
  --parts=train --torch_timeout_s="$TORCH_TIMEOUT_XL_S" "${BENCH[@]}" "${XL8[@]}" "${TORCH[@]}"
# One XLA flag each (names accepted by jaxlib 0.10.2's flag parser, which rejects unknown ones).
for flag in autotune0:--xla_gpu_autotune_level=0 no_command_buffer:--xla_gpu_enable_command_buffer= \
            no_triton_gemm:--xla_gpu_enable_triton_gemm=false; do
  stage "flag_${flag%%:*}" 50 30 env XLA_FLAGS="${XLA_FLAGS:-} ${flag#*:}" \
    "$P" -m gpt2_lora_jax.bench --preset=gpt2 --setting=user "${JAX_TRAIN[@]}" "${BENCH[@]}" "${B16[@]}"
done

finish
echo "== done in $(( $(date +%s) - START ))s ($(date -u +%H:%M:%S)); run $RUN_ID; files in $OUT_DIR"
[ -s "$OUT_DIR/logs.tar.gz" ] && rm -rf "$WORK"  # else the logs stay there: the script said where
exit $status

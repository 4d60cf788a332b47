#!/usr/bin/env bash
# The GPU benchmark of issue 7 in one go (about 10 minutes on one H100/H200; installs nothing).
#
#   bash benchmarks/gpu_check.sh OUT_DIR          # e.g. benchmarks/results
#
# Runs, each as its own `python -m gpt2_lora_jax.bench` process (so peak memory is per config):
#   1. gpt2    batch 16 x 1024, LoRA r8 on c_attn,c_proj,c_fc vs PEFT eager + torch.compile,
#              the 8192^3 bf16 matmul peak, the decode comparison at batch 1 and 64 (128 new
#              tokens) vs transformers generate, and the reward scorer's sequences/s;
#   2. gpt2-xl batch 8 x 1024, the same LoRA, vs PEFT eager + torch.compile (train only).
# Every PyTorch part is a child process that exits before JAX touches the GPU (see bench.py).
# Results: OUT_DIR/bench_<gpu>_<model>_<time>.{json,md}; logs: OUT_DIR/logs/.
# Knobs (environment): PYTHON (default python), ATTENTION (xla | cudnn, default xla),
# TORCH_TIMEOUT_S (per PyTorch child, default 230: gpt2-xl's torch.compile took 178 s on an H200),
# SKIP_XL=1 to run only step 1, EXTRA_FLAGS appended to every bench command (they win), e.g. a
# CPU smoke test: EXTRA_FLAGS='--n_layer=2 --n_embd=64 --n_head=4 --batch_size=2 --seq_len=32
# --matmul_n=256 --decode_new_tokens=8 --no_compile' bash benchmarks/gpu_check.sh /tmp/smoke
# The two steps are capped at 220 s and 360 s, so the whole script ends within 10 minutes.
set -uo pipefail
OUT_DIR="${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}"
PYTHON="${PYTHON:-python}"
ATTENTION="${ATTENTION:-xla}"
TORCH_TIMEOUT_S="${TORCH_TIMEOUT_S:-230}"
read -r -a EXTRA <<< "${EXTRA_FLAGS:-}"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"  # absolute, before the cd below
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT_DIR/logs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT_DIR/logs/nvidia-smi.csv" 2>&1 || true
"$PYTHON" -c "import jax, torch, transformers, peft, flax, optax; print('jax', jax.__version__, jax.devices(), '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)" \
  > "$OUT_DIR/logs/versions.txt" 2>&1
cat "$OUT_DIR/logs/versions.txt"

COMMON=(--seq_len=1024 --lora_rank=8 "--lora_targets=c_attn,c_proj,c_fc" --attention="$ATTENTION"
        --compare=peft --torch_timeout_s="$TORCH_TIMEOUT_S" --matmul_n=8192 --out_dir="$OUT_DIR")
status=0
run() {  # name, limit in seconds, bench flags...
  local name="$1" limit="$2"; shift 2
  echo "== $name ($(date -u +%H:%M:%S), limit ${limit}s)"
  timeout "$limit" "$PYTHON" -m gpt2_lora_jax.bench "$@" > "$OUT_DIR/logs/$name.out" 2> "$OUT_DIR/logs/$name.err"
  local rc=$?
  cat "$OUT_DIR/logs/$name.out"
  if [ $rc -ne 0 ]; then echo "!! $name exited $rc; tail of its stderr:"; tail -20 "$OUT_DIR/logs/$name.err"; status=1; fi
}

run gpt2_b16 220 --preset=gpt2 --batch_size=16 "${COMMON[@]}" --parts=train,decode,score \
  --decode_batch_sizes=1,64 --decode_new_tokens=128 --tag=gpu_check "${EXTRA[@]}"
if [ "${SKIP_XL:-0}" != 1 ]; then
  run gpt2-xl_b8 360 --preset=gpt2-xl --batch_size=8 "${COMMON[@]}" --parts=train --tag=gpu_check "${EXTRA[@]}"
fi
echo "== done ($(date -u +%H:%M:%S)); results:"; ls -1 "$OUT_DIR"/bench_*
exit $status

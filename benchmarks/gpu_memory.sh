#!/usr/bin/env bash
# The StreamingDialogue memory checks that need the GPU machine, as one prepared run per precision.
#
#   bash benchmarks/gpu_memory.sh bf16|nf4 [MODEL]
#
# On the device machine, after ../shared/tools/gpu-model-parts' calls (the model folder is MODEL,
# /root/models/smollm2-135m-instruct by default; nf4 needs the bitsandbytes call), back to back:
#   call 1: carry [".gpu1"]: bash .gpu1/receive
#   call 2: carry [".gpu2"]: bash .gpu2/receive && PYTHONPATH=/tmp/site bash benchmarks/gpu_memory.sh bf16
#   call 3: carry [".gpu3"]: bash .gpu3/receive && PYTHONPATH=/tmp/site bash benchmarks/gpu_memory.sh nf4
# Each step is
# timed out on its own, so one slow step still lets the others report, and writes its log
# under $OUT (or logs/gpu when OUT is unset, for a dry run here: DEVICE=cpu MODEL=embedded);
# adapters go to $ADAPTERS (/tmp/gpu-adapters), since only 8 files come back from $OUT.
#   bf16: KV bytes, per-turn latency and perplexity at turns 10/100/1000 with recall at d=1..1000;
#         decode speed; then train-memory's recall recipe (--data recall-near, then recall-far from
#         it; recall_transfer.py runs the same dialogues through the same trainer without the CLI's
#         storage dependencies, which that machine lacks), timed, and the trained sinks' recall on
#         the probe's ten fact types, none of them trained on.
#   nf4:  the KV, latency and perplexity measurements in 4-bit NF4 (recall at d=1 and 10 only), and
#         decode speed.
# At most 9.5 minutes for bf16 and 4.5 for nf4 (the step limits; never tried on that machine).
# SMOKE=1 shrinks every size to a few seconds' work, for tests/benchmarks/test_gpu_memory.py.
set -uo pipefail
precision=${1:?usage: gpu_memory.sh bf16|nf4 [MODEL]}
model=${2:-${MODEL:-/root/models/smollm2-135m-instruct}}
device=${DEVICE:-cuda}
out=${OUT:-logs/gpu}
adapters=${ADAPTERS:-/tmp/gpu-adapters}
mkdir -p "$out" "$adapters"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
case $precision in
  bf16) quantize=none distances=1,10,100,1000 trials=3 ;;
  nf4) quantize=4bit distances=1,10 trials=2 ;;
  *) echo "precision is bf16 or nf4; got $precision" >&2; exit 2 ;;
esac
turns=10,100,1000 repeats=5 held_back=8 tokens=256 runs=3 train=() probe=(--distances 1,10,30,100 --trials 8)
if [ "${SMOKE:-0}" = 1 ]; then
  distances=1 trials=1 turns=2,3 repeats=1 held_back=1 tokens=4 runs=1 train=(--dialogues 8 --steps 1)
  probe=(--distances 1 --trials 1)
fi

failed=0
step() {  # step NAME SECONDS COMMAND...: run it under a timeout, its output to the screen and $out/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | grep -v "^INFO\|Loading weights"
  local code=${PIPESTATUS[0]}
  echo "== $name: exit $code after $((SECONDS - start)) s"
  [ "$code" = 0 ] || failed=$((failed + 1))
}

"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
step "memory-$precision" 200 "$py" benchmarks/memory_recall.py --model "$model" --device "$device" \
  --quantize "$quantize" --positions distance --distances "$distances" --trials "$trials" --turns "$turns" \
  --held-back "$held_back" --repeats "$repeats" --json "$out/memory-$precision.json"
step "speed-$precision" 60 "$py" benchmarks/generation_speed.py --model "$model" --device "$device" \
  --quantize "$quantize" --tokens "$tokens" --runs "$runs"
if [ "$precision" = bf16 ]; then
  # train-memory --data recall-near, then recall-far from it: the same dialogues, through the same trainer.
  step train-near 120 "$py" benchmarks/recall_transfer.py --model "$model" --device "$device" --train-types none \
    --more-types --loss-on replies --out "$adapters/recall-near" --no-recall --reply-dialogues 0 "${train[@]}"
  step train-far-and-recall 200 "$py" benchmarks/recall_transfer.py --model "$model" --device "$device" \
    --train-types none --more-types --loss-on replies --fillers 24,32 --facts 4 --max-gap 32 \
    --start-from "$adapters/recall-near" --out "$adapters/recall-far" --halves held-out --reply-dialogues 0 \
    "${train[@]}" "${probe[@]}"
fi
exit $((failed > 0))

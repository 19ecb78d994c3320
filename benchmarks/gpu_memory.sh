#!/usr/bin/env bash
# The StreamingDialogue memory checks that need the GPU machine, as prepared steps.
#
#   BUDGET=SECONDS bash benchmarks/gpu_memory.sh STEP... [-- MODEL]
#
# Steps, in the order given:
#   long-bf16, long-nf4     KV bytes, perplexity and the time of one turn at turns 10/100/1000, dense vs
#                           streaming-llm vs StreamingDialogue (memory_recall.py --parts long)
#   speed-bf16, speed-nf4   the engine's decode speed, CUDA graph steps and step by step, beside plain HF
#                           generate (generation_speed.py)
#   decode-bf16, decode-nf4 one decode step on a memory of 53 / 1,033 / 4,033 entries, eager and replayed
#                           from a CUDA graph (decode_step.py)
#   train                   train-memory's recall recipe, timed: --data recall-near, then recall-far from it
#                           (recall_transfer.py runs the same dialogues through the same trainer without the
#                           CLI's storage dependencies, which that machine lacks); adapters to $ADAPTERS
#   recall-bf16             recall at d = 1 / 10 / 100 / 1,000 utterances: dense, streaming-llm, untrained
#                           sinks, and the trained sinks at the app's cap when train ran on this machine
#                           (memory_recall.py --parts recall --app-only); as many trials as its time allows
# Each step runs under its own time limit, cut to what is left of BUDGET (default 600 s) for the whole
# run; a step left under 20 s is skipped. So a slow step still lets the others report, and the run
# ends inside the device call. Logs and figures go under $OUT (logs/gpu when OUT is unset, for a dry
# run here: DEVICE=cpu ... -- embedded). MODEL is /root/models/smollm2-135m-instruct by default.
#
# On the device machine, after ../shared/tools/gpu-model-parts here, three calls back to back:
#   call 1: carry [".gpu1"]: bash .gpu1/receive
#   call 2: carry [".gpu2"]: bash .gpu2/receive && PYTHONPATH=/tmp/site BUDGET=330 bash benchmarks/gpu_memory.sh
#           long-bf16 speed-bf16 decode-bf16 train
#   call 3: carry [".gpu3"]: bash .gpu3/receive && PYTHONPATH=/tmp/site BUDGET=260 bash benchmarks/gpu_memory.sh
#           long-nf4 speed-nf4 decode-nf4 recall-bf16
# SMOKE=1 shrinks every size to a few seconds' work, for tests/benchmarks/test_gpu_memory.py.
set -uo pipefail
steps=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do steps+=("$1"); shift; done
[ "${1:-}" = -- ] && shift
model=${1:-${MODEL:-/root/models/smollm2-135m-instruct}}
[ ${#steps[@]} -gt 0 ] || { echo "usage: gpu_memory.sh STEP... [-- MODEL]" >&2; exit 2; }
known=" long-bf16 long-nf4 speed-bf16 speed-nf4 decode-bf16 decode-nf4 train recall-bf16 "
for s in "${steps[@]}"; do
  [[ $known == *" $s "* ]] || { echo "unknown step $s; steps are:$known" >&2; exit 2; }
done
device=${DEVICE:-cuda}
out=${OUT:-logs/gpu}
adapters=${ADAPTERS:-/tmp/gpu-adapters}
budget=${BUDGET:-600}
mkdir -p "$out" "$adapters"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}. HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

turns=10,100,1000 repeats=5 held_back=8 tokens=128 runs=3 entries=53,1033,4033 dsteps=32 drepeats=3
distances=1,10,100,1000 trials=8 train=()
if [ "${SMOKE:-0}" = 1 ]; then
  turns=2,3 repeats=1 held_back=1 tokens=4 runs=1 entries=5 dsteps=1 drepeats=1 distances=1 trials=2
  train=(--dialogues 8 --steps 1)
fi

failed=0
step() {  # step NAME SECONDS COMMAND...: run it under a timeout, its output to the screen and $out/NAME.log
  local name=$1 limit=$2 left=$((budget - SECONDS)); shift 2
  [ "$limit" -le "$left" ] || limit=$left
  if [ "$limit" -lt 20 ]; then echo "== $name: skipped, ${left}s of the budget left"; return; fi
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | grep -v "^INFO\|Loading weights"
  local code=${PIPESTATUS[0]}
  echo "== $name: exit $code after $((SECONDS - start)) s"
  [ "$code" = 0 ] || failed=$((failed + 1))
}
quantize() { [ "${1##*-}" = nf4 ] && echo 4bit || echo none; }

"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
for s in "${steps[@]}"; do
  q=$(quantize "$s")
  case $s in
    long-*) step "$s" 150 "$py" benchmarks/memory_recall.py --model "$model" --device "$device" --quantize "$q" \
              --parts long --positions distance --turns "$turns" --held-back "$held_back" --repeats "$repeats" \
              --json "$out/$s.json" ;;
    speed-*) step "$s" 60 "$py" benchmarks/generation_speed.py --model "$model" --device "$device" --quantize "$q" \
               --tokens "$tokens" --runs "$runs" ;;
    decode-*) step "$s" 45 "$py" benchmarks/decode_step.py --model "$model" --device "$device" --quantize "$q" \
                --entries "$entries" --steps "$dsteps" --repeats "$drepeats" ;;
    train)
      step train-near 120 "$py" benchmarks/recall_transfer.py --model "$model" --device "$device" \
        --train-types none --more-types --loss-on replies --out "$adapters/recall-near" --no-recall \
        --reply-dialogues 0 "${train[@]}"
      step train-far 120 "$py" benchmarks/recall_transfer.py --model "$model" --device "$device" \
        --train-types none --more-types --loss-on replies --fillers 24,32 --facts 4 --max-gap 32 \
        --start-from "$adapters/recall-near" --out "$adapters/recall-far" --no-recall --reply-dialogues 0 \
        "${train[@]}" ;;
    recall-bf16)
      trained=()
      [ -f "$adapters/recall-far/adapter_config.json" ] && trained=(--adapter "$adapters/recall-far" --app-only)
      limit=$((budget - SECONDS))
      [ "$limit" -le 300 ] || limit=300
      step "$s" "$limit" "$py" benchmarks/memory_recall.py --model "$model" --device "$device" --quantize none \
        --parts recall --positions distance --distances "$distances" --trials "$trials" \
        --recall-seconds $((limit * 2 / 3)) "${trained[@]}" --json "$out/$s.json" ;;
  esac
done
exit $((failed > 0))

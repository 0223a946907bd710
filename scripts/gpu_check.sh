#!/usr/bin/env bash
# The GPU check: raysdpb's CUDA and bf16 paths on one GPU, in about 5 minutes, with no Ray (every step runs
# in local mode or as a benchmark script):
#
#   bash scripts/gpu_check.sh [OUT_DIR] [DECODER_MODEL]
#
#   1. environment: the GPU, bf16 support, torch/transformers/peft versions;
#   2. encoder trials: `python -m raysdpb.train`, MiniLM-L6 (`minilm-l6`) on GLUE RTE, dynsdpb (here) and
#      finetune (last) with the configurations and seed 0 of benchmarks/RESULTS.md's RTE table (3 epochs, batch
#      8 x 256, bf16 autocast): the accuracies to set beside the CPU's fp32 ones (seed 0: dynsdpb 57.4,
#      finetune 54.5);
#   3. decoder trial: `python -m raysdpb.train sweeps/nlg-quickstart.yaml` (LoRA, dynsdpb with vocabulary-map
#      soft targets, weights in bf16) on DECODER_MODEL (default smollm2-135m);
#   4. benchmarks/overhead.py --device cuda: step time and peak memory of every method against finetune,
#      tokens/s and MFU;
#   5. benchmarks/vs_hf_trainer.py --device cuda: our finetune against the HF Trainer, bf16 on both sides;
#   6. benchmarks/loss_cost.py --device cuda: the loss functions alone.
#
# Each step has its own time limit and log (OUT_DIR/<step>.log); JSON figures go to OUT_DIR/*.json. The data
# comes from $RAYSDPB_DATA_DIR (default ../shared/data). The exit status is the number of failed steps.
# GPU_CHECK_SMOKE=1 runs the same steps on the CPU with a few samples and steps: a rehearsal of the script
# itself (minutes on 2 cores), not a check of anything CUDA; its time limits are 4x the GPU's, or
# GPU_CHECK_TIME_SCALE times (tests/test_gpu_check.py raises it: a CPU shared with other work is slower).
set -u
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
DECODER=${2:-smollm2-135m}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export RAYSDPB_DATA_DIR=${RAYSDPB_DATA_DIR:-$(cd .. && pwd)/shared/data}
PY=${PYTHON:-python3}
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    DEVICE=cpu SMALL="max_train_samples=48 max_eval_samples=32 epochs=1" DEC_SMALL="max_eval_samples=4 max_new_tokens=8"
    SCALE=${GPU_CHECK_TIME_SCALE:-4}
    BENCH_SMALL=(--budget-s 60 --max-steps 2 --min-steps 1 --warmup 0) HF_SMALL=(--max-train-samples 160) LOSS_SMALL=(--repeats 2)
else
    DEVICE=cuda SMALL="" DEC_SMALL="" SCALE=1 BENCH_SMALL=(--budget-s 100) HF_SMALL=() LOSS_SMALL=()
fi
RUNS=${TMPDIR:-/tmp}/raysdpb-gpu-check
rm -rf "$RUNS"
failed=0

step() {  # step NAME LIMIT_S COMMAND...: run, log, report the exit status and wall time, show the log's end
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name: $*"
    timeout "$((limit * SCALE))" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    grep -v -E "Warning|warn\(|^\s*$" "$OUT/$name.log" | tail -n "${TAIL:-15}"
    [ "$rc" = 0 ] || failed=$((failed + 1))
}

step environment 60 env DEVICE=$DEVICE "$PY" -c '
import os, torch, transformers, peft
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, "peft", peft.__version__)
from raysdpb.recipe.components import autocast_factory
if os.environ["DEVICE"] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device"
    print(torch.cuda.get_device_name(0), "bf16:", torch.cuda.is_bf16_supported(),
          "memory GiB: %.0f" % (torch.cuda.get_device_properties(0).total_memory / 2**30))
    autocast, scaler = autocast_factory("auto", torch.device("cuda"))
    with autocast():
        y = torch.nn.Linear(8, 8).cuda()(torch.randn(2, 8, device="cuda"))
    print("precision auto on cuda: autocast to", y.dtype, "grad scaler:", scaler)
    assert y.dtype == torch.bfloat16 and not scaler
else:
    print("precision auto on cpu:", autocast_factory("auto", torch.device("cpu")))
'

# RTE as in benchmarks/RESULTS.md (quality.py's SuperGLUE-style settings it ran with: batch 8, 256 tokens)
RTE="task=glue/rte device=$DEVICE epochs=3 batch_size=8 eval_batch_size=64 max_length=256 warmup_ratio=0.1 weight_decay=0.01 seed=0 $SMALL"
step encoder_dynsdpb 120 "$PY" -m raysdpb.train sweeps/quickstart.yaml $RTE method=dynsdpb lr=5e-5 alpha=1 tau=1 \
    -q --output-dir "$RUNS/rte-dynsdpb" --keep-checkpoints 1
step decoder_dynsdpb 120 "$PY" -m raysdpb.train sweeps/nlg-quickstart.yaml model="$DECODER" device=$DEVICE method=dynsdpb $SMALL \
    'train_split=train[:256]' batch_size=4 max_eval_samples=32 eval_batch_size=32 $DEC_SMALL -q --output-dir "$RUNS/gsm8k-dynsdpb" \
    --keep-checkpoints 1
TAIL=40 step overhead 200 "$PY" benchmarks/overhead.py --device $DEVICE --decoder-model "$DECODER" "${BENCH_SMALL[@]}" \
    --json "$OUT/overhead-$DEVICE.json"
TAIL=25 step vs_hf_trainer 120 "$PY" benchmarks/vs_hf_trainer.py --device $DEVICE --task glue/rte --batch-size 32 \
    --epochs 1 "${HF_SMALL[@]}" --json "$OUT/vs_hf_trainer-$DEVICE.json"
step loss_cost 60 "$PY" benchmarks/loss_cost.py --device $DEVICE --decoder-model "$DECODER" "${LOSS_SMALL[@]}" --json "$OUT/loss_cost-$DEVICE.json"

step encoder_finetune 80 "$PY" -m raysdpb.train sweeps/quickstart.yaml $RTE method=finetune lr=1e-4 \
    -q --output-dir "$RUNS/rte-finetune" --keep-checkpoints 1

echo "== gpu check: $failed failed step(s); logs and JSON in $OUT"
exit "$failed"

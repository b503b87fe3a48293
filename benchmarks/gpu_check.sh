#!/usr/bin/env bash
# One-call GPU check: everything in revvit that needs a GPU, in one run of at most ~9 minutes on
# one H100/H200, written to one results folder.
#
#   bash benchmarks/gpu_check.sh                       # on the GPU machine
#   GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh     # the same steps, tiny, on a CPU (< 3 min)
#
# Steps, most valuable first; each has its own time limit so that one slow step cannot use up
# the others' time, and a failed or timed-out step is recorded and the next one still runs:
#   1. memory_speed   memory per image and images/s, ViT-S/B/L: plain (timm), Rev-ViT,
#                     checkpointed (timm), parallel backward, hybrid (stored_blocks = depth/2);
#                     fp32 and bf16                                   (benchmarks/memory_speed.py)
#   2. pytest_cuda    every CUDA-marked test: AMP, the two-stream parallel backward (race test),
#                     rebuilt inputs vs the forward's inputs per block, RNG replay, compile
#   3. largest_batch  ViT-B bf16: the largest batch that fits and images/s at it, plain vs
#                     Rev-ViT vs checkpointed
#   4. detector       Mask R-CNN memory per image at 1024x1024: Rev-ViT-B, the same with plain
#                     autograd, ViTDet ViT-B; fp32 and bf16          (benchmarks/detector_memory.py)
#   5. compile        torch.compile speed-up of the reversible model  (benchmarks/compile_speed.py)
#   6. fsdp_memory    per-process memory of (sharded) training, Rev-ViT-L and rev_vit_h, AdamW:
#                     parameters + gradients + optimizer state, max_memory_allocated, working
#                     memory at 8 and 24 blocks; the world of one GPU (N = 1)
#                                                                     (benchmarks/fsdp_memory.py)
# Every benchmark writes JSON (with machine.gpu naming the device), markdown and a plot;
# gpu_check.json / gpu_check.md list the steps, their status and time.
#
# Environment: RESULTS_DIR (default docs/results/gpu, or a temporary folder in smoke mode),
# PYTHON (default .venv/bin/python if present, else python).
set -u
cd "$(dirname "$0")/.."
SMOKE="${GPU_CHECK_SMOKE:-0}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
if [ "$SMOKE" = "1" ]; then
    OUT="${RESULTS_DIR:-$(mktemp -d)/gpu_check}"
    DEVICE=cpu
else
    OUT="${RESULTS_DIR:-docs/results/gpu}"
    DEVICE=cuda
    if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no CUDA device visible (for the CPU smoke run: GPU_CHECK_SMOKE=1)" >&2
        exit 2
    fi
fi
mkdir -p "$OUT"
STEPS="$OUT/steps.tsv"
: > "$STEPS"

# run NAME LIMIT_S COMMAND...: the command's output goes to $OUT/NAME.log
run() {
    local name="$1" limit="$2"
    shift 2
    local start end rc status
    start=$(date +%s)
    echo "gpu_check: $name (limit ${limit}s)"
    timeout --signal=TERM --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    rc=$?
    end=$(date +%s)
    case $rc in
        0) status=ok ;;
        124|137) status=timeout ;;
        *) status=failed ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" "$((end - start))" "$rc" >> "$STEPS"
    echo "gpu_check: $name $status after $((end - start))s"
}

if [ "$SMOKE" = "1" ]; then
    # tiny sizes: the same scripts and options, seconds each
    MS=(--sizes s --depths 2 --img-size 32 --batch 2 --memory-batches 2 4 --repeats 1)
    LB=(--sizes s --depths 2 --img-size 32 --batch 2 --memory-batches 2 4 --repeats 1)
    DET=(--img-size 128 --steps 1 --threads 1 --override model.backbone.net.depth=2
         --override model.backbone.net.embed_dim=64 --override model.backbone.net.num_heads=2
         --override model.roi_heads.batch_size_per_image=16 --variants revvit_b vit_b
         --parts detector)
    COMP=(--model rev_vit_test --img-size 64 --batch 2 --repeats 2 --backend aot_eager
          --threads 1)
    PYTEST=(-m cuda -q -p no:cacheprovider tests/test_cuda_engine.py tests/test_parallel_backward.py)
    FSDP=(--smoke --worlds 1 --depth-world 1 --depths 2 4 --depth-modes reversible)
    LIMITS=(120 60 60 90 90 120)
else
    MS=(--sizes s b l --repeats 5 --batch 64 --memory-batches 8 24)
    LB=(--sizes b --dtypes bfloat16 --sides plain rev ckpt --largest-batch --repeats 3)
    DET=(--img-size 1024 --variants revvit_b revvit_b_autograd vit_b --parts detector
         --dtypes float32 bfloat16 --jobs 2)
    COMP=(--model rev_vit_b --batch 32 --repeats 5 --dtype bfloat16 --plain)
    PYTEST=(-m cuda -q -p no:cacheprovider tests)
    FSDP=(--worlds 1 --depth-world 1 --depths 8 24 --depth-modes reversible)  # 4 processes
    LIMITS=(120 120 60 90 90 60)
fi

T0=$(date +%s)
run memory_speed "${LIMITS[0]}" "$PYTHON" benchmarks/memory_speed.py --device "$DEVICE" \
    --dtypes float32 bfloat16 --parallel --hybrid "${MS[@]}" --out "$OUT/memory_speed"
run pytest_cuda "${LIMITS[1]}" "$PYTHON" -m pytest "${PYTEST[@]}" \
    --junitxml "$OUT/pytest_cuda.xml"
if [ "$SMOKE" = "1" ]; then
    run largest_batch "${LIMITS[2]}" "$PYTHON" benchmarks/memory_speed.py --device "$DEVICE" \
        --dtypes float32 --sides plain rev ckpt "${LB[@]}" --out "$OUT/largest_batch"
else
    run largest_batch "${LIMITS[2]}" "$PYTHON" benchmarks/memory_speed.py --device "$DEVICE" \
        "${LB[@]}" --out "$OUT/largest_batch"
fi
run detector "${LIMITS[3]}" "$PYTHON" benchmarks/detector_memory.py --device "$DEVICE" \
    "${DET[@]}" --out "$OUT/detector_memory" --quiet
run compile "${LIMITS[4]}" "$PYTHON" benchmarks/compile_speed.py --device "$DEVICE" \
    "${COMP[@]}" --out "$OUT/compile_speed"
run fsdp_memory "${LIMITS[5]}" "$PYTHON" benchmarks/fsdp_memory.py --device "$DEVICE" \
    "${FSDP[@]}" --out "$OUT/fsdp_memory" --quiet

"$PYTHON" benchmarks/gpu_check_report.py "$OUT" "$SMOKE" "$(( $(date +%s) - T0 ))"

#!/usr/bin/env bash
# Every CUDA check in one run, for a machine with a GPU (CI has none): the CUDA tests, the speed tables, and the main
# job trained in fp16 and bf16 and scored with the offline metric, to compare with the CPU-trained model's figures in
# the README. Stages run in order of importance and each writes its log as it goes, so a run cut short still leaves
# the finished ones: five logs and the two main jobs' sample grids in LOG_DIR, the trained pipelines in WORK_DIR.
#
#     bash benchmarks/cuda_checks.sh [LOG_DIR] [WORK_DIR]
#
# Run it where facediff is installed with its dependencies (python3, accelerate and facediff on PATH). It took 8.5
# minutes on an H100 (2026-11-26), including installing the wheels the image lacked beforehand: leave a device lease
# room for that and a rerun. It exits 1 at once without a CUDA GPU, and 1 at the end if any stage failed.
set -uo pipefail
logs=${1:-cuda-checks}
work=${2:-$logs}
mkdir -p "$logs" "$work"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "cuda_checks.sh needs a CUDA GPU, and torch sees none here." >&2
    exit 1
fi
failed=()
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$logs/tests.log"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee -a "$logs/tests.log" || failed+=(tests)
(cd benchmarks && PYTHONWARNINGS=ignore python3 cuda_speed.py) 2>&1 | tee "$logs/speed.log" || failed+=(speed)

digits=$(python3 -c "from facediff.digits import digits_image_folder; print(digits_image_folder())")
for precision in fp16 bf16; do
    log="$logs/main-job-$precision.log"
    # Progress bars redraw with carriage returns: one line each in the log, the last few on screen.
    accelerate launch --num_processes 1 --num_machines 1 --dynamo_backend no --mixed_precision "$precision" \
        train_accelerate.py --mixed_precision "$precision" --output_dir "$work/main-job-$precision" 2>&1 \
        | tr '\r' '\n' >"$log" || failed+=("main-job-$precision")
    facediff eval "$work/main-job-$precision" --reference "$digits" --num-images 128 --batch-size 64 \
        --no-inception --steps 1000 100 2>&1 | tr '\r' '\n' >>"$log" || failed+=("eval-$precision")
    grep -v "it/s\]$\|s/it\]$" "$log" | tail -n 25
    cp "$work/main-job-$precision/sample_grid.png" "$logs/sample-grid-$precision.png"
done

(cd benchmarks && PYTHONWARNINGS=ignore python3 cuda_speed.py --dtypes float16 --compile-dtypes float16) 2>&1 \
    | tee "$logs/speed-compile.log" || failed+=(speed-compile)

if ((${#failed[@]})); then
    echo "cuda_checks.sh: failed stages: ${failed[*]} (logs in $logs)" >&2
    exit 1
fi

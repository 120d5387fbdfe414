#!/usr/bin/env bash
# One device session's checks, in one call: the GPU benchmark, then the GPU tests.
#
#   bash bench/gpu_check.sh OUT_DIR        # writes OUT_DIR/{gpu.txt,results_gpu.json,*.log}
#
# Never run on a GPU yet. Bounded at 540 s in all (timeouts 300 s + 220 s, the pool case in
# what is left: the 540 s device call BENCHMARKS.md suggests); the benchmark skips its
# optional parts past --budget-s.
# Runs with the machine's own python3 (torch, accelerate, typer, rich, matplotlib, pytest);
# ultralytics-thop and torch-pruning, missing there, are installed from wheels carried in .whl/
# (BENCHMARKS.md says how to fetch them). GPU_CHECK_ON_CPU=1 rehearses the whole script on a
# CPU machine (tiny benchmark, the GPU tests with --cpu) so that the one GPU call does not fail
# on a typo.
set -uo pipefail
out=${1:?usage: bash bench/gpu_check.sh OUT_DIR}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
bench_args=(--budget-s 240)
if [ "${GPU_CHECK_ON_CPU:-0}" = 1 ]; then
    bench_args=(--cpu --quick)
    export SLIMTUNE_GPU_TESTS_ON_CPU=1
fi
if ! python3 -c "import thop, torch_pruning" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        || { echo "thop/torch_pruning missing and no usable wheel in .whl/" >&2; exit 2; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c "import torch, accelerate; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'accelerate', accelerate.__version__)"
    nproc
} > "$out/gpu.txt" 2>&1
cat "$out/gpu.txt"
timeout 300 python3 bench/gpu_bench.py "$out/results_gpu.json" "${bench_args[@]}" 2>&1 \
    | tee "$out/gpu_bench.log"
bench_rc=${PIPESTATUS[0]}
timeout 220 python3 -m pytest -m gpu -q -p no:cacheprovider -o addopts="" --timeout 200 \
    tests/test_gpu.py tests/test_bench.py 2>&1 | tee "$out/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
# The pool (issue 23): the lab's two fine-tunes as 2 jobs x 1 GPU at once against each alone on
# one GPU (target: the pair <= 1.15x one alone); skipped with fewer than 2 GPUs. It gets what
# is left of 540 s; on the CPU rehearsal, the tiny CPU case (--jobs 2 vs one after the other).
pool_args=(--gpu --repeats 1)
[ "${GPU_CHECK_ON_CPU:-0}" = 1 ] && pool_args=(--quick)
left=$((540 - SECONDS))
if [ "$left" -gt 30 ]; then
    timeout "$left" python3 bench/pool_cpu.py "$out/results_pool.json" "${pool_args[@]}" 2>&1 \
        | tee "$out/pool_bench.log"
    pool_rc=${PIPESTATUS[0]}
else
    echo "pool case skipped: $left s left of 540" | tee "$out/pool_bench.log"
    pool_rc=0
fi
echo "gpu_bench exit $bench_rc, gpu tests exit $tests_rc, pool exit $pool_rc"
[ "$bench_rc" = 0 ] && [ "$tests_rc" = 0 ] && [ "$pool_rc" = 0 ]

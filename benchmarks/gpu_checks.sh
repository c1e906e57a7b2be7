#!/usr/bin/env bash
# Everything that needs a GPU, in one run (a lent GPU's time is short): the generated Triton
# kernels' tests on CUDA in float32 and bfloat16 (and torch.compile through their triton_op
# registration), the kernel benchmark against flash-linear-attention and SDPA, and the model
# benchmark with the memories in PyTorch, through the kernels, and replayed from a CUDA graph
# (the step without the Python that launches its thousands of kernels).
#
#     bash benchmarks/gpu_checks.sh [LOG_DIR [STEP...]]   # logs: LOG_DIR/{env,STEP}.log
#
# STEPs (all, in this order, when none is named): tests bench_triton models_graph models_triton
# bench_triton_deep bench_triton_launch diagnose diagnose_k64 models_chunked; a lease too short for
# all of them can take them in two calls. Seen on an H200 (Triton cache cold each time): tests
# 118-135 s (pytest-xdist, 8 workers; over 200 s for the 150 tests with the split gradient kernels),
# a diagnosis of 6 configurations 143 s, bench_triton about 200 s (before it timed fla's gated rule
# too, which autotunes on its first call), models_graph 88 s, bench_triton_deep 51 s; a machine's
# start took 30 s to a minute.
# Each step has a time limit, so a hang in one still leaves the others' numbers.
set -u
logs=${1:-gpu-checks}
shift $(($# > 0))
all="tests bench_triton models_graph models_triton bench_triton_deep bench_triton_launch diagnose diagnose_k64
     models_chunked"
wanted=" $(echo ${*:-$all}) "  # one space between names
mkdir -p "$logs"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
# this checkout's nldsl, installed or not (a lent machine starts bare)
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME SECONDS COMMAND...: runs COMMAND with a time limit, output to the log and the screen
    local name=$1 limit=$2
    shift 2
    [[ $name == env || $wanted == *" $name "* ]] || return 0
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" > "$logs/$name.log" 2>&1
    local rc=$?
    tail -n "${TAIL:-25}" "$logs/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - t0))s"
}

step env 60 "$py" -c "
import torch, triton
print(torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton', triton.__version__)
try:
    import fla; print('flash-linear-attention', fla.__version__)
except ImportError as e:
    print('no flash-linear-attention:', e)
"
# in order of what a short lease most needs answered: whether every kernel is right on this GPU
# (float32 and bfloat16, torch.compile through the triton_op registration), how far from fla's
# speed (--kernels: where each side's time goes, kernel by kernel), what Hope's step costs
# without its launches, then launch configurations to tune with and the compiler diagnosis
parallel=()
# on xdist workers a sticky CUDA error (an illegal memory access) ends only its worker, which xdist
# replaces (tests/device_faults.py); in one process it ends the run
"$py" -c "import xdist" 2>/dev/null && parallel=(-n 8)
# (not the compile-for-a-GPU test: CPU work, which the CI does; here every kernel compiles for this GPU anyway;
# -vv against pyproject's -q: a line per test, so that a step stopped at its limit says which ones ran)
TAIL=40 step tests "${TEST_LIMIT:-300}" "$py" -m pytest tests/kernels -p no:cacheprovider --tb=short -rfEs -vv \
    -k "not compiles_for_a_gpu" "${parallel[@]}"
# (--fla-unchecked: fla refuses its gated backward on Hopper with Triton 3.4 to 3.7.0; its time still compares)
step bench_triton "${BENCH_LIMIT:-300}" "$py" benchmarks/bench_triton.py --no-deep --kernels 8 --fla-unchecked
models() {  # models NAME ARGS...: the model benchmark on the GPU
    local name=$1
    shift
    TAIL=14 step "models_$name" "${MODELS_LIMIT:-150}" "$py" benchmarks/bench_models.py --device cuda \
        --clock wall --warmup 2 --reps 3 "$@"
}
models graph --cuda-graph --state fresh   # Hope's step is launch-bound: what it costs without the launches
models triton --impl triton
step bench_triton_deep "${DEEP_LIMIT:-120}" "$py" benchmarks/bench_triton.py --deep-only   # the MLP kernel's rows
# launch configurations to try against the shipped ones at 8k (the ones flash-linear-attention tunes over).
# Tried on an H200 at 32 state columns: 'chunk_grads:w4' and 'states:w2;state_grads:w2' slower; at 64,
# 'wy_grads:w8' slower; '*:s2' an illegal memory access, which ends the process and every row after it,
# so it is not in this list
step bench_triton_launch "${LAUNCH_LIMIT:-150}" "$py" benchmarks/bench_triton.py --no-deep --no-sdpa --T 8192 \
    --launch 'solve:w1' 'states:w8' 'state_grads:w8' '*:s4'
# which kernel this GPU's compiler gets wrong, if any, at the benchmark's tiles (K=V=128, chunks of
# 64; wrong at 4 warps for the output kernel once, right at 2, 4 and 8 since) and at heads of 64
step diagnose "${DIAGNOSE_LIMIT:-240}" "$py" benchmarks/diagnose_kernels.py --jobs 8 --timeout 200 \
    --configs default '*:w2' '*:w8'
step diagnose_k64 "${DIAGNOSE_LIMIT:-240}" "$py" benchmarks/diagnose_kernels.py --jobs 8 --timeout 200 --K 64 \
    --configs default '*:w2'
models chunked

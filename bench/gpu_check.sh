#!/usr/bin/env bash
# The GPU check: one prepared script for a lent H100/H200 that finishes within 9 minutes and writes everything it
# measures under OUT as it goes (a step cut short by its time box still leaves what it wrote).
#
#   bash bench/gpu_check.sh OUT            # on the GPU machine, from the checkout (no install needed)
#   bash bench/gpu_check.sh OUT --dry-run  # on a CPU: every step at toy size, to prove the script still works
#
# Steps, in priority order, each in its own time box (seconds):
#   1. env        the card, driver, torch / triton versions, git commit                         OUT/env.txt
#   2. gpu tests  `pytest -m gpu -x` (kernels natively in fp32 and bf16)                         OUT/gpu_tests.{log,xml}
#   3. e2e        presets small and base x kernels torch/triton x compile 0/1, plus MiniMind's
#                 own loop as the baseline per preset (bench/e2e.py --matrix). MiniMind-3 stays out of the
#                 time box (each preset multiplies every configuration); on a longer loan run
#                 `python bench/e2e.py --matrix --presets m3,m3-moe --out_dir OUT`             OUT/e2e-matrix_*.{json,md}
#   4. kernels    bench_kernels for rmsnorm, linear+CE, MoE, attention and QK-norm+RoPE        OUT/kernels_*.{json,md}
# OUT/summary.txt has one line per step: its exit status and seconds. The script exits 0 when every step ran to its
# end (a failing test or benchmark entry is in its log, not in the exit status), 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${1:?usage: bash bench/gpu_check.sh OUT [--dry-run]}"
DRY=0
[[ "${2:-}" == "--dry-run" ]] && DRY=1
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export PYTHONPATH="kernels:minimind:.${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
[[ -z "${BENCH_GIT_COMMIT:-}" ]] && BENCH_GIT_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
export BENCH_GIT_COMMIT
PY="${PYTHON:-python3}"

if [[ $DRY == 1 ]]; then
    export CUDA_VISIBLE_DEVICES="" BENCH_SCALE=tiny
    unset TRITON_INTERPRET
    T_TESTS=120 T_E2E=180 T_KERNELS=240
    TESTS=(-m gpu --collect-only -q tests/)
    E2E=(--matrix --presets tiny --kernels_list torch --compiles 0 --steps 2 --warmup_steps 1 --batch_size 2
         --accumulation_steps 1 --max_seq_len 32 --device cpu --dtype float32)
    KERNELS=(--bench-rounds 1 -k "(eager or math) and (rmsnorm or linear_cross_entropy or moe_experts or attention or qk_norm_rope)")
else
    T_TESTS=120 T_E2E=250 T_KERNELS=150
    TESTS=(-m gpu -x -q tests/ "--junitxml=$OUT/gpu_tests.xml")
    E2E=(--matrix --presets small,base --kernels_list torch,triton --compiles 0,1 --steps 10 --warmup_steps 2
         --budget_s $((T_E2E - 40)))
    KERNELS=(--bench-rounds 20 -k "rmsnorm or linear_cross_entropy or moe_experts or attention or qk_norm_rope")
fi

: > "$OUT/summary.txt"
ALL_OK=1
step() {  # step NAME SECONDS LOG CMD...: run CMD in a time box, log its output, record status and time
    local name=$1 secs=$2 log=$3
    shift 3
    local t0=$SECONDS
    echo "== $name (time box ${secs} s): $*" | tee -a "$OUT/summary.txt"
    timeout --signal=TERM --kill-after=10 "$secs" "$@" > "$log" 2>&1
    local rc=$?
    echo "   $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    tail -n 5 "$log"
    [[ $rc == 124 || $rc == 137 ]] && ALL_OK=0
    return 0
}

step env 30 "$OUT/env.txt" bash -c "nvidia-smi 2>&1 || echo 'no nvidia-smi'; echo commit $BENCH_GIT_COMMIT;
    $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda,
    \"device\", torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"cpu\")';
    $PY -c 'import triton; print(\"triton\", triton.__version__)' 2>&1"
step "gpu tests" "$T_TESTS" "$OUT/gpu_tests.log" "$PY" -m pytest -p no:cacheprovider "${TESTS[@]}"
step e2e "$T_E2E" "$OUT/e2e.log" "$PY" bench/e2e.py "${E2E[@]}" --out_dir "$OUT"
step kernels "$T_KERNELS" "$OUT/kernels.log" "$PY" -m pytest bench/ --benchmark-only -q -p no:cacheprovider \
    "--bench-record=$OUT" --benchmark-columns=median,rounds "${KERNELS[@]}"

echo "gpu_check: done in $SECONDS s; files in $OUT" | tee -a "$OUT/summary.txt"
[[ $ALL_OK == 1 ]]

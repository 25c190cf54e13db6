#!/usr/bin/env bash
# One command for a machine with a GPU and JAX already installed (the lent device machine has JAX, pytest
# and pytest-xdist, and no network): runs, from this working tree (PYTHONPATH=.), the GPU figures the
# issues ask for first, then the test suite, and prints a summary.
#
#   scripts/gpu_check.sh                          # everything (~10 minutes on a 16-core machine)
#   GPU_CHECK_TESTS=none scripts/gpu_check.sh     # the benchmarks only
#   GPU_CHECK_PLATFORM=cpu GPU_CHECK_QUICK=1 GPU_CHECK_TESTS=tests/smap/test_privacy.py \
#       scripts/gpu_check.sh                      # a dry run on a machine without a GPU (2 minutes)
#
# What the benchmarks import beyond JAX (optax, absl-py) comes from .gpu_deps/ when it exists, so
# that a machine without network can run them. Make it here and carry it (it is git-ignored):
#
#   python -m pip install --no-deps --target .gpu_deps optax absl-py
#
# On the lent machine (the device tool's run, carry=[".gpu_deps"]), keep the logs with the results:
#
#   GPU_CHECK_OUT=$OUT scripts/gpu_check.sh
#
# The steps, in order of what a short lease must not miss:
# 1. bench_dp.py on one GPU: DP-SGD per example against the non-private step (issue 21's GPU row);
# 2. bench_overhead.py --quick on the GPU: a cached call against jax.jit(jax.vmap);
# 3. the test suite (8 emulated CPU devices, tests/conftest.py, whatever the machine); without
#    scikit-learn the demo's tests are left out;
# 4. bench_sharding.py --quick (8 emulated CPU devices) and, with scikit-learn, bench_demo.py --quick.
# Each step is bounded by GPU_CHECK_STEP_TIMEOUT seconds (300). Logs are kept in $GPU_CHECK_OUT (a new
# temporary directory by default). Exit status: non-zero if a test or a benchmark failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
if [[ -d .gpu_deps ]]; then
    export PYTHONPATH=.:.gpu_deps
fi
python=${PYTHON:-python3}
platform=${GPU_CHECK_PLATFORM:-cuda}
tests=${GPU_CHECK_TESTS:-tests}
limit=${GPU_CHECK_STEP_TIMEOUT:-300}
dp_rounds=(--rounds 5 --calls 5)
[[ -n ${GPU_CHECK_QUICK:-} ]] && dp_rounds=(--quick)
out=${GPU_CHECK_OUT:-$(mktemp -d -t smap-gpu-check.XXXXXX)}
mkdir -p "$out"
failed=()

step() {  # step NAME COMMAND...: run, log to $out/NAME.log, remember a failure
    local name=$1
    shift
    echo "== $name: $*"
    if ! timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"; then
        failed+=("$name")
    fi
}

has() { "$python" -c "import $1" 2>/dev/null; }

step jax env JAX_PLATFORMS="$platform" "$python" -c '
import jax, jaxlib
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "backend", jax.default_backend())
print("devices", jax.devices())'
step bench_dp env JAX_PLATFORMS="$platform" "$python" scripts/bench_dp.py --devices 1 "${dp_rounds[@]}"
step bench_overhead env JAX_PLATFORMS="$platform" "$python" scripts/bench_overhead.py --quick
if [[ $tests != none ]]; then
    options=(-q -p no:cacheprovider)
    has xdist && options+=(-n auto)
    has sklearn || options+=(--deselect tests/scripts/test_demo.py)
    step tests "$python" -m pytest "${options[@]}" "$tests"
fi
step bench_sharding "$python" scripts/bench_sharding.py --quick
if has sklearn; then
    step bench_demo env JAX_PLATFORMS="$platform" "$python" scripts/bench_demo.py --quick
fi

echo
echo "================ summary ================"
cat "$out/jax.log"
echo "-- bench_dp (one device, $platform):"
grep -E '^[a-z]+ +1 dev|smap DP/|peak:|per-example gradient|targets|^  [a-z]+ [0-9] dev:' "$out/bench_dp.log" || true
echo "-- bench_overhead (smap / jax; cached call, then first call):"
grep -E '^workload|^[a-z].*( +[0-9.]+){6}|workloads meet' "$out/bench_overhead.log" || true
if [[ -f $out/tests.log ]]; then
    echo "tests ($tests): $(grep -E '[0-9]+ (passed|failed)' "$out/tests.log" | tail -1)"
fi
echo "-- bench_sharding (8 emulated CPU devices):"
grep -E '^batch [0-9]+: smap / hand-written' "$out/bench_sharding.log" || true
if [[ -f $out/bench_demo.log ]]; then
    echo "-- bench_demo (examples/s, vs vmap on 1 device):"
    grep -E '^\| [a-z]' "$out/bench_demo.log" || true
fi
echo "logs: $out"
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all passed"

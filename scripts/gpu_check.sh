#!/usr/bin/env bash
# One command for a machine with a GPU and JAX already installed (jax[cuda12] or jax[cuda13],
# with the test extra's packages: pytest, pytest-xdist, scikit-learn, optax): runs the test
# suite and the benchmarks from this working tree (PYTHONPATH=.), then prints a summary:
# the JAX version and devices, the tests' pass/fail counts, and the benchmarks' ratio lines.
#
#   scripts/gpu_check.sh                 # everything, quick benchmark settings (~10 minutes)
#   PYTHON=python3.12 scripts/gpu_check.sh
#   GPU_CHECK_TESTS=tests/sharding scripts/gpu_check.sh
#
# The test suite runs on 8 emulated CPU devices (tests/conftest.py), whatever the machine;
# bench_overhead.py runs on the default backend (the GPU); bench_sharding.py needs 8 devices
# and runs on 8 emulated CPU devices; bench_demo.py runs the demo on the GPU(s), and its
# multi-process rows on CPU processes. Logs are kept in $GPU_CHECK_OUT (a new temporary
# directory by default). Exit status: non-zero if the tests or a benchmark failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.
python=${PYTHON:-python3}
tests=${GPU_CHECK_TESTS:-tests}
out=${GPU_CHECK_OUT:-$(mktemp -d -t smap-gpu-check.XXXXXX)}
mkdir -p "$out"
failed=()

step() {  # step NAME COMMAND...: run, log to $out/NAME.log, remember a failure
    local name=$1
    shift
    echo "== $name: $*"
    if ! "$@" 2>&1 | tee "$out/$name.log"; then
        failed+=("$name")
    fi
}

step jax env -u JAX_PLATFORMS "$python" -c '
import jax, jaxlib
print("jax", jax.__version__, "jaxlib", jaxlib.__version__, "backend", jax.default_backend())
print("devices", jax.devices())'

workers=()
if "$python" -c 'import xdist' 2>/dev/null; then
    workers=(-n auto)
fi
step tests "$python" -m pytest -q -p no:cacheprovider "${workers[@]}" "$tests"
step bench_overhead env -u JAX_PLATFORMS "$python" scripts/bench_overhead.py --quick
step bench_sharding "$python" scripts/bench_sharding.py --quick
step bench_demo env -u JAX_PLATFORMS "$python" scripts/bench_demo.py --quick

echo
echo "================ summary ================"
cat "$out/jax.log"
echo "tests ($tests): $(grep -E '[0-9]+ (passed|failed)' "$out/tests.log" | tail -1)"
echo "-- bench_overhead (smap / jax; cached call, then first call):"
grep -E '^workload|^[a-z].*( +[0-9.]+){6}|workloads meet' "$out/bench_overhead.log" || true
echo "-- bench_sharding (8 emulated CPU devices):"
grep -E '^batch [0-9]+: smap / hand-written' "$out/bench_sharding.log" || true
echo "-- bench_demo (examples/s, vs vmap on 1 device):"
grep -E '^\| [a-z]' "$out/bench_demo.log" || true
echo "logs: $out"
if ((${#failed[@]})); then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all passed"

#!/usr/bin/env bash
# The GPU matrix on a machine that has CUDA, PyTorch, CuPy, JAX and pytest but
# no package index and no nox (docs/testing.rst, "GPU matrix").
#
#   bash tests/gpu_matrix.sh [OUTDIR]
#
# array-api-compat, if missing there, travels as a wheel in .whl/ (pip download
# on a machine with an index). Writes into OUTDIR (default $OUT, else
# /tmp/pbn_gpu): env.txt, check.txt, tests_<backend>.txt, and with PBN_GPU_BENCH=1
# bench.txt, bench.json and accuracy.txt. Each backend's suite runs in its own pytest, the
# three at once, with PBN_GPU_WORKERS xdist workers each (default 4).
set -u
out=${1:-${OUT:-/tmp/pbn_gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several processes share the GPU
python=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/pbn_site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/pbn_site:$PWD/src
else
    export PYTHONPATH=$PWD/src
fi
workers=${PBN_GPU_WORKERS:-4}
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$python" - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("numpy", "array_api_compat", "torch", "cupy", "jax", "jaxlib", "pytest", "hypothesis"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:  # noqa: BLE001
        print(name, "missing:", exc)
import torch
print("torch cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no device")
EOF
} >"$out/env.txt" 2>&1
"$python" -m portable_bn check --backend cupy --backend torch_gpu --backend jax_gpu >"$out/check.txt" 2>&1
echo "check rc=$?" >>"$out/check.txt"
for backend in cupy torch_gpu jax_gpu; do
    (
        start=$(date +%s)
        PBN_BACKENDS=$backend timeout "${PBN_GPU_TEST_TIMEOUT:-300}" "$python" -m pytest -q -p no:cacheprovider \
            -n "$workers" -p no:benchmark -rfE >"$out/tests_$backend.txt" 2>&1
        echo "pytest rc=$? in $(($(date +%s) - start)) s" >>"$out/tests_$backend.txt"
    ) &
done
wait
if [ "${PBN_GPU_BENCH:-0}" = 1 ]; then
    timeout "${PBN_GPU_BENCH_TIMEOUT:-240}" "$python" -m portable_bn bench --backend cupy --backend torch_gpu \
        --backend jax_gpu --json "$out/bench.json" >"$out/bench.txt" 2>&1
    echo "bench rc=$?" >>"$out/bench.txt"
    "$python" -m portable_bn accuracy >"$out/accuracy.txt" 2>&1
    echo "accuracy rc=$?" >>"$out/accuracy.txt"
fi
tail -n 3 "$out"/tests_*.txt "$out/check.txt"

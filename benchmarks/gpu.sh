#!/usr/bin/env bash
# What a GPU machine runs for the triton backend: the kernels' tests on CUDA tensors, then
# `addnorm bench --device cuda` (against torch eager, torch.compile, and Liger-Kernel and
# quack where installed).  Logs and the table go to ${OUT:-gpu-out}.
#   bash benchmarks/gpu.sh            # tests, then the bench
#   bash benchmarks/gpu.sh tests      # or one of the two
# On a machine without pip access, put wheels in .whl/ first; they are installed to /tmp/site.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
    # a --target install leaves .pth files unread (nvidia-cutlass-dsl, quack's compiler,
    # puts its `cutlass` package on the path by one): add their directories by hand
    for pth in /tmp/site/*.pth; do
        [ -e "$pth" ] || continue
        while read -r line; do
            case $line in import*|"") ;; *) PYTHONPATH=$PYTHONPATH:/tmp/site/$line ;; esac
        done <"$pth"
    done
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
status=0
if [ "${1:-all}" != bench ]; then
    ADDNORM_TEST_DEVICE=cuda $PY -m pytest -q -n ${WORKERS:-8} -p no:cacheprovider \
        tests/test_triton.py tests/test_cuda.py 2>&1 | tee "$OUT/tests.log" | tail -60 || status=1
fi
if [ "${1:-all}" != tests ]; then
    $PY -m addnorm.cli bench --device cuda --out "$OUT" 2>&1 | tee "$OUT/bench.log" || status=1
fi
exit $status

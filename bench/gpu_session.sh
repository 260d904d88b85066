#!/usr/bin/env bash
# One lent-GPU session in one call (device tool): environment, the kernel tests compiled on the GPU against
# the float64 reference, then the benchmark sweep. Everything lands under $OUT (log.txt, r/...).
#   bash bench/gpu_session.sh [BENCH_SECONDS] [extra flags for bench/run_all.py...]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench-results/gpu-session}
mkdir -p "$OUT/r"
budget=${1:-210}; shift || true
exec > >(tee "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
python3 -c "import torch, triton, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', \
triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || echo "pip install failed"
echo "== kernel tests on the GPU"
t0=$(date +%s)
CONVCRF_AUTOTUNE=0 CONVCRF_TEST_DEVICE=cuda timeout ${TEST_SECONDS:-240} python3 -m pytest -q -p no:cacheprovider ${GPU_TESTS:-tests/test_kernels.py \
  tests/test_blur_iteration.py tests/test_band_product.py tests/test_gradients.py tests/test_graphs.py} -rfE 2>&1 | tail -40
echo "== tests took $(( $(date +%s) - t0 )) s"
echo "== bench"
timeout $(( budget + ${BENCH_SLACK:-120} )) python3 bench/run_all.py --device cuda --no-plots --time-budget "$budget" \
  --sections filter_size,message_pass,resolution,classes_batch --out "$OUT/r" "$@"
echo "== bench exit $?"

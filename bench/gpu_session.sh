#!/usr/bin/env bash
# One lent-GPU session in one call (device tool): environment, a smoke inference against the PyTorch path, every
# device test compiled on the GPU against the float64 reference (compilation dominates: use the host's cores),
# then the benchmarks in priority order, each with its own time budget. What comes back fits the tool's 8-file
# limit: $OUT/log.txt, and per section $OUT/<section>/{bench.csv,autotune.csv,meta.json} (summary.md and the
# plots are redrawn here with `python bench/run_all.py --plot-only --out <folder>`).
#   bash bench/gpu_session.sh [IMPLEMENTATIONS] [FILTER_SIZES]
# Budgets (seconds; environment; 0 skips the step): TEST_SECONDS (170; TEST_WORKERS 8), HOST_SECONDS (60,
# host time per launch), MP_SECONDS (110, the message_pass section), FS_SECONDS (120, the filter_size section),
# SLACK (30, each section's grace to write what it measured), PROFILE_SECONDS (90 and a third of it: one
# inference's kernels at 1024x2048 blur 4 k = 11 after the sections, whose tuning picks it reuses, and at 512²),
# DENSE_SECONDS (45), DROPIN_SECONDS (90), FIRST_SECONDS (60, time to the first inference), BACKWARD_SECONDS (40).
# BENCH_ARGS: more flags for both sections (e.g. "--k-resolutions 1024x2048 --blurs 1").
# pydensecrf on the host's CPU (SPEC §7: >= 1000x it) only with a wheel of pydensecrf2 for the GPU image's Python
# carried in .whl/ (the machine reaches no index; build it with `python3.12 -m pip wheel --no-deps pydensecrf2 -w
# .whl` and pass the device tool carry=[".whl"]); the pydensecrf drop-in (DenseCRF2D) on the GPU against it (its
# rows are in the log).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-bench-results/gpu-session}
impls=${1:-unfold,triton-two-pass,triton-fused,triton-tf32,triton-cl,triton-graph}
ks=${2:-3,7,11,15,21}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
python3 -c "import torch, triton, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', \
triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')"
git log -1 --format='commit %h %s' 2>/dev/null; git status --short 2>/dev/null | head
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || echo "pip install failed"
dense=0
if ls .whl/pydensecrf2-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-deps --no-index .whl/pydensecrf2-*.whl && dense=1 || echo "pydensecrf2 install failed"
fi

echo "== smoke: an inference at blur 4 and 1 against the PyTorch path ($(date +%T))"
smoke() {
  CONVCRF_AUTOTUNE=0 timeout 45 python3 - <<'PY'
import torch
from convcrf_triton import ConvCRF
g = torch.Generator().manual_seed(0)
unary = torch.randn(2, 21, 61, 84, generator=g).cuda()
image = (torch.rand(2, 3, 61, 84, generator=g) * 255).cuda()
for blur, k in ((4, 5), (1, 7)):
    crf = ConvCRF(21, filter_size=k, blur=blur, num_iter=5).cuda()
    out = [crf(unary, image) for _ in range(2)][-1]
    crf.backend = "torch"
    ref = crf(unary.double(), image.double())
    err = ((out.double() - ref).norm() / ref.norm()).item()
    print(f"blur {blur} k {k}: relative error {err:.2e}")
    assert err < 1e-4, err
PY
}
smoke || { echo "== smoke failed: the rest through triton's launch path (CONVCRF_DIRECT_LAUNCH=0)"; \
  export CONVCRF_DIRECT_LAUNCH=0; smoke; }
step() {  # step SECONDS TITLE COMMAND...: skipped at 0 seconds; at its end SIGINT (pytest then prints its summary
  local seconds=$1 title=$2; shift 2  # of what ran: run 5's SIGTERM left only the progress dots), SIGKILL 20 s later
  if [ "$seconds" = 0 ]; then echo "== $title: skipped"; return; fi
  echo "== $title ($(date +%T))"
  timeout --signal=INT --kill-after=20 "$seconds" "$@"
}
t0=$(date +%s)
echo "== device tests ($(date +%T))"  # (outside the pipeline, whose tail would cut it)
CONVCRF_AUTOTUNE=0 CONVCRF_TEST_DEVICE=cuda step "${TEST_SECONDS:-170}" "device tests, pytest's output" python3 -m \
  pytest -q -p no:cacheprovider -n "${TEST_WORKERS:-8}" ${GPU_TESTS:-tests} -rfE --durations=15 2>&1 \
  | grep -v -e PytestBenchmarkWarning -e 'warner(PytestBenchmarkWarning' | tail -80
echo "== tests took $(( $(date +%s) - t0 )) s"
# (the first config: no tuning)
CONVCRF_AUTOTUNE=0 step "${HOST_SECONDS:-60}" "host time per launch" python3 bench/host_overhead.py --calls 20000 --profile 200

section() {  # section budget implementations...
  local name=$1 budget=$2; shift 2
  if [ "$budget" = 0 ]; then echo "== bench $name: skipped"; return; fi
  echo "== bench $name ($budget s, $(date +%T))"
  timeout --signal=TERM --kill-after=15 $(( budget + ${SLACK:-30} )) python3 bench/run_all.py --device cuda \
    --no-plots --time-budget "$budget" --sections "$name" --out "/tmp/bench-$name" ${BENCH_ARGS:-} "$@"
  echo "== bench $name exit $?"
  mkdir -p "$OUT/$name"
  for f in bench.csv autotune.csv meta.json; do cp "/tmp/bench-$name/$f" "$OUT/$name/" 2>/dev/null; done
}
section message_pass "${MP_SECONDS:-110}" --filter-sizes "$ks" \
  --implementations "$(tr , '\n' <<<"$impls" | grep -v -e triton-cl -e triton-graph | paste -sd,)"
section filter_size "${FS_SECONDS:-120}" --filter-sizes "$ks" \
  --implementations "$(tr , '\n' <<<"$impls" | grep -v -e unfold -e triton-tf32 | paste -sd,)"
profile=${PROFILE_SECONDS:-90}
step "$profile" "one inference's kernels (1024x2048 blur 4 k = 11, tuned: autotune.csv of the sections has the picks)" \
  python3 bench/kernel_profile.py --size 1024x2048 --blur 4 --filter-size 11 --rows 8
step $(( profile / 3 )) "the same at 512x512 k = 3 (host-bound)" \
  python3 bench/kernel_profile.py --size 512x512 --blur 4 --filter-size 3 --rows 8
if [ "$dense" = 1 ]; then  # (375x500, 512x512, 1024x2048: ~8 s a call at the largest)
  section densecrf "${DENSE_SECONDS:-45}" --implementations pydensecrf
fi
step "${DROPIN_SECONDS:-90}" "the pydensecrf drop-in on the GPU, pydensecrf on this host's CPU where installed" \
  python3 bench/densecrf_speed.py --device cuda --sizes 375x500,1024x2048 --repeat 3 --out /tmp/densecrf_speed
step "${FIRST_SECONDS:-60}" "time to the first inference (compiles from an empty Triton cache)" \
  python3 bench/first_call.py --threads 8
# (the first config of each tuned pass, to keep the call short; the table is in the log)
CONVCRF_AUTOTUNE=0 step "${BACKWARD_SECONDS:-40}" "training's kernels: the fused pass and its weight gradient" \
  python3 bench/backward.py --out /tmp/backward.csv
nvidia-smi --query-gpu=clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv

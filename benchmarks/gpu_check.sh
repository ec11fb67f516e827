#!/usr/bin/env bash
# The GPU check: one call on a CUDA machine (an H100 in our lease), well under 8 minutes.
#   1. environment: GPU, clocks, torch/triton versions
#   2. the CUDA extension build, when csrc/ holds sources (none yet: CUDA kernels are a later issue)
#   3. the test suite on the GPU (compiled Triton, no interpreter)
#   4. every benchmarks/bench_*.py at the anchor shapes of ../shared/perf/anchors-h100.md
#   5. measured vs predicted ceiling per case (benchmarks/static_report.py --compare)
# Writes under $OUT (default ./gpu_check_out): tests.log, bench.log, results.tar.gz (CSV/JSON per
# op family), summary.md (printed last). Usage from the repo root:  bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT/results"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FASTNORM_BUILD_CUDA=${FASTNORM_BUILD_CUDA:-1}
PY=${PYTHON:-python3}
start=$(date +%s)

{
  echo "# fastnorm GPU check, $(date -u +%Y-%m-%dT%H:%MZ), git $(git rev-parse --short HEAD 2>/dev/null)"
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,memory.total,driver_version --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/bench.log"

if ls csrc/*.cu csrc/*.cpp >/dev/null 2>&1; then
  echo "## building the CUDA extension" | tee -a "$OUT/bench.log"
  timeout 300 $PY setup.py build_ext --inplace 2>&1 | tail -5 | tee -a "$OUT/bench.log"
fi

echo "## tests on the GPU" | tee -a "$OUT/bench.log"
# The ahead-of-time compile test proves GPU builds on CPU-only CI; here the kernels really run.
timeout 180 $PY -m pytest -q -p no:cacheprovider tests --deselect tests/test_triton_compile.py \
  2>&1 | tee "$OUT/tests.log" | tail -15
test_status=${PIPESTATUS[0]}
echo "tests exit status: $test_status" | tee -a "$OUT/bench.log"

echo "## benchmarks" | tee -a "$OUT/bench.log"
for bench in benchmarks/bench_*.py; do
  # --max-seconds stops starting cases; timeout is the backstop for a case that hangs.
  timeout 110 $PY "$bench" --out "$OUT/results" --max-seconds 75 >> "$OUT/bench.log" 2>&1 \
    || echo "$bench exited with $?" | tee -a "$OUT/bench.log"
done
echo "## measured vs predicted ceiling (static report byte model, H100 parameters)" | tee -a "$OUT/bench.log"
# Byte model only (seconds); the registers/spills half of the report needs no GPU and runs in CI.
timeout 120 $PY benchmarks/static_report.py --no-compile --targets sm_90 --out "$OUT/static" \
  --compare "$OUT/results" 2>&1 | sed -n '/^## Measured vs predicted/,$p' | tee "$OUT/measured_vs_predicted.md" >> "$OUT/bench.log"
tar -czf "$OUT/results.tar.gz" -C "$OUT" results static && rm -rf "$OUT/results" "$OUT/static"

{
  echo "# GPU check summary ($(( $(date +%s) - start )) s); tests exit status $test_status"
  tail -n 3 "$OUT/tests.log"
  grep -E '^(# |op \||--- \||[a-z_]+ \| )|^error:' "$OUT/bench.log"
  cat "$OUT/measured_vs_predicted.md"
} > "$OUT/summary.md"
cat "$OUT/summary.md"
exit "$test_status"

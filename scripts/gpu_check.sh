#!/usr/bin/env bash
# One device call: environment, GPU tests, tuning sweep and/or benchmark; logs under $OUT.
# Usage: bash scripts/gpu_check.sh [tune] [tests] [bench] [speed]   (default: tests bench)
# Environment knobs: TUNE_DIMS ("64 128 256"), TUNE_PASSES ("fwd,bwd"; or dkdv / dq alone),
# TUNE_CONFIGS (only these candidates), TUNE_BUDGET (s), PYTEST_ARGS (extra pytest args, e.g. a -k filter), BENCH_ARGS (CLI args),
# SPEED_ARGS (pytest-benchmark args, e.g. -k "d128-n16k").
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
steps=${*:-tests bench}
{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())"
} 2>&1 | tee "$OUT/env.txt"

for step in $steps; do
  start=$(date +%s)
  case $step in
    tune)
      for d in ${TUNE_DIMS:-64 128 256}; do
        for pass in ${TUNE_PASSES:-fwd,bwd}; do
          python3 benchmarks/tune.py --dims $d --passes $pass ${TUNE_CONFIGS:+--configs $TUNE_CONFIGS} --out "$OUT/tune_${d}_$pass.jsonl" \
            --lock /tmp/tune.lock --budget "${TUNE_BUDGET:-300}" > "$OUT/tune_${d}_$pass.log" 2>&1 &
        done
      done
      wait
      grep -h BEST "$OUT"/tune_*.log | tee "$OUT/tune_best.txt"
      ;;
    tests)
      python3 -m pytest tests -q -n 8 -p no:cacheprovider -m "gpu or not gpu" --timeout 900 ${PYTEST_ARGS:-} \
        2>&1 | tee "$OUT/tests.log" | tail -30
      ;;
    bench)
      python3 -m flash_module.bench --json "$OUT/bench.json" --plot "$OUT/bench.png" ${BENCH_ARGS:-} \
        2>&1 | tee "$OUT/bench.log"
      ;;
    speed)
      python3 -m pytest benchmarks/test_speed.py -q -m gpu --benchmark-only -p no:cacheprovider \
        --benchmark-json "$OUT/speed.json" ${SPEED_ARGS:-} 2>&1 | tee "$OUT/speed.log" | tail -40
      ;;
  esac
  echo "== $step took $(( $(date +%s) - start ))s"
done

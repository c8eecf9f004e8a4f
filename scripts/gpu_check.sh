#!/usr/bin/env bash
# One device call: environment, GPU tests, tuning sweep and/or benchmark; logs under $OUT.
# Usage: bash scripts/gpu_check.sh [tune] [tests] [bench] [speed] [ring]   (default: tests bench)
# ring (a machine with several GPUs): the NCCL ring-attention tests and the 1->2->4->8 GPU
# weak-scaling benchmark (RING_ARGS, default: causal zigzag, 16k tokens per GPU).
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
    ring)
      export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # multicast stays off
      python3 -m pytest tests/test_ring_attention.py -q -m gpu -p no:cacheprovider -k nccl \
        2>&1 | tee "$OUT/ring_tests.log" | tail -15
      python3 benchmarks/bench_ring.py --json "$OUT/ring.json" ${RING_ARGS:---causal --layout zigzag} \
        2>&1 | tee "$OUT/ring.log"
      ;;
    speed)
      python3 -m pytest benchmarks/test_speed.py -q -m gpu --benchmark-only -p no:cacheprovider \
        --benchmark-json "$OUT/speed.json" ${SPEED_ARGS:-} 2>&1 | tee "$OUT/speed.log" | tail -40
      ;;
  esac
  echo "== $step took $(( $(date +%s) - start ))s"
done

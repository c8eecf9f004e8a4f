#!/usr/bin/env bash
# One device call: environment, GPU tests, tuning sweep and/or benchmark; logs under $OUT.
# Usage: bash scripts/gpu_check.sh [tune] [tests] [bench] [speed] [ring] [ab] [sanitize] [million]
#        [decode] [varlen] [subset] [variants] [window] [ablation] [gluon]
#        (default: tests bench)
# gluon: the Hopper Gluon kernels: tests/test_gluon_fwd.py and test_gluon_bwd.py, then
# benchmarks/bench_gluon_fwd.py (GLUON_FWD_ARGS) and bench_gluon_bwd.py (GLUON_ARGS, default: --variants)
# against the portable kernels, cuDNN and FA2 (GLUON_TEST_TIMEOUT: the tests' limit, default 300 s).
# upstream: flash-attn's own tests/test_flash_attn.py against flash_module (scripts/upstream_tests.py; needs
# .upstream/flash-attention, carried: UPSTREAM_SAMPLE cases, default 600; UPSTREAM_ARGS extra pytest args).
# ablation: benchmarks/dropout_ablation.py per variant (ABLATION_VARIANTS, default: plain full transpose).
# variants: benchmarks/bench_variants.py (VARIANTS_ARGS; each variant's overhead, FlexAttention alongside).
# window: benchmarks/bench_window.py (WINDOW_ARGS; 64k causal with a 4k window vs full causal, FlexAttention too).
# subset: pytest $SUBSET (files; SUBSET_K: a -k expression, kept as one argument) with -v into $OUT/subset.log
# (SUBSET_TIMEOUT, default 500 s).
# sanitize: compute-sanitizer memcheck, racecheck and initcheck over scripts/sanitize_cases.py (every
# kernel and mode, fwd+bwd, ragged shapes; SANITIZE_ONLY: comma-separated case-name substrings,
# SANITIZE_TOOLS: a subset of the three); million: benchmarks/million_tokens.py (1M tokens, one GPU).
# decode: benchmarks/bench_decode.py (DECODE_ARGS; KV cache contiguous and paged, the peers, a copy);
# varlen: benchmarks/bench_varlen.py (VARLEN_ARGS; packed documents, fwd + bwd, the peers).
# ring (a machine with several GPUs): the NCCL ring-attention tests (dense, packed documents, torch's
# context_parallel on our kernels) and the 1->2->4->8 GPU weak-scaling benchmark (RING_ARGS, default:
# causal zigzag, 16k tokens per GPU; RING_PACKED="--docs N" adds packed documents by ring and all-gather;
# RING_TRANSPORT="--worlds 2,4" adds benchmarks/ring_transport.py: one hop by NCCL and by copy engine).
# Environment knobs: TUNE_DIMS ("64 128 256"), TUNE_PASSES ("fwd,bwd"; or dkdv / dq alone),
# TUNE_CONFIGS (only these candidates), TUNE_BUDGET (s), PYTEST_ARGS (extra pytest args, e.g. a -k filter), BENCH_ARGS (CLI args),
# SPEED_ARGS (pytest-benchmark args, e.g. -k "d128-n16k"), PYTEST_WORKERS (default: one per 20 GB of GPU memory, <= 8).
# ab: the same benchmark of an older checkout (BASELINE, a directory holding one, e.g. from
# `git archive <rev> | tar -x -C baseline`) and of this tree, alternated AB AB in one run
# (AB_ARGS, default: fa2 at D 64/128, N 4k/16k, causal and not, fwd+bwd).
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
      mem_mb=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
      workers=${PYTEST_WORKERS:-$(( mem_mb / 20000 < 1 ? 1 : (mem_mb / 20000 > 8 ? 8 : mem_mb / 20000) ))}
      echo "pytest workers: $workers (GPU memory ${mem_mb} MiB)" | tee -a "$OUT/env.txt"
      python3 -m pytest tests -q -n "$workers" --dist loadgroup -p no:cacheprovider -m "gpu or not gpu" --timeout 900 ${PYTEST_ARGS:-} \
        2>&1 | tee "$OUT/tests.log" | tail -30
      ;;
    upstream)
      python3 scripts/upstream_tests.py --sample "${UPSTREAM_SAMPLE:-600}" --junit "$OUT/upstream.xml" -- \
        -n "${PYTEST_WORKERS:-8}" -rfE --tb=line ${UPSTREAM_ARGS:-} 2>&1 | tee "$OUT/upstream.log" | tail -40
      ;;
    bench)
      python3 benchmarks/bench.py --json "$OUT/bench.json" --plot "$OUT/bench.png" ${BENCH_ARGS:-} \
        2>&1 | tee "$OUT/bench.log"
      ;;
    ring)
      export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1  # multicast stays off
      python3 -m pytest tests/test_ring_attention.py tests/test_ring_varlen.py tests/test_torch_cp.py -q -m gpu \
        -p no:cacheprovider -k "nccl or torch_context" 2>&1 | tee "$OUT/ring_tests.log" | tail -15
      python3 benchmarks/bench_ring.py --json "$OUT/ring.json" ${RING_ARGS:---causal --layout zigzag} \
        2>&1 | tee "$OUT/ring.log"
      # RING_TRANSPORT (e.g. "--worlds 2,4"): what one hop costs the attention beside it, NCCL's
      # send/receive against a copy-engine pull through symmetric memory
      if [ -n "${RING_TRANSPORT:-}" ]; then
        python3 benchmarks/ring_transport.py --json "$OUT/transport.json" $RING_TRANSPORT 2>&1 | tee "$OUT/transport.log"
      fi
      # RING_PACKED (e.g. "--docs 16"): packed documents too, by ring and by all-gather
      if [ -n "${RING_PACKED:-}" ]; then
        for method in ring allgather; do
          python3 benchmarks/bench_ring.py --json "$OUT/ring_packed_$method.json" ${RING_ARGS:---causal --layout zigzag} \
            $RING_PACKED --method $method 2>&1 | tee "$OUT/ring_packed_$method.log"
        done
      fi
      ;;
    ab)
      ab_args=${AB_ARGS:--d 64,128 -n 4096,16384 --causal both --passes fwd,bwd --impls ours --plain -q}
      if [ "${AB_KERNELS:-1}" = 1 ]; then  # per-kernel profiler times, new then old
        python3 benchmarks/kernel_times.py --label new > "$OUT/ab_kernels.txt" 2>&1
        (cd "$BASELINE" && PYTHONPATH=$PWD python3 "$OLDPWD/benchmarks/kernel_times.py" --label old) \
          >> "$OUT/ab_kernels.txt" 2>&1
        grep " ms$" "$OUT/ab_kernels.txt" | sort -s -k2,4
      fi
      for round in 1 2; do
        (cd "${BASELINE:?set BASELINE to an older checkout}" && PYTHONPATH=$PWD python3 -m flash_module.bench $ab_args \
          --json "$OUT/ab_old_$round.json") 2>&1 | tee "$OUT/ab_old_$round.log"
        python3 benchmarks/bench.py $ab_args --json "$OUT/ab_new_$round.json" 2>&1 | tee "$OUT/ab_new_$round.log"
      done
      ;;
    sanitize)
      shards=${SANITIZE_SHARDS:-4}
      # compile once, outside the sanitizer, one process per shard (serially it took 9 minutes
      # on a fresh H100 machine with 60 cases)
      for i in $(seq 0 $(( shards - 1 ))); do
        python3 scripts/sanitize_cases.py --shard "$i/$shards" --only "${SANITIZE_ONLY:-}" > "/tmp/sanitize_warm_$i.log" 2>&1 &
      done
      wait
      cat /tmp/sanitize_warm_*.log > "$OUT/sanitize_warm.log"
      echo "warm: $(grep -c '^ok' "$OUT/sanitize_warm.log") cases ok, $(( $(date +%s) - start ))s" \
        | tee -a "$OUT/sanitize.txt"
      # Shard logs go to /tmp and only the per-tool concatenations to $OUT: the device returns a
      # limited number of files.  Keep SANITIZE_TIMEOUT + the warm-up under the call's limit, or
      # nothing below runs.
      for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck}; do
        for i in $(seq 0 $(( shards - 1 ))); do  # every tool and shard at once: one GPU, many CPUs
          # --launch-timeout: with 24 processes starting at once, the default 10 s to attach was too
          # short for 4 of them on an H200 (no case ran; reported below as "not attached").
          PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout "${SANITIZE_TIMEOUT:-500}" compute-sanitizer --tool "$tool" \
            --error-exitcode 1 --target-processes application-only --launch-timeout 300 \
            python3 scripts/sanitize_cases.py --shard "$i/$shards" --only "${SANITIZE_ONLY:-}" \
            > "/tmp/sanitize_${tool}_$i.log" 2>&1 &
        done
      done
      wait
      for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck}; do
        cat /tmp/sanitize_"${tool}"_*.log > "$OUT/sanitize_$tool.log"
        echo "$tool: $(grep -c '^ok' "$OUT/sanitize_$tool.log") of $(grep -c '^ok' "$OUT/sanitize_warm.log") cases ok;" \
          "$(grep -l 'No attachable process' /tmp/sanitize_"${tool}"_*.log | wc -l) shards not attached;" \
          "$(grep -hE 'ERROR SUMMARY|RACECHECK SUMMARY' /tmp/sanitize_"${tool}"_*.log | sort | uniq -c | tr -s ' ')" \
          | tee -a "$OUT/sanitize.txt"
      done
      ;;
    subset)  # SUBSET: pytest arguments (files, -k); -v into $OUT, so a timeout keeps the test names
      timeout "${SUBSET_TIMEOUT:-500}" python3 -m pytest ${SUBSET:?set SUBSET to pytest arguments} ${SUBSET_K:+-k "$SUBSET_K"} -q -v \
        -n "${PYTEST_WORKERS:-4}" --dist loadgroup -p no:cacheprovider -m "gpu or not gpu" 2>&1 \
        | tee "$OUT/subset.log" | grep -E "FAILED|ERROR|[0-9]+ (passed|failed)" | tail -40
      ;;
    decode)
      python3 benchmarks/bench_decode.py --json "$OUT/decode.json" ${DECODE_ARGS:-} 2>&1 | grep -v -i warn \
        | tee "$OUT/decode.log"
      ;;
    variants)
      python3 benchmarks/bench_variants.py --json "$OUT/variants.json" ${VARIANTS_ARGS:-} 2>&1 | grep -v -i warn \
        | tee "$OUT/variants.log"
      ;;
    window)
      python3 benchmarks/bench_window.py --json "$OUT/window.json" ${WINDOW_ARGS:-} 2>&1 | grep -v -i warn \
        | tee "$OUT/window.log"
      ;;
    varlen)
      python3 benchmarks/bench_varlen.py --json "$OUT/varlen.json" ${VARLEN_ARGS:-} 2>&1 | grep -v -i warn \
        | tee "$OUT/varlen.log"
      ;;
    gluon)
      timeout "${GLUON_TEST_TIMEOUT:-300}" python3 -m pytest tests/test_gluon_fwd.py tests/test_gluon_bwd.py -q -n "${PYTEST_WORKERS:-6}" \
        -p no:cacheprovider -m "gpu or not gpu" 2>&1 | tee "$OUT/gluon_tests.log" | tail -3
      python3 benchmarks/bench_gluon_fwd.py ${GLUON_FWD_ARGS:-} 2>&1 | grep -v -i warn | tee "$OUT/gluon_fwd_bench.log"
      python3 benchmarks/bench_gluon_bwd.py ${GLUON_ARGS:---variants} 2>&1 | grep -v -i warn \
        | tee "$OUT/gluon_bench.log"
      ;;
    ablation)  # benchmarks/dropout_ablation.py, one process per variant (ABLATION_VARIANTS)
      for variant in ${ABLATION_VARIANTS:-plain full transpose}; do
        python3 benchmarks/dropout_ablation.py "$variant" 2>&1 | grep -v -i warn | tee -a "$OUT/ablation.log"
      done
      ;;
    million)
      python3 benchmarks/million_tokens.py --json "$OUT/million.json" 2>&1 | tail -40 | tee "$OUT/million.log"
      ;;
    speed)
      python3 -m pytest benchmarks/test_speed.py -q -m gpu --benchmark-only -p no:cacheprovider \
        --benchmark-json "$OUT/speed.json" ${SPEED_ARGS:-} 2>&1 | tee "$OUT/speed.log" | tail -40
      ;;
  esac
  echo "== $step took $(( $(date +%s) - start ))s"
done

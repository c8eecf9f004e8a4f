#!/usr/bin/env bash
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
timeout 120 python3 -m pytest tests/test_gluon_fwd.py -q -n 8 -p no:cacheprovider -m "gpu or not gpu" -k "persistent" -x 2>&1 | tail -3 > $OUT/tests_bits.log
timeout 150 python3 benchmarks/bench_gluon_fwd.py --persistent --shapes 128x16384x16x16x0,128x16384x16x16x1,128x1024x16x16x1,128x1024x16x16x0,128x4096x16x16x1,256x1024x8x8x1,64x16384x32x32x1,128x16384x16x16x0,128x16384x16x16x1 > $OUT/fwd.log 2>&1

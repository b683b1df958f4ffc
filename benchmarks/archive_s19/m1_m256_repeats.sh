#!/bin/bash
# session 19 call 8: final code, M = 1 and 256 against FP16 / FP8, three separate processes (the spread between calls)
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv,noheader
for i in 1 2 3; do
  t0=$(date +%s)
  PYTHONPATH=.:.whl/site timeout 170 python benchmarks/gemm.py --ms 1,256 --kernels fp16,fp8_rowwise,dgq \
      --out $OUT/gemm_m1_m256_s19_$i.json > $OUT/gemm_m1_m256_s19_$i.log 2>&1; echo "rep $i rc=$? $(( $(date +%s) - t0 )) s"
  grep -A4 "^## median" $OUT/gemm_m1_m256_s19_$i.log; grep "correctness" $OUT/gemm_m1_m256_s19_$i.log
done

set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.:.whl/site
for e in 1 2; do DGQ_GEMV_RELEASE=$e timeout 100 python benchmarks/archive_s20/chain_check.py 2>&1 | tail -1 | tee $OUT/chain_rel$e.log; done
for r in 1 2; do for e in 0 1 2; do
  DGQ_GEMV_RELEASE=$e timeout 100 python benchmarks/gemm.py --ms 1 --kernels fp16,dgq,dgq_gemv_tma,dgq_gemv_inside \
     --out $OUT/gemm_m1_rel${e}_r$r.json 2>&1 | grep -E "^1 \|"
done; done

set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.:.whl/site
for e in 1 0; do DGQ_PDL_EARLY=$e timeout 120 python benchmarks/archive_s20/chain_check.py 2>&1 | tee $OUT/chain_e$e.log; done
for r in 1 2; do for e in 0 1; do
  DGQ_PDL_EARLY=$e timeout 150 python benchmarks/gemm.py --ms 1,16 --kernels fp16,dgq,dgq_gemv_tma,dgq_gemv_inside \
     --out $OUT/gemm_m1_e${e}_r$r.json 2>&1 | grep -v "^  \|unsupported" | tail -8
done; done
DGQ_PDL_EARLY=1 timeout 200 python -m pytest -q -m cuda tests/test_kernels_cuda.py -k "gemv or act_quant or graph" 2>&1 | tail -5 | tee $OUT/cuda_e1.log

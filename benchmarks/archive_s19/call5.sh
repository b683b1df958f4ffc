#!/bin/bash
# session 19 call 5: ncu of the M = 256 ping-pong configs (shared memory and tensor pipes), the rest of pytest -m cuda
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv,noheader
t0=$(date +%s)
ncu --query-metrics 2>/dev/null | grep -iE "gmma|data_bank_(reads|writes)|pipe_tensor" | awk '{print $1}' | head -30 > $OUT/metric_names.txt
cat $OUT/metric_names.txt | tr '\n' ' '; echo
MET=$(grep -E "^(sm__pipe_tensor_op_gmma_cycles_active|l1tex__data_bank_reads|l1tex__data_bank_writes|sm__inst_executed_pipe_tensor_op_gmma)$" $OUT/metric_names.txt | sed 's/$/.avg.pct_of_peak_sustained_elapsed/' | tr '\n' ',' | sed 's/,$//')
echo "metrics: $MET"
for c in pp_m256 sc11008_m256; do
  PYTHONPATH=.:benchmarks timeout 120 ncu --target-processes all -k regex:_pp_a8w4_kernel -s 2 -c 1 --section SpeedOfLight \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --metrics "$MET" -o $OUT/rep_$c \
    python benchmarks/ncu_ws_cases.py $c > $OUT/ncu_$c.log 2>&1
  echo "== $c rc=$?"
  ncu -i $OUT/rep_$c.ncu-rep --page details --print-units base 2>&1 | grep -iE "Duration|SM Frequency|Compute \(SM\)|Memory Throughput|L1/TEX Cache|L2 Cache Throughput|DRAM Throughput|Shared|Tensor|gmma|data_bank|Pipe" | head -30
done
echo "ncu $(( $(date +%s) - t0 )) s"; rm -f $OUT/rep_*.ncu-rep
t0=$(date +%s)
run() { PYTHONPATH=. timeout 320 python -m pytest -q -m cuda tests/ -p no:cacheprovider -k "$2" > $OUT/cuda_$1.log 2>&1; }
run q1 "act_quant or per_row_static or absmax_in_graph or swiglu" &
run q2 "gemv" &
run q4 "warp_specialized_kernel_is_bit_exact or layout_follows or cached_layouts or calibration" &
run q5 "compiled_fused or generate or decode_attention or bench_measures or api_generate or int8" &
wait
echo "== cuda $(( $(date +%s) - t0 )) s"
for f in $OUT/cuda_q*.log; do echo "$(basename $f): $(tail -1 $f)"; grep -E "^(FAILED|ERROR)" $f | head -5; done

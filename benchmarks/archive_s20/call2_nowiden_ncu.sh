set -o pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
# 1) the no-widening diagnostic beside today's loop (timings only; its values are wrong by design)
python - <<'PY' 2>&1 | tee $OUT/nowiden.log
import sys, torch
from dataclasses import replace
sys.path.insert(0, "benchmarks")
from gemm import SHAPES, sets_at, time_graph
from dgq.kernels.gemm_pp import PpConfig, pp_a8w4_matmul, config_for
for k, n, m, sets in sets_at([(11008, 4096), (4096, 11008)], [256, 1024]):
    base = config_for(m, n)
    t = {}
    for name, cfg in (("pf0", base), ("nofence", replace(base, fence=False)), ("nowiden", replace(base, prefetch=5)),
                      ("nowiden_nofence", replace(base, prefetch=5, fence=False))):
        t[name] = time_graph([lambda o=o, c=cfg: pp_a8w4_matmul(o.x_s8, o.kw, o.s_x, config=c) for o in sets])
    print(f"K={k} N={n} M={m} {base}: " + ", ".join(f"{a} {b*1e3:.1f}" for a, b in t.items()) + " us", flush=True)
PY
# 2) ncu source-level stall sampling of today's loop on two M = 256 configs
for c in sc11008_m256 pp_m256; do
  ncu --target-processes all -k regex:_pp_a8w4_kernel -s 2 -c 1 --section SpeedOfLight --section WarpStateStats \
      --section SourceCounters -o /tmp/rep_$c python benchmarks/ncu_ws_cases.py $c > /dev/null 2>&1
  ncu -i /tmp/rep_$c.ncu-rep --page source --csv --print-source sass > $OUT/sass_$c.csv
  ncu -i /tmp/rep_$c.ncu-rep --page details --print-units base > $OUT/details_$c.txt
done
ls -la $OUT

import json, sys, statistics as st
tr = json.load(open(sys.argv[1]))
for key, calls in tr.items():
    if len(sys.argv) > 2 and sys.argv[2] not in key: continue
    c = calls[1]  # middle call
    rows = [r for r in c if r[0] > 0]
    # clock rate from gt/clock
    rates = [(r[31]-r[1])/(r[30]-r[0]) for r in rows if r[30] > r[0]]
    ghz = st.median(rates)
    g0 = min(r[0] for r in rows); gend = max(r[30] for r in rows)
    us = lambda cyc: cyc / ghz / 1e3
    print(f"== {key}: {len(rows)} CTAs, {ghz:.2f} GHz, span {(gend-g0)/1e3:.1f} us; start offsets min/med/max "
          f"{0:.1f}/{st.median(r[0]-g0 for r in rows)/1e3:.1f}/{max(r[0]-g0 for r in rows)/1e3:.1f} us; ends med/max "
          f"{st.median(r[30]-g0 for r in rows)/1e3:.1f}/{max(r[30]-g0 for r in rows)/1e3:.1f}")
    for u in range(7):
        b = 2 + 4 * u
        have = [r for r in rows if r[b] > 0 and r[b+1] > 0]
        if not have: break
        pre = [us(r[b] - (r[1] if u == 0 else r[b - 1])) for r in have]
        loop = [us(r[b+1]-r[b]) for r in have]
        meet = [us(r[b+2]-r[b+1]) for r in have if r[b+2] > 0]
        fin = [us(r[b+3]-(r[b+2] if r[b+2] > 0 else r[b+1])) for r in have if r[b+3] > 0]
        f = lambda v: f"{min(v):.1f}/{st.median(v):.1f}/{max(v):.1f}" if v else "-"
        print(f"  unit {u} ({len(have)} CTAs): before {f(pre)}  loop {f(loop)}  meet {f(meet)}  finish {f(fin)}  (min/med/max us)")

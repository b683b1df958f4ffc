import json, sys, statistics as st
tr = json.load(open(sys.argv[1]))
NAMES = ["start", "loop", "stores", "barrier", "atomic", "spin", "partials", "scales", "convert", "end"]
for key, calls in tr.items():
    if len(sys.argv) > 2 and sys.argv[2] not in key: continue
    rows = [r for r in calls[1] if r[0] > 0]
    ghz = st.median((r[63]-r[1])/(r[62]-r[0]) for r in rows if r[62] > r[0])
    g0 = min(r[0] for r in rows)
    print(f"== {key}: {len(rows)} CTAs, {ghz:.2f} GHz, span {(max(r[62] for r in rows)-g0)/1e3:.1f} us")
    for u in range(5):
        b = 2 + 12 * u
        have = [r for r in rows if r[b] > 0 and r[b + 9] > 0]
        if not have: break
        parts = []
        for i in range(1, 10):
            d = []
            for r in have:
                if r[b + i] <= 0: continue
                prev = max(j for j in range(i) if r[b + j] > 0)
                d.append((r[b + i] - r[b + prev]) / ghz / 1e3)
            if d: parts.append(f"{NAMES[i]} {st.median(d):.2f}/{max(d):.2f}")
        print(f"  unit {u} ({len(have)}): " + "  ".join(parts))

"""Summary of an ncu source page (``ncu -i rep --page source --csv --print-source sass``, xz-compressed) of the
ping-pong kernel: per partition (the MMA warpgroups, the load warp, the idle warps of its warpgroup, split at the
``USETMAXREG`` instructions), the share of warp-stall samples in the main loop (the instructions executed as often
as the IGMMAs) and outside it, by stall reason; and the share at the MMA wait and the slot waits.

    python benchmarks/archive_s20/stall_summary.py results/s20/ncu_sass_sc11008_m256.csv.xz
"""
import csv
import io
import lzma
import sys


def main(path: str) -> None:
    rows = list(csv.reader(io.StringIO(lzma.open(path, "rt").read())))
    hdr, data = rows[1], rows[2:]
    i_s, i_src, i_a, i_e = (hdr.index(h) for h in ("Warp Stall Sampling (All Samples)", "Source", "Address",
                                                   "Instructions Executed"))
    reasons = [i for i, h in enumerate(hdr) if h.startswith("stall_") and "Not Issued" not in h]
    base = int(data[0][i_a], 16)
    off = [int(r[i_a], 16) - base for r in data]
    total = sum(float(r[i_s] or 0) for r in data)
    cuts = [o for o, r in zip(off, data) if "USETMAXREG" in r[i_src]]
    # partitions: [first alloc, dealloc) WG0; then the load warp; the idle warps; the last alloc on: WG1
    parts = {"WG0 (default)": (cuts[1], cuts[2]), "load warp": (cuts[3], cuts[4]), "idle warps": (cuts[4], cuts[9]),
             "WG1 (worker)": (cuts[10], max(off) + 1)}
    print(f"{path}: {total:.0f} samples")
    for name, (lo, hi) in parts.items():
        sel = [(o, r) for o, r in zip(off, data) if lo <= o < hi]
        share = sum(float(r[i_s] or 0) for _, r in sel)
        line = f"  {name}: {share / total * 100:.1f}% of all samples"
        igmma = [int(r[i_e] or 0) for _, r in sel if "IGMMA" in r[i_src]]
        if igmma:
            n = max(igmma)
            loop = [o for o, r in sel if int(r[i_e] or 0) == n]
            inside = [(o, r) for o, r in sel if loop[0] <= o <= loop[-1]]
            s_in = sum(float(r[i_s] or 0) for _, r in inside)
            by = {}
            for _, r in inside:
                for i in reasons:
                    by[hdr[i][6:]] = by.get(hdr[i][6:], 0) + float(r[i] or 0)
            mma_wait = sum(float(r[i_s] or 0) for _, r in inside if "WARPGROUP.DEPBAR" in r[i_src])
            slot_wait = sum(float(r[i_s] or 0) for k, (_, r) in enumerate(inside)
                            if "BRA" in r[i_src] and k and "TRYWAIT" in inside[k - 1][1][i_src])
            line += (f"; main loop {s_in / share * 100:.0f}% of the partition's ({len(inside)} instructions, "
                     f"executed {n} times): MMA wait {mma_wait / share * 100:.0f}%, barrier-slot waits "
                     f"{slot_wait / share * 100:.0f}%; by reason " + ", ".join(
                         f"{k} {v / share * 100:.0f}%" for k, v in sorted(by.items(), key=lambda x: -x[1])[:6]))
        print(line)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        main(p)

"""For each IGMMA with register A operands, follow the control flow (branches included) until a
WARPGROUP.DEPBAR and report any instruction that writes one of its A registers on the way."""
import re, sys
ins = []
for l in open(sys.argv[1]):
    m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", re.sub(r"/\* 0x[0-9a-f]+ \*/", "", l))
    if m:
        ins.append((int(m.group(1), 16), m.group(2).strip()))
idx = {a: i for i, (a, _) in enumerate(ins)}
WIDTH = {".64": 2, ".128": 4, "LDSM.16.M88.4": 4, "LDSM.16.M88.2": 2, "IMAD.WIDE": 2, "LDSM.16.MT88.4": 4}
def dests(t):
    t = re.sub(r"^@!?U?P\w+\s+", "", t)
    m = re.match(r"([A-Z0-9_.]+)\s+R(\d+)", t)
    if not m or m.group(1).startswith(("IGMMA", "ST", "SYNCS", "BAR", "RED", "ATOM", "BRA", "ISETP", "FSETP", "HGMMA")):
        return set()
    w = max([v for k, v in WIDTH.items() if k in m.group(1)] or [1])
    return set(range(int(m.group(2)), int(m.group(2)) + w))
bad = n = 0
for i, (addr, t) in enumerate(ins):
    m = re.search(r"IGMMA\.\S+ R\d+, R(\d+), gdesc", t)
    if not m:
        continue
    n += 1
    a = set(range(int(m.group(1)), int(m.group(1)) + 4))
    seen, todo = set(), [i + 1]
    while todo:
        k = todo.pop()
        while k < len(ins) and k not in seen:
            seen.add(k)
            t2 = ins[k][1]
            if "WARPGROUP.DEPBAR" in t2 or "EXIT" in t2:
                break
            if dests(t2) & a:
                print(f"IGMMA {addr:#x} A=R{min(a)}: written at {ins[k][0]:#x}: {t2}"); bad += 1
            b = re.search(r"BRA (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", t2)
            if b and int(b.group(1), 16) in idx:
                todo.append(idx[int(b.group(1), 16)])
                if not t2.startswith("@"):
                    break
            k += 1
print("igmma", n, "clobbers", bad)

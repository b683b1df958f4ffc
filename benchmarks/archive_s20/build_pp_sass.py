"""Build the ping-pong kernel for sm_90a and dump PTX + SASS: sass.py BM STAGES SPLIT OUTDIR [KEY=VAL constexprs]."""
import os, sys, subprocess, re
sys.path.insert(0, "tests")
os.environ.setdefault("TRITON_INTERPRET", "1")
import triton
import test_kernel_pp_build as t
from dgq.kernels import gemm_pp
bm, st, sp, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
extra = {kv.split("=")[0]: eval(kv.split("=")[1]) for kv in sys.argv[5:]}
from triton.experimental.gluon import _runtime
Orig = _runtime.GluonASTSource
def Patched(fn, sig, consts, *a, **kw):
    sig = dict(sig); consts = dict(consts)
    for k, v in extra.items():
        sig[k] = "constexpr"; consts[k] = v
    return Orig(fn, sig, consts, *a, **kw)
_runtime.GluonASTSource = Patched
os.makedirs(out, exist_ok=True)
k = t.compile_for_hopper(gemm_pp.PpConfig(bm, st, sp), 128, "fp16")
open(f"{out}/k.ptx", "w").write(k.asm["ptx"])
b = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin")
r = subprocess.run([f"{b}/ptxas", "-arch=sm_90a", "-v", f"{out}/k.ptx", "-o", f"{out}/k.cubin"], capture_output=True, text=True)
print(r.stderr[-600:])
sass = subprocess.run([f"{b}/cuobjdump", "-sass", f"{out}/k.cubin"], capture_output=True, text=True).stdout
open(f"{out}/k.sass", "w").write(sass)
print(len(sass.splitlines()), "sass lines; shared", k.metadata.shared)

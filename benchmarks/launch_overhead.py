"""Host time of single launches on CUDA: an aten op, the package's RMSNorm op (dispatch, wrapper, launch) and its
layers down to the compiled kernel's own launcher. A profile of one launch, not a result; run with autograd on, as
written, the op is dispatched to its torch definition (the kernels serve inference only).

    python benchmarks/launch_overhead.py
"""
import time, torch
from infinitevl_hf.modeling.ops.norms import rms_norm
from infinitevl_hf.modeling.ops import triton_elementwise as te
from triton.runtime import driver
from triton import knobs
x = torch.randn(1, 1, 2048, device="cuda", dtype=torch.bfloat16); w = torch.ones(2048, device="cuda", dtype=torch.bfloat16)
out = torch.empty_like(x); rows = x.view(-1, 2048)
k = te._rms_norm_kernel[(1,)](rows, rows, w, out, out, 2048, 0, 2048, 1e-6, BLOCK=2048, ADD=False, num_warps=4)
dev = driver.active.get_current_device(); stream = driver.active.get_current_stream(dev)
args = (rows, rows, w, out, out, 2048, 0, 2048, 1e-6, 2048, False)
k._init_handles() if hasattr(k, "_init_handles") else None
def direct():
    k.run(1, 1, 1, stream, k.function, k.packed_metadata, None, None, None, *args)
def direct_stream():
    s = torch.cuda.current_stream().cuda_stream
    k.run(1, 1, 1, s, k.function, k.packed_metadata, None, None, None, *args)
def md():
    k.run(1, 1, 1, stream, k.function, k.packed_metadata, k.launch_metadata((1,), stream, *args), knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args)
cases = [
 ("torch.empty", lambda: torch.empty((1, 1, 2048), dtype=torch.bfloat16, device=x.device)),
 ("torch add", lambda: x + x),
 ("op rms_norm (dispatch)", lambda: rms_norm(x, w, 1e-6)),
 ("te.rms_norm wrapper", lambda: te.rms_norm(x, w, 1e-6)),
 ("kernel[grid] only", lambda: te._rms_norm_kernel[(1,)](rows, rows, w, out, out, 2048, 0, 2048, 1e-6, BLOCK=2048, ADD=False, num_warps=4)),
 ("compiled.run direct", direct),
 ("compiled.run + torch stream", direct_stream),
 ("compiled.run + launch_metadata", md),
 ("torch current_stream", lambda: torch.cuda.current_stream().cuda_stream),
 ("driver stream", lambda: driver.active.get_current_stream(driver.active.get_current_device())),
]
for rep in range(2):
  for name, fn in cases:
    for _ in range(100): fn()
    torch.cuda.synchronize(); s = time.perf_counter()
    for _ in range(3000): fn()
    e = (time.perf_counter() - s) / 3000; torch.cuda.synchronize()
    print(f"{rep} host per call {name}: {1e6*e:.1f} us")
ref = te.rms_norm(x, w, 1e-6); out.zero_(); direct(); torch.cuda.synchronize(); print("direct equal:", torch.equal(out, ref))

"""What torch's private cuDNN attention op (`_scaled_dot_product_cudnn_attention`) does with the shapes of the
decoder's window pieces, before building on it: grouped key/value heads taken natively?, log-sum-exp shape and
base (checked against float32 math), a per-key bias broadcast over queries (and its cost), rows with every key
masked (output 0 and lse -inf, or NaN?), a strided query; timings at 4,128 queries x 8,191 keys.

    python benchmarks/cudnn_attention_probe.py
"""
import torch
import triton.testing
op = torch.ops.aten._scaled_dot_product_cudnn_attention
dev, dt = "cuda", torch.bfloat16
torch.manual_seed(0)
def ms(fn): return triton.testing.do_bench(fn, warmup=30, rep=200, return_mode="median")
def ref_attn(q, k, v, mask, scale):
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).float(), v.repeat_interleave(rep, 1).float()
    s = (q.float() @ k.transpose(-1, -2)) * scale
    if mask is not None: s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    return torch.softmax(s, -1) @ v, lse
def rel(a, b): return ((a.float()-b.float()).norm()/b.float().norm()).item()
B, H, Hk, D = 1, 16, 2, 128
for Lq, Lk in ((256, 384), (4128, 8191)):
    q = torch.randn(B, H, Lq, D, device=dev, dtype=dt); k = torch.randn(B, Hk, Lk, D, device=dev, dtype=dt); v = torch.randn_like(k)
    scale = D ** -0.5
    print("==", Lq, Lk)
    for name, kw in (("gqa dense", {}), ("gqa causal", dict(is_causal=True))):
        try:
            out = op(q, k, v, None, True, 0.0, scale=scale, **kw)
            o, lse = out[0], out[1]
            mask = None
            if kw: mask = torch.ones(Lq, Lk, dtype=torch.bool, device=dev).tril()
            if Lq <= 256:
                ro, rl = ref_attn(q, k, v, mask, scale)
                print(name, "out", tuple(o.shape), o.stride(), "lse", tuple(lse.shape), lse.dtype, "err", rel(o, ro), "lse err", rel(lse.reshape(rl.shape), rl))
            print(name, "ms", ms(lambda: op(q, k, v, None, True, 0.0, scale=scale, **kw)))
        except Exception as e:
            print(name, "FAILED", type(e).__name__, str(e)[:300])
    ke, ve = k.repeat_interleave(H // Hk, 1), v.repeat_interleave(H // Hk, 1)
    print("expanded dense ms", ms(lambda: op(q, ke, ve, None, True, 0.0, scale=scale)))
    keep = torch.rand(B, Lk, device=dev) > 0.3
    keep[:, :5] = False
    for bname, bias in (("bias [B,1,1,Lk]", torch.zeros(B, 1, 1, Lk, device=dev, dtype=dt).masked_fill(~keep[:, None, None], float("-inf"))),):
        for bshape in ("as is", "expanded"):
            b = bias if bshape == "as is" else bias.expand(B, H, Lq, Lk)
            try:
                out = op(q, ke, ve, b, True, 0.0, scale=scale)
                if Lq <= 256:
                    ro, rl = ref_attn(q, k, v, keep[:, None, None].expand(B, H, Lq, Lk), scale)
                    print(bname, bshape, "err", rel(out[0], ro), "lse", rel(out[1].reshape(rl.shape), rl))
                print(bname, bshape, "ms", ms(lambda: op(q, ke, ve, b, True, 0.0, scale=scale)))
            except Exception as e:
                print(bname, bshape, "FAILED", type(e).__name__, str(e)[:300])
    # fully masked rows
    try:
        b = torch.full((B, 1, 1, Lk), float("-inf"), device=dev, dtype=dt)
        out = op(q, ke, ve, b.expand(B, H, Lq, Lk), True, 0.0, scale=scale)
        print("all masked: out nan", out[0].isnan().any().item(), "out absmax", out[0].float().nan_to_num().abs().max().item(), "lse", out[1].flatten()[:3])
    except Exception as e:
        print("all masked FAILED", type(e).__name__, str(e)[:300])
    # strided q from [B, T, H, D]
    try:
        qt = q.transpose(1, 2).contiguous().transpose(1, 2)
        out = op(qt, k, v, None, True, 0.0, scale=scale)
        print("strided q ok", rel(out[0], op(q, k, v, None, True, 0.0, scale=scale)[0]), out[0].stride())
    except Exception as e:
        print("strided q FAILED", type(e).__name__, str(e)[:300])
